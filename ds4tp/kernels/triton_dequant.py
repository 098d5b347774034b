"""Whole-matrix dequantisation on the GPU, for prefill (many tokens per weight read).

A prefill multiplies each weight by hundreds of tokens, so the matvec kernels' "read the bytes
once per token tile" pays the weight read many times. Instead the prefill path decodes a weight
once into float32 (this kernel: one pass, bandwidth-bound) and multiplies with a regular GEMM.
The decoding is exact and bit-identical to ds4tp.dequant (same float32 operations in the same
order; floating-point contraction is disabled so a*b-c is not fused into one rounding).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ds4tp.config import BLOCK, F16, IQ2_XXS, Q2_K, Q8_0

SUPPORTED = (F16, Q8_0, Q2_K, IQ2_XXS)
BLOCKS_PER_PROGRAM = 4


@triton.jit
def _f16_at(p):
    lo = tl.load(p).to(tl.uint16)
    hi = tl.load(p + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dq_kernel(raw_ptr, row_stride, out_ptr, n_blocks, NB, grid_ptr, sign_ptr,
               QT: tl.constexpr, EPB: tl.constexpr, BPB: tl.constexpr, BPP: tl.constexpr):
    e = tl.arange(0, EPB)
    for i in range(BPP):
        blk = tl.program_id(0) * BPP + i
        if blk < n_blocks:
            r = blk // NB
            b = blk - r * NB
            base = raw_ptr + r.to(tl.int64) * row_stride + b.to(tl.int64) * BPB
            out = out_ptr + blk.to(tl.int64) * EPB + e
            if QT == 8:      # Q8_0: d | q[32]
                d = _f16_at(base)
                q = tl.load(base + 2 + e).to(tl.int8, bitcast=True).to(tl.float32)
                tl.store(out, q * d)
            elif QT == 10:   # Q2_K: scales[16] | qs[64] | d | dmin
                d = _f16_at(base + 80)
                dmin = _f16_at(base + 82)
                n = e // 128
                j = (e // 32) % 4
                l = e % 32
                qb = tl.load(base + 16 + 32 * n + l).to(tl.int32)
                q = ((qb >> (2 * j)) & 3).to(tl.float32)
                sc = tl.load(base + 8 * n + 2 * j + l // 16).to(tl.int32)
                dl = d * (sc & 15).to(tl.float32)
                ml = dmin * (sc >> 4).to(tl.float32)
                tl.store(out, dl * q - ml)
            else:            # IQ2_XXS: d | 8 x (4 grid indices, u32 signs/scale)
                d = _f16_at(base)
                sb = e // 32
                k = (e // 8) % 4
                jj = e % 8
                sub = base + 2 + 8 * sb
                g = tl.load(sub + k).to(tl.int32)
                t = (tl.load(sub + 4).to(tl.uint32) | (tl.load(sub + 5).to(tl.uint32) << 8)
                     | (tl.load(sub + 6).to(tl.uint32) << 16) | (tl.load(sub + 7).to(tl.uint32) << 24))
                scale = ((t >> 28) & 15).to(tl.float32)
                sidx = ((t >> (7 * k).to(tl.uint32)) & 127).to(tl.int32)
                db = d * (0.5 + scale) * 0.25
                mag = tl.load(grid_ptr + g * 8 + jj)
                sgn = tl.load(sign_ptr + sidx * 8 + jj)
                tl.store(out, db * mag * sgn)


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device):
    from ds4tp.dequant import _iq2_xxs_tables
    grid, signs = _iq2_xxs_tables(device)
    return grid.contiguous(), signs.contiguous()


def dequantize(w) -> torch.Tensor | None:
    """float32 [*shape] of a CUDA QTensor (None for types without a kernel)."""
    if w.qtype not in SUPPORTED or not w.raw.is_cuda:
        return None
    return launch(w)


def launch(w) -> torch.Tensor:
    """The kernel launch itself (any device Triton can run on, the CPU interpreter included)."""
    if w.qtype == F16:
        return w.raw.view(torch.float16).float().reshape(w.shape)
    raw = w.raw
    rows = raw.reshape(-1, raw.shape[-1]) if raw.is_contiguous() else None
    if rows is None:       # a column shard: rows are evenly strided views of the file bytes
        try:
            rows = raw.view(-1, raw.shape[-1])
        except RuntimeError:
            rows = raw.reshape(-1, raw.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    epb, bpb = BLOCK[w.qtype]
    nb = w.shape[-1] // epb
    n_blocks = rows.shape[0] * nb
    out = torch.empty(n_blocks * epb, dtype=torch.float32, device=raw.device)
    grid_t, sign_t = _tables(raw.device) if w.qtype == IQ2_XXS else (out, out)
    _dq_kernel[(triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)](
        rows, rows.stride(0), out, n_blocks, nb, grid_t, sign_t,
        QT=w.qtype, EPB=epb, BPB=bpb, BPP=BLOCKS_PER_PROGRAM, enable_fp_fusion=False)
    return out.view(w.shape)
