"""One decode token's attention at DS4's full width on a GPU: the grouped kernel
(triton_attn._attn_group_kernel: BH heads per program, key tiles through the tensor cores) at a
few launch shapes against the kernel with one head per program (_attn_kernel), for a ring with
n positions filled and the compressed rows of a ratio-4 layer at depth 4096 (1024 rows, an
indexer mask of 512) and of a ratio-128 layer. Each time is per launch, from a CUDA graph of 20
launches replayed (weights and caches stay in L2, as in a decode step: the ring is 256 KB);
every shape is checked against the twin (decode_graph.decode_attention_torch) first.

    python3 bench/decode_attn.py [--heads 64] [--out decode_attn.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds4tp.config import RMS_EPS, Shape  # noqa: E402
from ds4tp.decode_graph import decode_attention_torch  # noqa: E402
from ds4tp.kernels import triton_attn as ta  # noqa: E402
from ds4tp.numerics import f16_round, rope_cos_sin  # noqa: E402

# (BH, BN, BD, S, warps) of the grouped kernel; the default first
SHAPES = [(16, 16, 64, 16, 4), (16, 16, 64, 8, 4), (16, 16, 64, 32, 4), (16, 16, 64, 16, 8),
          (32, 16, 64, 16, 8), (16, 32, 64, 16, 4), (32, 16, 64, 8, 8)]
# (name, ratio, position, masked)
CASES = [("ring 2 rows", 0, 1, False), ("ring full", 0, 700, False),
         ("ratio 4 depth 4096, mask 512", 4, 4095, True), ("ratio 128 depth 4096", 128, 4095, False)]


def per_launch_us(fn, n=20, reps=5) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()                                   # warm-up on the capture stream
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            for _ in range(n):
                fn()
    g.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / n)
    return sorted(out)[len(out) // 2]


def set_shape(bh, bn, bd, split, warps):
    ta.ATTN_BH, ta.ATTN_GROUP_BN, ta.ATTN_BD, ta.ATTN_GROUP_SPLIT, ta.ATTN_GROUP_WARPS = bh, bn, bd, split, warps


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--out")
    a = ap.parse_args()
    H, D, n_swa, n_rot, dev = a.heads, 512, 128, 64, "cuda"
    g = torch.Generator().manual_seed(0)
    s = Shape(n_swa=n_swa, head_dim=D, n_rot=n_rot, n_head=H)
    qb = (torch.randn(1, H * D, generator=g) * 2).to(dev)
    ring = f16_round(torch.randn(n_swa, D, generator=g) * 3).to(dev)
    sinks = torch.randn(H, generator=g).to(dev)
    default = SHAPES[0]
    res = {"device": torch.cuda.get_device_name(), "heads": H, "cases": {}}
    for name, ratio, p, masked in CASES:
        slots = torch.arange(n_swa)
        k = min(p + 1, n_swa)                                  # the ring holds the last k positions
        rpos = torch.where(slots < k, p - (p - slots) % n_swa, torch.full_like(slots, -(1 << 40))).to(dev)
        comp = mask = None
        if ratio:
            cap = p // ratio + 2
            comp = f16_round(torch.randn(cap, D, generator=g) * 3).to(dev)
            if masked:
                n_vis = (p + 1) // ratio
                sel = torch.randperm(n_vis, generator=g)[:512]
                m = torch.zeros(1, cap, dtype=torch.bool)
                m[0, sel] = True
                mask = m.to(dev)
        cos, sin = (t.contiguous() for t in rope_cos_sin(torch.arange(p + 1, device=dev), n_rot, ratio > 0))
        pos = torch.tensor([p], device=dev)
        args = (qb, ring, rpos, comp, ratio, mask, sinks, cos, sin, pos)
        want = decode_attention_torch(*args, s)
        rec = {}
        ta.ATTN_GROUPED = False
        got = ta.attention(*args, RMS_EPS)
        err = float((got - want).abs().max() / want.abs().max())
        rec["per_head"] = {"us": per_launch_us(lambda: ta.attention(*args, RMS_EPS)), "rel_err": err}
        ta.ATTN_GROUPED = True
        for shp in SHAPES:
            set_shape(*shp)
            try:
                got = ta.attention(*args, RMS_EPS)
                err = float((got - want).abs().max() / want.abs().max())
                if err > 1e-5:
                    raise AssertionError(f"mismatch {err:.3g}")
                rec[str(shp)] = {"us": per_launch_us(lambda: ta.attention(*args, RMS_EPS)), "rel_err": err}
            except Exception as exc:     # a shape that does not compile or fit: recorded, go on
                rec[str(shp)] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        set_shape(*default)
        res["cases"][name] = rec
        line = "  ".join(f"{k}: {v['us']:.2f} us" if "us" in v else f"{k}: {v['error'][:40]}"
                         for k, v in rec.items())
        print(f"{name:30s} {line}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"({time.time() - t0:.0f} s)")
    sys.exit(rc)
