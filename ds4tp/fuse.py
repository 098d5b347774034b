"""`@fused`: the dispatch point for chains of small elementwise/reduction ops.

A DS4 decode step is dominated, after the weight matvecs, by hundreds of tiny ops (Sinkhorn's
20 iterations, norms, RoPE, FP8/FP4 rounding, attention softmax). Inside `static_shapes()` (the
static decoder's steps, whose buffers never change shape) a function marked @fused runs on one
CUDA token row through torch.compile, which fuses such a chain into a few Triton kernels;
everywhere else, and while tracing, the plain function runs. The eager model's one-token
forward (a one-token prompt, or a prompt's last token after prefix reuse) stays plain: its
cache sizes differ at every position, and each new one recompiled (served first prompts of new
lengths after prefix reuse waited 8-12 s on two H200s). Same math: the compiled form only
changes float summation order and may contract a*b+c into one rounding (a tested twin pair:
tests/test_fuse.py compares them on CUDA).
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch

_scope = threading.local()     # .on: inside static_shapes() on this thread


@contextlib.contextmanager
def static_shapes():
    """@fused functions called inside (on this thread) run compiled on CUDA token rows."""
    prev = getattr(_scope, "on", False)
    _scope.on = True
    try:
        yield
    finally:
        _scope.on = prev


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
        if (not getattr(_scope, "on", False) or not _decode_on_cuda(args)
                or torch.compiler.is_compiling()):
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=None)
        return compiled(*args, **kwargs)

    dispatch.eager = fn
    return dispatch
