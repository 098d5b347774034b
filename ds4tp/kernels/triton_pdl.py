"""Programmatic dependent launch (PDL) inside the kernels.

A kernel launched with `launch_pdl=True` (the host decides: `ds4tp.kernels.pdl(x)`) may start
while the kernel before it on the stream is still finishing. Its programs must therefore wait
(`gdc_wait`) before they read anything an earlier kernel wrote and before they write anything;
`gdc_launch_dependents` lets the next kernel start launching in turn. Work that reads only
weights may go before the wait (the Q8_0 matvec loads its first weight step there). With
PDL = 0 (the CPU interpreter, older GPUs, `kernels.no_pdl()`) nothing is emitted.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """Let the next kernel launch now (its programs wait for this one to finish)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the previous kernel has finished and its writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Both, at the top of a kernel with nothing to do before its inputs are ready."""
    pdl_release(PDL)
    pdl_wait(PDL)
