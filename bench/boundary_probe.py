"""What a kernel boundary costs in a graph-replayed chain of dependent launches, and whether a
memory flag would cost less than programmatic dependent launch's wait.

The decode step is a chain of ~14 dependent kernels per layer, most of them latency-bound; each
boundary is at least the time from the producer's last store to the consumer's first load of
it. With PDL (ds4tp.kernels.pdl) the consumer is resident early and griddepcontrol.wait returns
once the producer grid has completed and flushed. A flag instead: every producer block, after
its stores, adds one to a counter (release), and the consumer's blocks spin until the counter
holds the producer's block count (acquire), without waiting for the grid to retire.

Timed here per hop (a graph of HOPS dependent launches, replayed): each kernel's blocks read the
previous kernel's output, do a few dependent FMAs and write their own; variants: plain launches,
PDL with griddepcontrol.wait, PDL with the flag. Grid sizes from the HC step's 32 blocks to two
blocks per SM. No model, no weights; about a minute on one GPU.

    python bench/boundary_probe.py [--out boundary.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SRC = r'''
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ float hop_work(const float* in, int n, int work) {
    float v = __ldcg(in + (blockIdx.x * 37 + threadIdx.x) % n);
    for (int i = 0; i < work; i++) v = fmaf(v, 1.0001f, 1e-6f);
    return v;
}

// the consumer waits for the producer grid (PDL's griddepcontrol.wait; a no-op in a plain launch)
extern "C" __global__ void hop_wait(const float* in, float* out, int n, int work) {
    pdl_trigger();
    pdl_wait();
    const float v = hop_work(in, n, work);
    out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// the consumer waits for *cnt_in to reach need (the producer's blocks, each adding one after its
// stores), then publishes its own blocks on *cnt_out
extern "C" __global__ void hop_flag(const float* in, float* out, int n, int work,
                                    const unsigned* cnt_in, unsigned* cnt_out, unsigned need) {
    pdl_trigger();
    if (threadIdx.x == 0) {
        while (ld_acquire(cnt_in) < need) {
        }
    }
    __syncthreads();
    const float v = hop_work(in, n, work);
    out[blockIdx.x * blockDim.x + threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(cnt_out, 1u);
    }
}
'''


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--hops", type=int, default=200)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    import cupy as cp
    from ds4tp.kernels import cuda_c, pdl
    code = (Path(cuda_c.__file__).parent / "common.cuh").read_text() + SRC
    dev = torch.device("cuda", torch.cuda.current_device())
    with cp.cuda.Device(dev.index):
        mod = cp.RawModule(code=code, options=("--std=c++14",))
        k_wait, k_flag = mod.get_function("hop_wait"), mod.get_function("hop_flag")
    threads = 256
    results = []
    for blocks in (32, 132, 264):
        n = blocks * threads
        bufs = [torch.rand(n, device=dev) for _ in range(2)]
        cnt = torch.zeros(a.hops + 1, dtype=torch.int32, device=dev)
        p = cuda_c.ptr

        def chain(kind):
            if kind == "flag":
                cnt.zero_()
                cnt[0].fill_(blocks)
            for i in range(a.hops):
                src, dst = bufs[i % 2], bufs[(i + 1) % 2]
                if kind == "flag":
                    args = (p(src), p(dst), np.int32(n), np.int32(8), np.uint64(cnt.data_ptr() + 4 * i),
                            np.uint64(cnt.data_ptr() + 4 * (i + 1)), np.int32(blocks))
                    cuda_c.launch(k_flag, dev, (blocks,), threads // 32, args)
                else:
                    cuda_c.launch(k_wait, dev, (blocks,), threads // 32,
                                  (p(src), p(dst), np.int32(n), np.int32(8)))

        for kind in ("plain", "pdl_wait", "pdl_flag"):
            pdl.set_enabled(kind != "plain")
            flag = "flag" if kind == "pdl_flag" else "wait"
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                chain(flag)
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                chain(flag)
            g.replay()
            torch.cuda.synchronize()
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(a.reps):
                g.replay()
            t1.record()
            torch.cuda.synchronize()
            us = t0.elapsed_time(t1) * 1e3 / (a.reps * a.hops)
            ok = kind != "pdl_flag" or int(cnt[a.hops].item()) == blocks
            results.append({"blocks": blocks, "kind": kind, "us_per_hop": us, "ok": ok})
            print(f"{blocks:4d} blocks x {threads}: {kind:9s} {us:6.2f} us per hop" + ("" if ok else "  COUNT WRONG"),
                  flush=True)
        pdl.set_enabled(True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "hops": a.hops, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
