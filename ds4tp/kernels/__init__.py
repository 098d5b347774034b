"""Fused GPU kernels (Triton) for the decode hot path.

`available()` says whether they can run here (CUDA + Triton). `linear` / `expert_linear` return
None for shapes or types they do not cover, and `ds4tp.ops` then runs the torch twin.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def available() -> bool:
    try:
        import torch
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def linear(w, x):
    return None


def expert_linear(w, x, ids):
    return None


def grouped_linear(w, x):
    return None
