"""A 2048-token prefill's attention at DS4's full width on a GPU (RoPE of the queries and its
inverse on the heads included): the one-launch kernel (triton_attn.prefill_attention) at a few
launch shapes against the query-chunk twin
(model.attend_many with the kernel switched off), from an empty cache, for a ratio-0, a
ratio-4 (512 compressed rows) and a ratio-128 layer (16 rows). Each time is the median of a
few CUDA-event-timed calls (gemm_sweep.ms); every shape is checked against the twin first.

    python3 bench/prefill_attn.py [--tokens 2048] [--out prefill_attn.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemm_sweep import ms as timed_ms  # noqa: E402  (median of CUDA-event-timed calls)
from ds4tp.kernels import triton_attn as ta  # noqa: E402
from ds4tp.model import attend_many  # noqa: E402
from ds4tp.numerics import f16_round, rope_cos_sin  # noqa: E402

# the default first; the first run also timed bn=64 and bh=64 (they do not fit in shared
# memory) and bd=128 (bench/results/prefill_attn_h200_s10_pa1_*)
SHAPES = [dict(bh=32, bn=32, bd=64, warps=4), dict(bh=32, bn=32, bd=64, warps=8),
          dict(bh=16, bn=32, bd=64, warps=4)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out")
    a = ap.parse_args()
    T, H, D, n_swa = a.tokens, 64, 512, 128
    g = torch.Generator().manual_seed(0)
    s = SimpleNamespace(head_dim=D, n_swa=n_swa)
    dev = "cuda"
    q = torch.randn(T, H, D, generator=g).to(dev)
    raw = f16_round(torch.randn(T, D, generator=g) * 3).to(dev)
    pos = torch.arange(T, device=dev)
    raw_pos = pos.clone()
    sinks = torch.randn(H, generator=g).to(dev)
    res = {"tokens": T, "layers": {}}
    for ratio in (0, 4, 128):
        comp = cmask = None
        if ratio:
            comp = f16_round(torch.randn(T // ratio, D, generator=g) * 3).to(dev)
            cmask = torch.arange(T // ratio, device=dev)[None, :] < ((pos + 1) // ratio)[:, None]
        cos, sin = rope_cos_sin(pos, 64, ratio > 0)
        args = (q, cos, sin, raw, 0, raw_pos, comp, cmask, 0, pos, ratio, sinks, s)
        ta.set_prefill_enabled(False)
        try:
            want = attend_many(*args)
            twin_ms = timed_ms(lambda: attend_many(*args))
        finally:
            ta.set_prefill_enabled(True)
        row = {"twin_ms": twin_ms, "kernel": []}
        for cfg in SHAPES:
            t0 = time.perf_counter()
            try:
                got = ta.prefill_attention(q, raw, 0, comp, cmask, 0, ratio, sinks, n_swa, (cos, sin), **cfg)
                err = float((got - want).abs().max() / want.abs().max())
                ms = timed_ms(lambda: ta.prefill_attention(q, raw, 0, comp, cmask, 0, ratio, sinks, n_swa,
                                                           (cos, sin), **cfg))
                row["kernel"].append({**cfg, "ms": ms, "rel_err": err})
                print(f"ratio {ratio:3d} {cfg}: {ms:7.3f} ms (twin {twin_ms:.3f}, {twin_ms / ms:.2f}x), "
                      f"rel err {err:.1e}, compile+check {time.perf_counter() - t0:.1f}s", flush=True)
            except Exception as exc:    # a launch shape that does not fit is reported, not fatal
                row["kernel"].append({**cfg, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                print(f"ratio {ratio:3d} {cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        res["layers"][f"ratio{ratio}"] = row
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
