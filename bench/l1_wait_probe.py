"""Does griddepcontrol.wait let a PDL consumer's L1-cached loads (ld.global.ca) see what the
kernel ahead wrote, when the consumer's SM cached the line before that write?

Why (docs/performance.md, twentieth session): the CUDA C kernels read earlier kernels' outputs
through L2 (common.cuh, prior: ld.global.cg) since the read-only path (ld.global.nc) served
stale bytes under PDL. L1-cached loads were 1.4-1.6% faster on the whole step, but are only
safe if the wait invalidates such lines. Its answer on an H200 (s23a, twenty-first session):
no .ca word stale, every .nc word stale; prior is .ca since.

Each round, on one stream:
  1. the buffers a and b are set to the round's old value (a torch fill, plain);
  2. the producer (plain launch, one block per SM) triggers its dependents at once, spins for
     --spin-us, then writes the new value into a and b;
  3. the consumer (PDL launch, resident beside the producer) loads its words of a by .ca and of
     b by .nc before its wait (planting lines in its SM's L1), waits, then loads them again
     (.ca from a, .nc from b, .cg from both) and counts the words still holding the old value.
A round whose first loads already saw the new value (the consumer started late) says nothing
and is counted apart. .cg must never be stale; .nc is the path that was.

    python bench/l1_wait_probe.py [--rounds 200] [--spin-us 100] [--out R.json]
"""
import argparse
import json

import numpy as np
import torch

from ds4tp.kernels import cuda_c, pdl

SRC = r'''
extern "C" __global__ void producer(int* a, int* b, int n, int val, long long spin_ns) {
    pdl_trigger();                       // the consumer may launch now
    long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < spin_ns);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        a[i] = val;
        b[i] = val;
    }
}

// counts: [0] words whose pre-wait loads already saw val (the round says nothing for them),
// [1] .ca stale after the wait, [2] .nc stale, [3] .cg stale (a or b)
extern "C" __global__ void consumer(const int* a, const int* b, int n, int val, int* counts) {
    pdl_trigger();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) { pdl_wait(); return; }
    const int a0 = __ldca(a + i);         // plant lines before the producer writes
    const int b0 = __ldg(b + i);
    pdl_wait();
    const int a1 = __ldca(a + i), b1 = __ldg(b + i);
    const int ca = __ldcg(a + i), cb = __ldcg(b + i);
    if (a0 == val || b0 == val) { atomicAdd(counts, 1); return; }
    if (a1 != val) atomicAdd(counts + 1, 1);
    if (b1 != val) atomicAdd(counts + 2, 1);
    if (ca != val || cb != val) atomicAdd(counts + 3, 1);
}
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--spin-us", type=float, default=100.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device("cuda:0")
    if not (pdl.enabled(dev) and pdl.cuda_ok()):
        raise SystemExit("needs an sm_90+ GPU with cuLaunchKernelEx (PDL)")
    cp = cuda_c._cupy()
    code = (cuda_c._DIR / "common.cuh").read_text() + "\n" + SRC
    with cp.cuda.Device(0):
        mod = cp.RawModule(code=code, options=("--std=c++14",))
        prod, cons = mod.get_function("producer"), mod.get_function("consumer")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    threads = 256
    n = sms * 2 * threads                     # two consumer blocks per SM beside the producer's
    a = torch.zeros(n, dtype=torch.int32, device=dev)
    b = torch.zeros(n, dtype=torch.int32, device=dev)
    counts = torch.zeros(4, dtype=torch.int32, device=dev)
    total = np.zeros(4, dtype=np.int64)
    stream = torch.cuda.current_stream(dev)
    ext = cp.cuda.ExternalStream(stream.cuda_stream, 0)
    for r in range(args.rounds):
        old, new = 2 * r + 1, 2 * r + 2
        a.fill_(old)
        b.fill_(old)
        counts.zero_()
        with cp.cuda.Device(0), ext:
            prod((sms,), (128,), (cuda_c.ptr(a), cuda_c.ptr(b), np.int32(n), np.int32(new),
                                  np.int64(int(args.spin_us * 1000))))
        pdl.launch_cuda(cons.kernel.ptr, (n // threads,), threads, stream.cuda_stream,
                        (cuda_c.ptr(a), cuda_c.ptr(b), np.int32(n), np.int32(new), cuda_c.ptr(counts)))
        torch.cuda.synchronize()
        total += counts.cpu().numpy()
    words = args.rounds * n
    res = {"rounds": args.rounds, "words": words, "spin_us": args.spin_us,
           "late_words": int(total[0]), "stale_ca": int(total[1]), "stale_nc": int(total[2]),
           "stale_cg": int(total[3])}
    print(json.dumps(res))
    print(f"of {words - total[0]} informative words: .ca stale {total[1]}, .nc stale {total[2]}, "
          f".cg stale {total[3]} (late, not informative: {total[0]})")
    if args.out:
        json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
