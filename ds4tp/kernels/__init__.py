"""Fused GPU kernels (Triton) for the decode hot path.

`available()` says whether they can run here (CUDA + Triton). Each entry point returns None for
inputs it does not cover (weight type without a kernel, tensors not on CUDA, activation not
float32), and `ds4tp.ops` then runs the torch twin. The kernels live in `triton_matvec`; see its
docstring for the numerics (bit-identical activation quantisation, exact weight decoding,
float32 accumulation) and `bench/kernels_check.py` for the H200 check and timing. Routed
experts at decode sizes (IQ2_XXS / Q2_K, T*K <= 24) take a packed-integer dp4a kernel; larger
launches the tensor-core tile kernel.

Entry points (twins in ds4tp.ops):
  linear(w, x)                                   x [T, in]           -> [T, out]
  grouped_linear(w, x)                           x [T, G, in_g]      -> [T, G, out/G]
  expert_linear(w, x, ids, sum_slots=False)      x [T, in]|[T, K, in], ids [T, K]
                                                 -> [T, K, out], or summed over K [T, out]
  expert_swiglu(w_gate, w_up, x, ids, weights, clamp)
                                                 -> [T, K, out] = swiglu(gate, up) * weights
"""
from __future__ import annotations

import functools

from ds4tp.config import SWIGLU_CLAMP


@functools.lru_cache(maxsize=1)
def available() -> bool:
    try:
        import torch
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def _covered(w, x) -> bool:
    import torch
    from ds4tp.kernels.triton_matvec import SUPPORTED
    return (w.qtype in SUPPORTED and x.is_cuda and w.raw.is_cuda and x.dtype == torch.float32
            and x.device == w.raw.device)


def linear(w, x):
    if not _covered(w, x):
        return None
    from ds4tp.kernels import triton_matvec as tm
    return tm.linear(w, x)


def grouped_linear(w, x):
    if not _covered(w, x):
        return None
    from ds4tp.kernels import triton_matvec as tm
    T, G, n_in = x.shape
    return tm.linear(w, x.reshape(T, G * n_in), groups=G).view(T, G, -1)


def expert_linear(w, x, ids, sum_slots: bool = False):
    if not _covered(w, x) or not ids.is_cuda:
        return None
    from ds4tp.kernels import triton_matvec as tm
    return tm.expert_linear(w, x, ids, sum_slots=sum_slots)


def expert_swiglu(w_gate, w_up, x, ids, weights, clamp: float = SWIGLU_CLAMP):
    if not (_covered(w_gate, x) and _covered(w_up, x) and ids.is_cuda and weights.is_cuda):
        return None
    from ds4tp.kernels import triton_matvec as tm
    return tm.expert_swiglu(w_gate, w_up, x, ids, weights, clamp)
