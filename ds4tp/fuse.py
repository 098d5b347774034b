"""`@fused`: the dispatch point for chains of small elementwise/reduction ops.

A DS4 decode step is dominated, after the weight matvecs, by hundreds of tiny ops (Sinkhorn's
20 iterations, norms, RoPE, FP8/FP4 rounding, attention softmax). On CUDA a function marked
@fused runs through torch.compile, which fuses such a chain into a few Triton kernels; on every
other device, and while tracing, the plain function runs. Same math: the compiled form only
changes float summation order and may contract a*b+c into one rounding (a tested twin pair:
tests/test_fuse.py compares them on CUDA).
"""
from __future__ import annotations

import functools

import torch


def _decode_on_cuda(args) -> bool:
    """The first tensor argument is on CUDA and holds one token row (decode: static shapes,
    where compiling pays; a prefill's shapes vary and its time is in the GEMMs)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.is_cuda and a.dim() > 0 and a.shape[0] == 1
    return False


def fused(fn):
    compiled = None

    @functools.wraps(fn)
    def dispatch(*args, **kwargs):
        nonlocal compiled
        if not _decode_on_cuda(args) or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=None)
        return compiled(*args, **kwargs)

    dispatch.eager = fn
    return dispatch
