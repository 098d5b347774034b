"""One token's random draw in two CUDA C launches (sample.cu), after one sort of the logits.

`draw(x, ids, ...)` takes x (float64 [V], logits plus logit_bias) and ids (its stable descending
order) and returns the drawn token (int64 [1], on the device, nothing waited for). Its twin is
ds4tp.worker.sampling._draw_torch, the same rule in ~25 torch launches over a float64 sort:
~245 us of GPU time a sampled token on an H200 (bench/sampler_bench.py, s27a), which the served
path pays between two decode steps. Here the sums run in float64 in a fixed order (a block scan
per 4,096 sorted positions, walked only as far as the kept set and the draw reach), so every
rank draws the same token; they round differently from the twin's, so the two may differ where
u or top_p lies within rounding of a running sum (tests/test_sampling.py).

Returns None where it does not apply (no CuPy, not CUDA, other dtypes); the caller then takes
the twin.
"""
from __future__ import annotations

import numpy as np
import torch

from ds4tp.kernels import cuda_c

_THREADS = 1024          # sample.cu DT
_PER = 4                 # sample.cu PER
_switch = cuda_c.Switch()
set_enabled = _switch.set      # benchmarks and tests time / compare the twin in the same run
available = _switch.available


def draw(x: torch.Tensor, ids: torch.Tensor, temperature: float, top_k: int, top_p: float,
         min_p: float, u: float) -> torch.Tensor | None:
    """The token drawn at u (int64 [1]) from x [V] float64 and ids [V] int64 (x's stable
    descending order), under temperature > 0, top_k (<= 0: off), top_p (0 or >= 1: off) and
    min_p (<= 0: off); None if not covered."""
    if not (available() and x.is_cuda and x.dtype == torch.float64 and x.dim() == 1
            and x.is_contiguous() and ids.dtype == torch.int64 and ids.shape == x.shape
            and ids.is_contiguous() and ids.device == x.device and 0 < x.numel() < 1 << 31
            and temperature > 0):
        return None
    dev = x.device
    fs = cuda_c.kernel("sample.cu", "draw_sum", dev.index)
    fc = cuda_c.kernel("sample.cu", "draw_scan", dev.index)
    if fs is None or fc is None:
        return None
    V = x.numel()
    P = -(-V // (_THREADS * _PER))
    part = torch.empty(P, dtype=torch.float64, device=dev)
    tok = torch.empty(1, dtype=torch.int64, device=dev)
    T = np.float64(temperature)
    cuda_c.launch(fs, dev, (P,), _THREADS // 32, (cuda_c.ptr(x), cuda_c.ptr(ids), cuda_c.ptr(part),
                                                  T, np.int32(V)))
    cuda_c.launch(fc, dev, (1,), _THREADS // 32,
                  (cuda_c.ptr(x), cuda_c.ptr(ids), cuda_c.ptr(part), np.int32(P), cuda_c.ptr(tok), T,
                   np.int32(max(0, min(top_k, V))), np.float64(top_p), np.float64(min_p),
                   np.float64(u), np.int32(V)))
    return tok
