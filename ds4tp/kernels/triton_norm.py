"""RMS scale of many rows in one launch (prefill), the twin of ds4tp.numerics.rms_scale_torch.

Eager torch spends four passes on it (a float64 copy, square, sum, float32 division) over
tensors as large as [T, 64, 512]; here each program reads its row once. Same rounding as the
twin: squares summed in float64 (exact products; only the order of the float64 sum differs),
the mean rounded to float32, then a correctly rounded sqrt and reciprocal.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rms_from_squares(sq, n, eps):
    """1/sqrt(mean + eps) from float64 squares (or partial sums of them) sq of n values: the
    sum in float64, the mean rounded to float32, then a correctly rounded sqrt and reciprocal
    (numerics.rms_scale_torch). Shared by every kernel that RMS-normalises in its prologue."""
    ms = (tl.sum(sq, axis=0) / n).to(tl.float32)
    return tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.sqrt_rn(ms + eps))


@triton.jit
def _row_rms_scale(base, n, eps, BLOCK: tl.constexpr):
    """The RMS scale of the n values at base, read in blocks of BLOCK."""
    acc = tl.zeros([BLOCK], tl.float64)
    for k in range(0, n, BLOCK):
        off = k + tl.arange(0, BLOCK)
        v = tl.load(base + off, mask=off < n, other=0.0).to(tl.float64)
        acc += v * v
    return rms_from_squares(acc, n, eps)


@triton.jit
def _rms_scale_kernel(x_ptr, out_ptr, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    tl.store(out_ptr + row, _row_rms_scale(x_ptr + row.to(tl.int64) * n, n, eps, BLOCK))


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1/sqrt(mean(x^2) + eps) over the last dim of float32 x, keepdim."""
    if x.dtype != torch.float32:
        raise ValueError(f"rms_scale: expects float32, got {x.dtype}")
    x = x.contiguous()
    n = x.shape[-1]
    out = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    rows = out.numel()
    if rows and n:
        _rms_scale_kernel[(rows,)](x, out, n, eps, BLOCK=min(2048, triton.next_power_of_2(n)),
                                   num_warps=4)
    return out


@triton.jit
def _rms_norm_kernel(x_ptr, sx, w_ptr, out_ptr, n, eps, HAS_W: tl.constexpr, BLOCK: tl.constexpr,
                     ONE: tl.constexpr):
    """Row r of x (stride sx) times its RMS scale, then times w: the twin's two float32
    products in the same order (numerics.rms_norm). ONE: the row fits in one block and is read
    once; else it is read twice, block by block."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * sx
    if ONE:
        off = tl.arange(0, BLOCK)
        v = tl.load(base + off, mask=off < n, other=0.0)
        vd = v.to(tl.float64)
        y = v * rms_from_squares(vd * vd, n, eps)
        if HAS_W:
            y = y * tl.load(w_ptr + off, mask=off < n, other=0.0)
        tl.store(out_ptr + row * n + off, y, mask=off < n)
    else:
        r = _row_rms_scale(base, n, eps, BLOCK)
        for k in range(0, n, BLOCK):
            off = k + tl.arange(0, BLOCK)
            y = tl.load(base + off, mask=off < n, other=0.0) * r
            if HAS_W:
                y = y * tl.load(w_ptr + off, mask=off < n, other=0.0)
            tl.store(out_ptr + row * n + off, y, mask=off < n)


ONE_PASS_MAX = 16384   # rows up to this many values are read once (held by up to 16 warps)


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x * rms_scale(x) (times w [n] where given) over the last dim of float32 x, one launch:
    x [rows, n] with any row stride, or more leading dims over contiguous rows -> a contiguous
    result of x's shape."""
    if x.dtype != torch.float32:
        raise ValueError(f"rms_norm: expects float32, got {x.dtype}")
    n = x.shape[-1]
    if w is not None and (w.shape != (n,) or w.dtype != torch.float32 or not w.is_contiguous()):
        raise ValueError(f"rms_norm: weight {w.dtype} {tuple(w.shape)} does not match rows of {n}")
    x2 = x if x.dim() == 2 else x.reshape(-1, n)      # a copy only where the rows cannot be viewed
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.float32, device=x.device)
    if out.numel():
        one = n <= ONE_PASS_MAX
        block = triton.next_power_of_2(n) if one else 2048
        _rms_norm_kernel[(x2.shape[0],)](x2, x2.stride(0), w if w is not None else x2, out, n, eps,
                                         HAS_W=w is not None, BLOCK=block, ONE=one,
                                         num_warps=max(4, min(16, block // 1024)))
    return out.view(x.shape)
