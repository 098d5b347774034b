"""Triton matvec kernels that read GGUF-encoded weight rows directly (decode hot path).

Every kernel computes what its torch twin in `ds4tp.ops` computes: the activation is quantised
in the kernel prologue exactly as `ds4tp.numerics.q8_0_act` / `q8_k_act` do (bit-identical int8
values and float32 scales), the weight is decoded exactly, and products are summed in float32
(or exactly, in integers). Only the summation order differs from the twin.

Layout handled: `QTensor.raw` is uint8 `[*lead, rows, row_bytes]`; any strides on the leading
axes are fine (a TP shard that is a block-aligned column slice of the original rows is a view
with a larger row stride), the byte axis must be contiguous.

How each weight type is multiplied (T = tokens, padded to TQ = a power of two):
  F16      float32 FMA (w converted to float32, activation as is).
  Q8_0     T <= FMA_MAX_T: exact float32 dequant d*q times the Q8_0 round-tripped activation,
           FMA. Larger T: int8 x int8 tensor-core dot per 32-block, scaled by d_w * d_x.
  Q2_K     int8 tensor-core dot per 256-block of a = scale*q (<= 45, exact int8) with the Q8_K
           integers, times d*d_x; the min term is a tiny fp16 dot of the 16 mins with the 16
           Q8_K block sums (all values integers exactly representable in fp16).
  IQ2_XXS  fp16 tensor-core dot per 256-block: each weight becomes the integer
           (2s+1)*grid*sign (|.| <= 1333, exact in fp16) via a 256x8 fp16 grid table and a
           128x8 sign-bit table; the Q8_K integers are exact in fp16; times d*d_x/8.
  Q4_K     fp16 dot per 256-block of sc*q (<= 945, exact), minus the fp16 min dot as Q2_K.
Tensor-core dots on integer-valued operands accumulate in float32 (int32 for int8), so each
block sum is exact or correctly rounded to float32: results agree with the twin to ~1e-6.
Routed experts at few tokens (IQ2_XXS / Q2_K, T*K <= SMALL_MAX_PAIRS, i.e. decode): a separate
packed-integer kernel (_expert_small_kernel, see the comment above it): the activation is
quantised once (quantize_q8_k), 4 weights and 4 activation bytes meet in one dp4a, block sums
are exact int32 and scaled once per super-block in float32.

Determinism: one program owns each output tile; when the reduction is split over K (split-K,
for shapes with few rows) partial tiles go to a workspace and the last program to finish a tile
(chosen by an atomic ticket) adds them in the fixed order 0..SPLIT-1.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ds4tp.kernels import pdl
from ds4tp.kernels.triton_pdl import pdl_start
from ds4tp.config import F16, IQ2_XXS, Q2_K, Q4_K, Q8_0, SWIGLU_CLAMP, type_name
from ds4tp.kernels.triton_norm import rms_from_squares

SUPPORTED = (F16, Q8_0, Q2_K, Q4_K, IQ2_XXS)
# elements per block of each type (F16 counts single elements); the byte layouts are spec 5.1
_EPB = {F16: 1, Q8_0: 32, Q2_K: 256, Q4_K: 256, IQ2_XXS: 256}

TQ_MAX = 16       # tokens per launch; more are processed in chunks of TQ_MAX (weights re-read)
TQ_MIN = 1        # smallest token tile; Triton >= 3.5 pads small dot operands itself
FMA_MAX_T = 2     # Q8_0: float FMA path up to this many tokens, int8 tensor cores above
PRE_MIN_T_Q8_0 = 4  # quantise the activation in a separate launch from this many tokens on
PRE_MIN_T_KQ = 2    # (the in-kernel prologue repeats the quantisation in every program)
_TICKETS = 1 << 16
# routed experts: the packed-integer path (see _expert_small_kernel) for these types, up to this
# many (token, slot) pairs (T <= 4 at DS4's K = 6) and slots per token
# Q2_K stays on the tile kernel: on an H200 its few-token path measured 128 us for the TP=1
# down projection against 45 us for the tile kernel (bench/results, run 2); IQ2_XXS gate/up went
# from ~1070 us to 48.5 us on the few-token path.
SMALL_TYPES = (IQ2_XXS,)
SMALL_MAX_PAIRS = 24
SMALL_MAX_K = 8
# Q2_K routed down, slot sum, few tokens: _q2k_sum_kernel (rows per program), for rows of at most
# Q2K_SUM_MAX_IN inputs (DS4's TP=1 down projection and its TP=2 shard). The H200 sweep
# (bench/results/kernels_h200_run5_routed_20261128.json) measured, with 4 rows and one warp per
# program, 18.9 us against 39.5 us for the tile kernel's default at the TP=2 shape (1024 inputs)
# and 30.6 us against 45.7 us at TP=1 (2048 inputs; 16 rows per program had measured 59 us).
Q2K_SUM_MAX_IN = 2048
Q2K_SUM_MAX_T = 4
Q2K_SUM_BN = 4
Q2K_SUM_WARPS = 1
SMALL_MATRIX = 1 << 22   # default_cfg: weights up to this many elements aim at 4 programs per SM

# Expert kernel modes
MODE_SLOTS, MODE_SUM, MODE_SWIGLU = 0, 1, 2


# ================================================================================================
# activation quantisers (bit-identical to ds4tp.numerics)
# ================================================================================================
@triton.jit
def _rint_clamped(v):
    """int32 round-half-even of float32 v already clamped to [-128, 127] (any |v| < 2**22 works):
    adding 1.5*2**23 puts the rounded integer into the low mantissa bits (no float op to fold
    or contract)."""
    return (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _q8_0_quant(x):
    """Q8_0 activation of x [A, NB, 32] (blocks on the last axis) -> (q int32, d float32 [A, NB]).
    d = amax/127 and 1/d are correctly rounded divisions, as numerics.q8_0_act."""
    amax = tl.max(tl.abs(x), axis=2)
    d = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
    pos = d > 0.0
    inv = tl.where(pos, tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), tl.where(pos, d, 1.0)), 0.0)
    v = x * inv[:, :, None]
    v = tl.minimum(tl.maximum(v, -128.0), 127.0)
    return _rint_clamped(v), d


@triton.jit
def _q8_k_quant(x):
    """Q8_K activation of x [A, 256] -> (q int32 [A, 256], d float32 [A]).
    m = the signed element of largest |x|, first on ties; iscale = -127/m; d = 1/iscale."""
    ar = tl.arange(0, 256)
    ax = tl.abs(x)
    amax = tl.max(ax, axis=1)
    first = tl.min(tl.where(ax == amax[:, None], ar[None, :], 256), axis=1)
    m = tl.sum(tl.where(ar[None, :] == first[:, None], x, 0.0), axis=1)   # exactly one term
    nz = m != 0.0
    iscale = tl.where(nz, tl.math.div_rn(tl.full(m.shape, -127.0, tl.float32), tl.where(nz, m, 1.0)), 0.0)
    v = tl.minimum(tl.maximum(iscale[:, None] * x, -128.0), 127.0)
    d = tl.where(nz, tl.math.div_rn(tl.full(m.shape, 1.0, tl.float32), tl.where(nz, iscale, 1.0)), 0.0)
    return _rint_clamped(v), d


@triton.jit
def _quant_kernel(x_ptr, stride_x, q_ptr, d_ptr, bs_ptr, NBLK,
                  KQ: tl.constexpr, NBP: tl.constexpr):
    """Standalone activation quantiser: row r = program 0, NBP blocks per program 1.
    Q8_0 (KQ False): q int8 [R, n], d [R, n/32]. Q8_K (KQ True): also block sums of 16 [R, n/16]."""
    r = tl.program_id(0)
    b0 = tl.program_id(1) * NBP
    blk = b0 + tl.arange(0, NBP)
    bmask = blk < NBLK
    if KQ:
        ar = tl.arange(0, 256)
        for j in tl.static_range(NBP):
            blkj = b0 + j
            off = blkj * 256 + ar[None, :]                                   # [1, 256]
            ok = off < NBLK * 256
            x = tl.load(x_ptr + r.to(tl.int64) * stride_x + off, mask=ok, other=0.0)
            q, d = _q8_k_quant(x)
            tl.store(q_ptr + r.to(tl.int64) * NBLK * 256 + off, q.to(tl.int8), mask=ok)
            one = blkj + tl.arange(0, 1)
            tl.store(d_ptr + r * NBLK + one, d, mask=one < NBLK)
            bs = tl.sum(tl.reshape(q, (16, 16)), axis=1)
            s16 = blkj * 16 + tl.arange(0, 16)
            tl.store(bs_ptr + r.to(tl.int64) * NBLK * 16 + s16, bs, mask=s16 < NBLK * 16)
    else:
        i = tl.arange(0, 32)
        off = (blk * 32)[:, None] + i[None, :]
        x = tl.load(x_ptr + r.to(tl.int64) * stride_x + off[None, :, :], mask=bmask[None, :, None], other=0.0)
        q, d = _q8_0_quant(x)
        tl.store(q_ptr + r.to(tl.int64) * NBLK * 32 + off[None, :, :], q.to(tl.int8), mask=bmask[None, :, None])
        tl.store(d_ptr + r * NBLK + blk[None, :], d, mask=bmask[None, :])


# ================================================================================================
# weight decoders: one block column of a BN-row tile
# ================================================================================================
@triton.jit
def _f16_ptr(p):
    return p.to(tl.pointer_type(tl.float16))


@triton.jit
def _f16_head_tail(x):
    """float32 x -> float16 (head, tail) with x = head + tail to ~2^-22 relative (inside
    float16's range): float32 operands of float16 tensor-core dots."""
    head = x.to(tl.float16)
    return head, (x - head.to(tl.float32)).to(tl.float16)


@triton.jit
def _q8_0_wtile_f32(w_ptr, row_off, rmask, kb, NB: tl.constexpr):
    """Q8_0 blocks kb..kb+NB-1 of each row, exactly dequantised: float32 [BN, NB, 32]."""
    j = tl.arange(0, NB)
    i = tl.arange(0, 32)
    base = row_off[:, None] + (kb + j)[None, :] * 34                      # [BN, NB]
    q = tl.load(w_ptr + base[:, :, None] + 2 + i[None, None, :], mask=rmask[:, None, None], other=0)
    d = tl.load(_f16_ptr(w_ptr) + (base >> 1), mask=rmask[:, None], other=0.0).to(tl.float32)
    # int8 -> float32 without the (quarter-rate) conversion unit: the bits 0x4B000000 | (u ^ 0x80)
    # are the float 2**23 + q + 128 for the byte u holding q
    f = (q.to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    return f * d[:, :, None]


@triton.jit
def _q8_0_wblock_i8(w_ptr, row_off, rmask, kb):
    """Q8_0 block kb of each row: (int8 q [BN, 32], float32 d [BN])."""
    i = tl.arange(0, 32)
    base = row_off + kb * 34
    q = tl.load(w_ptr + base[:, None] + 2 + i[None, :], mask=rmask[:, None], other=0)
    d = tl.load(_f16_ptr(w_ptr) + (base >> 1), mask=rmask, other=0.0).to(tl.float32)
    return q.to(tl.int8, bitcast=True), d


@triton.jit
def _iq2_xxs_fields(w_ptr, sb, rmask):
    """IQ2_XXS sub-blocks at byte offsets sb [BN, S] of their rows: the 4 grid-row indices
    (uint8 [BN, S, 4]), the word of 4 x 7 sign bits and the 4-bit scale s (int32 [BN, S]), and
    2s+1 as float16 [BN, S]."""
    k = tl.arange(0, 4)
    g = tl.load(w_ptr + sb[:, :, None] + k[None, None, :], mask=rmask[:, None, None], other=0)
    u16 = w_ptr.to(tl.pointer_type(tl.uint16))
    lo = tl.load(u16 + ((sb + 4) >> 1), mask=rmask[:, None], other=0).to(tl.int32)
    hi = tl.load(u16 + ((sb + 6) >> 1), mask=rmask[:, None], other=0).to(tl.int32)
    t = lo | (hi << 16)                                                     # 4x7 sign bits + scale
    return g, t, (2 * ((t >> 28) & 15) + 1).to(tl.float16)


@triton.jit
def _iq2_xxs_wblock(w_ptr, row_off, rmask, kb, grid_ptr, sign_ptr, BN: tl.constexpr):
    """IQ2_XXS super-block kb of each row: (fp16 [BN, 256] holding the integers
    (2s+1)*grid*sign, float32 d [BN]); the weight is d/8 times that."""
    sub = tl.arange(0, 8)
    k = tl.arange(0, 4)
    e = tl.arange(0, 8)
    base = row_off + kb * 66
    d = tl.load(_f16_ptr(w_ptr) + (base >> 1), mask=rmask, other=0.0).to(tl.float32)
    sb = base[:, None] + 2 + 8 * sub[None, :]                               # [BN, 8]
    g, t, sc = _iq2_xxs_fields(w_ptr, sb, rmask)
    sig = (t[:, :, None] >> (7 * k)[None, None, :]) & 127                   # [BN, 8, 4]
    gv = tl.load(grid_ptr + g.to(tl.int32)[:, :, :, None] * 8 + e[None, None, None, :])   # fp16 bits
    sv = tl.load(sign_ptr + sig[:, :, :, None] * 8 + e[None, None, None, :])               # 0 / 0x8000
    v = (gv ^ sv).to(tl.float16, bitcast=True) * sc[:, :, None, None]
    return tl.reshape(v, (BN, 256)), d


@triton.jit
def _q2_k_wblock(w_ptr, row_off, rmask, kb, BN: tl.constexpr):
    """Q2_K super-block kb: (int8 [BN, 256] = scale*q, fp16 mins [BN, 16], d, dmin [BN])."""
    s = tl.arange(0, 16)
    l = tl.arange(0, 16)
    base = row_off + kb * 84
    scb = tl.load(w_ptr + base[:, None] + s[None, :], mask=rmask[:, None], other=0).to(tl.int32)
    # element 16*s + l lives in byte 16 + 32*(s//8) + 16*(s%2) + l, bits 2*((s%8)//2)
    qoff = 16 + 32 * (s // 8) + 16 * (s % 2)
    shift = 2 * ((s % 8) // 2)
    qb = tl.load(w_ptr + base[:, None, None] + qoff[None, :, None] + l[None, None, :],
                 mask=rmask[:, None, None], other=0).to(tl.int32)
    a = ((qb >> shift[None, :, None]) & 3) * (scb & 15)[:, :, None]
    d = tl.load(_f16_ptr(w_ptr) + ((base + 80) >> 1), mask=rmask, other=0.0).to(tl.float32)
    dmin = tl.load(_f16_ptr(w_ptr) + ((base + 82) >> 1), mask=rmask, other=0.0).to(tl.float32)
    return tl.reshape(a.to(tl.int8), (BN, 256)), (scb >> 4).to(tl.float16), d, dmin


@triton.jit
def _q4_k_scale_min(w_ptr, base, rmask, j):
    """6-bit scale and min of sub-block j (any int tensor shape [.., J]) of the 12 scale bytes."""
    sp = w_ptr + base + 4
    p = tl.load(sp + (j % 4), mask=rmask, other=0).to(tl.int32)
    q = tl.load(sp + j + 4, mask=rmask, other=0).to(tl.int32)
    r = tl.load(sp + j, mask=rmask, other=0).to(tl.int32)
    lowj = j < 4
    sc = tl.where(lowj, p & 63, (q & 15) | ((p >> 6) << 4))
    mn = tl.where(lowj, q & 63, (q >> 4) | ((r >> 6) << 4))
    return sc, mn


@triton.jit
def _q4_k_wblock(w_ptr, row_off, rmask, kb, BN: tl.constexpr):
    """Q4_K super-block kb: (fp16 [BN, 256] = sc*q, fp16 mins per 16 [BN, 16], d, dmin)."""
    j = tl.arange(0, 8)
    l = tl.arange(0, 32)
    s = tl.arange(0, 16)
    base = row_off + kb * 144
    sc, _ = _q4_k_scale_min(w_ptr, base[:, None], rmask[:, None], j[None, :])            # [BN, 8]
    _, mn = _q4_k_scale_min(w_ptr, base[:, None], rmask[:, None], (s // 2)[None, :])     # [BN, 16]
    qb = tl.load(w_ptr + base[:, None, None] + 16 + 32 * (j // 2)[None, :, None] + l[None, None, :],
                 mask=rmask[:, None, None], other=0).to(tl.int32)
    q = (qb >> (4 * (j % 2))[None, :, None]) & 15
    # sc*q <= 945 -> fp16 without the conversion unit: bits 0x6400 + v are the fp16 1024 + v
    a = ((q * sc[:, :, None]) + 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    a = a - tl.full(a.shape, 1024.0, tl.float16)
    d = tl.load(_f16_ptr(w_ptr) + (base >> 1), mask=rmask, other=0.0).to(tl.float32)
    dmin = tl.load(_f16_ptr(w_ptr) + ((base + 2) >> 1), mask=rmask, other=0.0).to(tl.float32)
    return tl.reshape(a, (BN, 256)), mn.to(tl.float16), d, dmin


# ================================================================================================
# activation providers: quantise in the prologue, or load a pre-quantised copy (PRE)
# ================================================================================================
@triton.jit
def _act_q8_0(x_ptr, xq_ptr, xd_ptr, x_off, xmask, kb, NB: tl.constexpr, PRE: tl.constexpr):
    """Q8_0 activation blocks kb..kb+NB-1 of each token column: (q int32 [TQ, NB, 32], d [TQ, NB]).
    x_off is the element offset of the column's row; a pre-quantised copy has the same element
    layout (int8) and its scales sit at x_off/32 + block."""
    jj = tl.arange(0, NB)
    i = tl.arange(0, 32)
    off = ((kb + jj) * 32)[:, None] + i[None, :]                                         # [NB, 32]
    if PRE:
        q = tl.load(xq_ptr + x_off[:, None, None] + off[None, :, :], mask=xmask[:, None, None],
                    other=0).to(tl.int32)
        d = tl.load(xd_ptr + (x_off >> 5)[:, None] + kb + jj[None, :], mask=xmask[:, None], other=0.0)
    else:
        x = tl.load(x_ptr + x_off[:, None, None] + off[None, :, :], mask=xmask[:, None, None], other=0.0)
        q, d = _q8_0_quant(x)
    return q, d


@triton.jit
def _act_q8_k(x_ptr, xq_ptr, xd_ptr, xbs_ptr, x_off, xmask, kb, TQ: tl.constexpr,
              SUMS: tl.constexpr, PRE: tl.constexpr):
    """Q8_K super-block kb of each token column: (q int32 [TQ, 256], d [TQ], block sums of 16
    [TQ, 16] when SUMS). Pre-quantised scales at x_off/256 + kb, sums at x_off/16 + 16*kb."""
    ar = tl.arange(0, 256)
    if PRE:
        q = tl.load(xq_ptr + x_off[:, None] + kb * 256 + ar[None, :], mask=xmask[:, None], other=0).to(tl.int32)
        d = tl.load(xd_ptr + (x_off >> 8) + kb, mask=xmask, other=0.0)
        if SUMS:
            bs = tl.load(xbs_ptr + (x_off >> 4)[:, None] + kb * 16 + tl.arange(0, 16)[None, :],
                         mask=xmask[:, None], other=0)
        else:
            bs = tl.zeros([TQ, 16], tl.int32)
    else:
        x = tl.load(x_ptr + x_off[:, None] + kb * 256 + ar[None, :], mask=xmask[:, None], other=0.0)
        q, d = _q8_k_quant(x)
        if SUMS:
            bs = tl.sum(tl.reshape(q, (TQ, 16, 16)), axis=2)
        else:
            bs = tl.zeros([TQ, 16], tl.int32)
    return q, d, bs


# ================================================================================================
# one output tile: acc[BN, TQ] = W[rows, blocks kb0..kb1) @ quant(x)[cols]^T  (optionally twice)
# ================================================================================================
@triton.jit
def _mv_tile(w_ptr, w2_ptr, row_off, rmask, x_ptr, xq_ptr, xd_ptr, xbs_ptr, x_off, xmask, kb0, kb1,
             grid_ptr, sign_ptr, QT: tl.constexpr, BN: tl.constexpr, TQ: tl.constexpr,
             NB: tl.constexpr, MMA: tl.constexpr, TWO: tl.constexpr, PRE: tl.constexpr):
    """x_off [TQ]: element offset of each token column's activation row (xmask: column is live).
    kb0/kb1 count blocks of the weight type (elements for F16); kb1 - kb0 is a multiple of NB.
    With TWO, w2 (same type and row layout) is multiplied with the same activation."""
    acc = tl.zeros([BN, TQ], tl.float32)
    acc2 = tl.zeros([BN, TQ], tl.float32)
    if QT == 1:  # ---- F16 x float32
        kk = tl.arange(0, NB)
        wp = _f16_ptr(w_ptr) + (row_off >> 1)[:, None] + kk[None, :]
        wp2 = _f16_ptr(w2_ptr) + (row_off >> 1)[:, None] + kk[None, :]
        if TQ == 1:
            a2 = tl.zeros([BN, NB], tl.float32)
            b2 = tl.zeros([BN, NB], tl.float32)
            for kb in range(kb0, kb1, NB):
                x = tl.load(x_ptr + x_off[:, None] + kb + kk[None, :], mask=xmask[:, None], other=0.0)
                w = tl.load(wp + kb, mask=rmask[:, None], other=0.0)
                a2 += w.to(tl.float32) * x
                if TWO:
                    b2 += tl.load(wp2 + kb, mask=rmask[:, None], other=0.0).to(tl.float32) * x
            acc = tl.reshape(tl.sum(a2, axis=1), (BN, 1))
            acc2 = tl.reshape(tl.sum(b2, axis=1), (BN, 1))
        else:
            for kb in range(kb0, kb1, NB):
                x = tl.load(x_ptr + x_off[:, None] + kb + kk[None, :], mask=xmask[:, None], other=0.0)
                xt = tl.trans(x)
                w = tl.load(wp + kb, mask=rmask[:, None], other=0.0)
                acc = tl.dot(w.to(tl.float32), xt, acc, input_precision="ieee")
                if TWO:
                    w2 = tl.load(wp2 + kb, mask=rmask[:, None], other=0.0)
                    acc2 = tl.dot(w2.to(tl.float32), xt, acc2, input_precision="ieee")
    elif QT == 8:  # ---- Q8_0 x Q8_0
        if not MMA:
            if TQ == 1:
                a3 = tl.zeros([BN, NB, 32], tl.float32)
                b3 = tl.zeros([BN, NB, 32], tl.float32)
            for kb in range(kb0, kb1, NB):
                q, dx = _act_q8_0(x_ptr, xq_ptr, xd_ptr, x_off, xmask, kb, NB, PRE)
                xh = q.to(tl.float32) * dx[:, :, None]                                     # [TQ, NB, 32]
                w = _q8_0_wtile_f32(w_ptr, row_off, rmask, kb, NB)                        # [BN, NB, 32]
                if TQ == 1:
                    a3 += w * xh
                    if TWO:
                        b3 += _q8_0_wtile_f32(w2_ptr, row_off, rmask, kb, NB) * xh
                else:
                    xt = tl.trans(tl.reshape(xh, (TQ, NB * 32)))
                    acc = tl.dot(tl.reshape(w, (BN, NB * 32)), xt, acc, input_precision="ieee")
                    if TWO:
                        w2 = _q8_0_wtile_f32(w2_ptr, row_off, rmask, kb, NB)
                        acc2 = tl.dot(tl.reshape(w2, (BN, NB * 32)), xt, acc2, input_precision="ieee")
            if TQ == 1:
                acc = tl.reshape(tl.sum(tl.sum(a3, axis=2), axis=1), (BN, 1))
                acc2 = tl.reshape(tl.sum(tl.sum(b3, axis=2), axis=1), (BN, 1))
        else:
            for kb in range(kb0, kb1, NB):
                for j in tl.static_range(NB):
                    q, dx = _act_q8_0(x_ptr, xq_ptr, xd_ptr, x_off, xmask, kb + j, 1, PRE)   # [TQ, 1, 32]
                    xt = tl.trans(tl.reshape(q, (TQ, 32)).to(tl.int8))                     # [32, TQ]
                    dxr = tl.reshape(dx, (TQ,))
                    wq, dw = _q8_0_wblock_i8(w_ptr, row_off, rmask, kb + j)
                    r = tl.dot(wq, xt, out_dtype=tl.int32).to(tl.float32)
                    acc += r * dw[:, None] * dxr[None, :]
                    if TWO:
                        wq2, dw2 = _q8_0_wblock_i8(w2_ptr, row_off, rmask, kb + j)
                        r2 = tl.dot(wq2, xt, out_dtype=tl.int32).to(tl.float32)
                        acc2 += r2 * dw2[:, None] * dxr[None, :]
    else:  # ---- K-quants x Q8_K, NB 256-element super-blocks per step
        for kb0_ in range(kb0, kb1, NB):
            for j in tl.static_range(NB):
                kb = kb0_ + j
                q, dx, bsum = _act_q8_k(x_ptr, xq_ptr, xd_ptr, xbs_ptr, x_off, xmask, kb, TQ, QT != 16, PRE)
                if QT == 16:  # IQ2_XXS
                    xt = tl.trans(q.to(tl.float16))
                    a, d = _iq2_xxs_wblock(w_ptr, row_off, rmask, kb, grid_ptr, sign_ptr, BN)
                    acc += tl.dot(a, xt) * (d * 0.125)[:, None] * dx[None, :]
                    if TWO:
                        a2, d2 = _iq2_xxs_wblock(w2_ptr, row_off, rmask, kb, grid_ptr, sign_ptr, BN)
                        acc2 += tl.dot(a2, xt) * (d2 * 0.125)[:, None] * dx[None, :]
                else:
                    bs = tl.trans(bsum.to(tl.float16))                                     # [16, TQ]
                    if QT == 10:  # Q2_K
                        xt = tl.trans(q.to(tl.int8))
                        a, mn, d, dmin = _q2_k_wblock(w_ptr, row_off, rmask, kb, BN)
                        r = tl.dot(a, xt, out_dtype=tl.int32).to(tl.float32)
                        acc += (r * d[:, None] - tl.dot(mn, bs) * dmin[:, None]) * dx[None, :]
                        if TWO:
                            a2, mn2, d2, dmin2 = _q2_k_wblock(w2_ptr, row_off, rmask, kb, BN)
                            r2 = tl.dot(a2, xt, out_dtype=tl.int32).to(tl.float32)
                            acc2 += (r2 * d2[:, None] - tl.dot(mn2, bs) * dmin2[:, None]) * dx[None, :]
                    else:  # Q4_K
                        xt = tl.trans(q.to(tl.float16))
                        a, mn, d, dmin = _q4_k_wblock(w_ptr, row_off, rmask, kb, BN)
                        acc += (tl.dot(a, xt) * d[:, None] - tl.dot(mn, bs) * dmin[:, None]) * dx[None, :]
                        if TWO:
                            a2, mn2, d2, dmin2 = _q4_k_wblock(w2_ptr, row_off, rmask, kb, BN)
                            acc2 += (tl.dot(a2, xt) * d2[:, None] - tl.dot(mn2, bs) * dmin2[:, None]) * dx[None, :]
    return acc, acc2


@triton.jit
def _store_tile(acc, y_ptr, yoff, ymask, ws_ptr, cnt_ptr, tile_id, pid_k,
                SPLIT: tl.constexpr, BN: tl.constexpr, TQ: tl.constexpr):
    """Store one output tile. With SPLIT > 1 the tile is a partial sum: it goes to the workspace
    and the last of the SPLIT programs of this tile to arrive (atomic ticket) adds the partials
    in the fixed order 0..SPLIT-1, stores, and resets the ticket for the next launch."""
    if SPLIT == 1:
        tl.store(y_ptr + yoff, acc, mask=ymask)
    else:
        tile = tl.arange(0, BN)[:, None] * TQ + tl.arange(0, TQ)[None, :]
        tl.store(ws_ptr + (tile_id * SPLIT + pid_k).to(tl.int64) * (BN * TQ) + tile, acc)
        tl.debug_barrier()                                   # all partial stores before the ticket
        ticket = tl.atomic_add(cnt_ptr + tile_id, 1)         # acq_rel, gpu scope
        if ticket == SPLIT - 1:
            tot = tl.zeros([BN, TQ], tl.float32)
            for s in range(SPLIT):
                tot += tl.load(ws_ptr + (tile_id * SPLIT + s).to(tl.int64) * (BN * TQ) + tile,
                               cache_modifier=".cg")
            tl.store(y_ptr + yoff, tot, mask=ymask)
            tl.atomic_xchg(cnt_ptr + tile_id, 0)


# ================================================================================================
# dense linear: y[T, N] = quant(x) @ W^T, optional grouped input, optional split-K
# ================================================================================================
@triton.jit
def _linear_kernel(w_ptr, stride_wn, x_ptr, xq_ptr, xd_ptr, xbs_ptr, stride_xt, y_ptr, stride_yt,
                   ws_ptr, cnt_ptr, grid_ptr, sign_ptr, N, T, KB, kb_per_split, rows_per_group, group_in,
                   QT: tl.constexpr, BN: tl.constexpr, TQ: tl.constexpr, NB: tl.constexpr,
                   SPLIT: tl.constexpr, MMA: tl.constexpr, PRE: tl.constexpr,
                   PDL: tl.constexpr = False):
    pdl_start(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    row_off = rows.to(tl.int64) * stride_wn
    grp = (pid_n * BN) // rows_per_group          # a tile never straddles two groups
    tok = tl.arange(0, TQ)
    xmask = tok < T
    x_off = tok.to(tl.int64) * stride_xt + grp.to(tl.int64) * group_in
    kb0 = pid_k * kb_per_split
    kb1 = tl.minimum(kb0 + kb_per_split, KB)
    acc, _ = _mv_tile(w_ptr, w_ptr, row_off, rmask, x_ptr, xq_ptr, xd_ptr, xbs_ptr, x_off, xmask,
                      kb0, kb1, grid_ptr, sign_ptr, QT, BN, TQ, NB, MMA, False, PRE)
    yoff = tok[None, :].to(tl.int64) * stride_yt + rows[:, None]
    ymask = rmask[:, None] & xmask[None, :]
    _store_tile(acc, y_ptr, yoff, ymask, ws_ptr, cnt_ptr, pid_n, pid_k, SPLIT, BN, TQ)


# ================================================================================================
# Q8_0 decode matvec on the split layout (one token)
# ================================================================================================
# A GGUF Q8_0 block is 34 bytes (f16 scale, then 32 int8), so a block's quants never start on a
# 4-byte boundary and the tile kernel above reads them a byte at a time: for one token, where the
# matvec is nothing but weight streaming, that caps it far below the memory bandwidth. Here the
# weight is re-laid out once on the device (q8_0_split: the same bytes as int8 quants [N, K] and
# f16 scales [N, K/32]) so each thread issues 16-byte loads. The activation is Q8_0-quantised
# in the prologue (bit-identical to the twin), each block's products are summed exactly in
# integers and scaled by d_x * d_w: the twin's result up to float32 summation order.
@triton.jit
def _q8s_matvec_kernel(q_ptr, d_ptr, x_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, k_per_split,
                       rows_per_group, group_in, nw_ptr, eps,
                       BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                       NORM: tl.constexpr, KP: tl.constexpr, DP4A: tl.constexpr = False):
    """NORM: the input is rms_norm(x, nw) (numerics.rms_norm: float64 sum of squares, then
    (x * s) * nw); every program computes s over the whole row x [K] (KP = K rounded up to a
    power of two), so the norm costs no launch of its own.
    The weight is read as int32 words (4 quants each) against the Q8_0 activation packed the same
    way, one dp4a per word: each 32-block's sum is an exact integer, then times d_x * d_w. (A
    float32 per quant, the earlier form, holds 4x the registers per weight byte: 17.2 against
    12.8 us for attn_q_b on an H200, bench/results/kernels_h200_s5_i8_20261129.json.)"""
    NBK: tl.constexpr = BK // 32
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    grp = (pid_n * BN) // rows_per_group          # a tile never straddles two groups
    xb = grp.to(tl.int64) * group_in
    k0 = pid_k * k_per_split
    k1 = tl.minimum(k0 + k_per_split, K)
    kk = tl.arange(0, BK)
    jj = tl.arange(0, NBK)
    drow = d_ptr + rows.to(tl.int64)[:, None] * (K // 32)
    qrow32 = q_ptr.to(tl.pointer_type(tl.int32)) + rows.to(tl.int64)[:, None] * (K // 4)
    ww = tl.arange(0, BK // 4)
    acc = tl.zeros([BN, NBK], tl.float32)
    if NORM:
        xa = tl.arange(0, KP)
        xr = tl.load(x_ptr + xa, mask=xa < K, other=0.0).to(tl.float64)
        rs = rms_from_squares(xr * xr, K, eps)
    for k in range(k0, k1, BK):
        x = tl.load(x_ptr + xb + k + kk)
        if NORM:
            x = (x * rs) * tl.load(nw_ptr + k + kk)
        xq, xd = _q8_0_quant(tl.reshape(x, (1, NBK, 32)))
        dw = tl.load(drow + k // 32 + jj[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        q4 = tl.reshape(xq, (BK // 4, 4)) & 255
        xw = tl.sum(q4 << (8 * tl.arange(0, 4))[None, :], axis=1)                     # [BK/4] words
        qw = tl.load(qrow32 + (k // 4) + ww[None, :], mask=rmask[:, None], other=0)   # [BN, BK/4]
        p = _dp4a(qw, tl.broadcast_to(xw[None, :], (BN, BK // 4)), DP4A)
        s = tl.sum(tl.reshape(p, (BN, NBK, 8)), axis=2).to(tl.float32)               # exact
        acc += s * tl.reshape(xd, (1, NBK)) * dw
    y = tl.reshape(tl.sum(acc, axis=1), (BN, 1))
    yoff = rows[:, None].to(tl.int64)
    _store_tile(y, y_ptr, yoff, rmask[:, None], ws_ptr, cnt_ptr, pid_n, pid_k, SPLIT, BN, 1)


# ================================================================================================
# routed experts
# ================================================================================================
@triton.jit
def _id_table(ids_ptr, T, K, TQ: tl.constexpr, KP: tl.constexpr):
    """ids as [TQ, KP] (-1 outside), and each slot's rank among the earlier slots of its token
    that hold the same id (0 unless a token lists an expert twice)."""
    tok = tl.arange(0, TQ)
    ks = tl.arange(0, KP)
    idt = tl.load(ids_ptr + tok[:, None] * K + ks[None, :],
                  mask=(tok[:, None] < T) & (ks[None, :] < K), other=-1).to(tl.int32)
    same = (idt[:, :, None] == idt[:, None, :]) & (ks[None, None, :] < ks[None, :, None])
    rank = tl.sum(same.to(tl.int32), axis=2)
    return idt, rank


@triton.jit
def _group(idt, rank, p, K, TQ: tl.constexpr, KP: tl.constexpr):
    """The work group of pair p = (t, k): every token's slot holding the same expert e with the
    same rank. Returns (e, leader, has [TQ], slot [TQ]); leader: p's token is the group's first,
    so this pair's program computes the group (each expert's rows are read once per rank)."""
    tok = tl.arange(0, TQ)
    ks = tl.arange(0, KP)
    tp = p // K
    kp = p - tp * K
    at = (tok[:, None] == tp) & (ks[None, :] == kp)
    e = tl.sum(tl.sum(tl.where(at, idt, 0), axis=1), axis=0)
    r = tl.sum(tl.sum(tl.where(at, rank, 0), axis=1), axis=0)
    sel = (idt == e) & (rank == r)
    has = tl.max(sel.to(tl.int32), axis=1) > 0
    slot = tl.sum(tl.where(sel, ks[None, :], 0), axis=1)
    first = tl.min(tl.where(has, tok, TQ), axis=0)
    return e, (e >= 0) & (first == tp), has, slot


@triton.jit
def _expert_kernel(w_ptr, w2_ptr, stride_we, stride_wn, x_ptr, xq_ptr, xd_ptr, xbs_ptr,
                   stride_xt, stride_xk, ids_ptr, rw_ptr, out_ptr, stride_ot, stride_ok,
                   ws_ptr, cnt_ptr, grid_ptr, sign_ptr, N, T, K, P, KB, clamp,
                   QT: tl.constexpr, BN: tl.constexpr, TQ: tl.constexpr, KP: tl.constexpr,
                   NB: tl.constexpr, MMA: tl.constexpr, MODE: tl.constexpr,
                   SPLIT: tl.constexpr, PRE: tl.constexpr):
    """ids [T, K] (contiguous, -1 = skip); the activation row of (t, k) is at element offset
    t*stride_xt + k*stride_xk (stride_xk = 0: shared by the slots).
    Pairs p = t*K + k are grouped by (expert, rank of the slot among the token's slots with the
    same expert); a group's first pair leads it: its program multiplies the expert's rows (read
    once) with the activation rows of all the group's tokens (the tile's token columns).
    MODE_SLOTS / MODE_SWIGLU: grid (P, row tiles); output [T, K, N]; pairs with id -1 get zeros.
    MODE_SUM: grid (row tiles, SPLIT). Program (n, s) adds the groups led by pairs s, s+SPLIT,
    ... in that order; the SPLIT partials are added in a fixed order. Output [T, N]."""
    tok = tl.arange(0, TQ)
    if MODE == 1:
        pid_n = tl.program_id(0)
    else:
        pid_n = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    row_off = rows.to(tl.int64) * stride_wn
    if MODE == 1:
        pid_k = tl.program_id(1)
        tot = tl.zeros([BN, TQ], tl.float32)
        idt, rank = _id_table(ids_ptr, T, K, TQ, KP)
        for p in range(pid_k, P, SPLIT):
            e, leader, has, slot = _group(idt, rank, p, K, TQ, KP)
            if leader:
                x_off = tok.to(tl.int64) * stride_xt + slot.to(tl.int64) * stride_xk
                eoff = e.to(tl.int64) * stride_we
                acc, _ = _mv_tile(w_ptr + eoff, w_ptr + eoff, row_off, rmask, x_ptr, xq_ptr, xd_ptr, xbs_ptr,
                                  x_off, has, 0, KB, grid_ptr, sign_ptr, QT, BN, TQ, NB, MMA, False, PRE)
                tot += acc
        yoff = tok[None, :].to(tl.int64) * stride_ot + rows[:, None]
        _store_tile(tot, out_ptr, yoff, rmask[:, None] & (tok < T)[None, :], ws_ptr, cnt_ptr,
                    pid_n, pid_k, SPLIT, BN, TQ)
    else:
        p = tl.program_id(0)
        idt, rank = _id_table(ids_ptr, T, K, TQ, KP)
        e, leader, has, slot = _group(idt, rank, p, K, TQ, KP)
        if e < 0:   # skipped slot: zeros
            t0 = p // K
            k0 = p - t0 * K
            tl.store(out_ptr + t0.to(tl.int64) * stride_ot + k0.to(tl.int64) * stride_ok + rows,
                     tl.zeros([BN], tl.float32), mask=rmask)
        elif leader:
            x_off = tok.to(tl.int64) * stride_xt + slot.to(tl.int64) * stride_xk
            eoff = e.to(tl.int64) * stride_we
            acc, acc2 = _mv_tile(w_ptr + eoff, w2_ptr + eoff, row_off, rmask, x_ptr, xq_ptr, xd_ptr, xbs_ptr,
                                 x_off, has, 0, KB, grid_ptr, sign_ptr, QT, BN, TQ, NB, MMA, MODE == 2, PRE)
            if MODE == 2:   # clamped SwiGLU times the router weight (numerics.swiglu_clamped)
                g = tl.minimum(acc, clamp)
                u = tl.minimum(tl.maximum(acc2, -clamp), clamp)
                rw = tl.load(rw_ptr + tok * K + slot, mask=has, other=0.0)
                acc = g * tl.sigmoid(g) * u * rw[None, :]
            ooff = tok[None, :].to(tl.int64) * stride_ot + slot[None, :].to(tl.int64) * stride_ok + rows[:, None]
            tl.store(out_ptr + ooff, acc, mask=rmask[:, None] & has[None, :])


# ================================================================================================
# routed experts at few tokens: packed-integer dot products, no tensor cores
# ================================================================================================
# At T*K <= SMALL_MAX_PAIRS the expert launch is a pure weight stream (each selected expert's rows
# meet one or a few activation rows), so tensor-core tiles only add padding and element-wise
# table gathers. Here every 4 weights become one packed int32 of signed bytes, multiplied with
# 4 packed Q8_K activation bytes by one dp4a (sum of the four byte products), summed exactly in
# int32 per super-block and scaled once in float32:
#   IQ2_XXS: each group of 8 weights = one 8-byte row of the magnitude grid (two int32 words,
#            a 2 KB table) with the signs applied bytewise: sign table word m holds 0xFF in the
#            negative bytes, and (g ^ m) + (m & 0x01010101) negates exactly those bytes (the
#            magnitudes are 8..43, so no byte carries). Per super-block
#            sum_b (2 s_b + 1) * sum(grid*sign*q8) (|.| < 2**26), times d * d_x / 8.
#   Q2_K:    (qs word >> 2j) & 0x03030303 are 4 consecutive 2-bit weights; per 16-block sums times
#            the 4-bit scales, minus the 4-bit mins times the Q8_K block sums (both exact ints),
#            then d * A - dmin * B, times d_x.
# Identical results in any order: every block sum is an exact integer, so the kernel differs from
# the twin only by the float32 rounding of the per-super-block scaling and the final sums.
@triton.jit
def _dp4a(a, b, DP4A: tl.constexpr):
    """Per int32 lane: the sum of the four products of the signed bytes of a and b.
    DP4A: the PTX instruction (CUDA); otherwise the same in shifts and multiplies (the CPU
    interpreter cannot run inline assembly)."""
    if DP4A:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r",
                                         [a, b, tl.zeros_like(a)], dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = ((a << 24) >> 24) * ((b << 24) >> 24)
        for i in tl.static_range(1, 4):
            r += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return r


@triton.jit
def _iq2_xxs_sb_dot(w_ptr, base, wmask, xw_ptr, xw_off, xmask, grid_ptr, sign_ptr, DP4A: tl.constexpr):
    """IQ2_XXS super-block at byte offsets base [S, R] (2-aligned) against the packed Q8_K
    activation words at xw_off [S, 1] (64 words). Returns (int32 [S, R] = sum_b (2s_b+1) sum
    grid*sign*q, d [S, R]).
    Loads are what bound this kernel (the bytes are few): each sub-block's 8 bytes come as four
    16-bit words, each grid row as one 64-bit gather (grid_ptr: int64 [256], element e in byte
    e), and the sign bytes are computed, not looked up: ksigns[i] = i | parity(i) << 7, and
    bit e of it becomes the byte mask 0xFF of element e. sign_ptr is unused. (A 512-byte table of
    2-bit codes unpacked with shifts instead of the 2 KB byte table measured slower on an H200:
    50.4 against 39.3 us for the TP=1 gate/up, bench/results/kernels_h200_s5_i8_20261129.json.)"""
    b = tl.arange(0, 8)
    k4 = tl.arange(0, 4)[None, None, None, :]
    b5 = b[None, None, :, None, None]
    k5 = tl.arange(0, 4)[None, None, None, :, None]
    h5 = tl.arange(0, 2)[None, None, None, None, :]
    d = tl.load(_f16_ptr(w_ptr) + (base >> 1), mask=wmask, other=0.0).to(tl.float32)
    u16 = w_ptr.to(tl.pointer_type(tl.uint16))
    sbw = (base >> 1)[:, :, None] + 1 + 4 * b[None, None, :]                  # [S, R, 8] word index
    m3 = wmask[:, :, None]
    g01 = tl.load(u16 + sbw, mask=m3, other=0).to(tl.int32)
    g23 = tl.load(u16 + sbw + 1, mask=m3, other=0).to(tl.int32)
    lo = tl.load(u16 + sbw + 2, mask=m3, other=0).to(tl.int32)
    hi = tl.load(u16 + sbw + 3, mask=m3, other=0).to(tl.int32)
    t = lo | (hi << 16)                                                     # 4 x 7 sign bits, scale
    gi = ((g01 | (g23 << 16))[:, :, :, None] >> (8 * k4)) & 255             # [S, R, 8, 4] grid rows
    g64 = tl.load(grid_ptr + gi)                                            # 8 magnitudes, bytes
    g_lo = g64.to(tl.int32)
    g_hi = (g64 >> 32).to(tl.int32)
    sig = (t[:, :, :, None] >> (7 * k4)) & 127                              # [S, R, 8, 4]
    par = sig ^ (sig >> 4)
    par = par ^ (par >> 2)
    par = (par ^ (par >> 1)) & 1
    bits = sig | (par << 7)                                                 # ksigns[sig]
    m_lo = (((bits & 15) * 0x00204081) & 0x01010101) * 255                  # elements 0-3
    m_hi = ((((bits >> 4) & 15) * 0x00204081) & 0x01010101) * 255           # elements 4-7
    gw = tl.join(g_lo, g_hi)                                                # [S, R, 8, 4, 2]
    mw = tl.join(m_lo, m_hi)
    sw = (gw ^ mw) + (mw & 0x01010101)                                      # bytes negated where set
    xw = tl.load(xw_ptr + xw_off[:, :, None, None, None] + 8 * b5 + 2 * k5 + h5,
                 mask=xmask[:, :, None, None, None], other=0)              # [S, 1, 8, 4, 2]
    p = tl.sum(tl.sum(_dp4a(sw, xw, DP4A), axis=4), axis=3)                # [S, R, 8]
    return tl.sum(p * (2 * ((t >> 28) & 15) + 1), axis=2), d


@triton.jit
def _q2_k_sb_dot(w_ptr, base, wmask, xw_ptr, xw_off, xbs_ptr, xbs_off, xmask, DP4A: tl.constexpr):
    """Q2_K super-block at byte offsets base [S, R] (4-aligned) against the packed Q8_K words at
    xw_off [S, 1] and the 16 block sums at xbs_off [S, 1]. Returns (A, B int32 [S, R], d, dmin)
    with A = sum_s sc_s (q.x)_s and B = sum_s min_s bsum_s.
    Axes (n, h, w, j): qs word 8n + 4h + w holds, at bits 2j of each byte, the elements
    128n + 32j + 16h + 4w + (0..3), which lie in the 16-block s = 8n + 2j + h."""
    n6 = tl.arange(0, 2)[None, None, :, None, None, None]
    h6 = tl.arange(0, 2)[None, None, None, :, None, None]
    w6 = tl.arange(0, 4)[None, None, None, None, :, None]
    j6 = tl.arange(0, 4)[None, None, None, None, None, :]
    n5 = tl.arange(0, 2)[None, None, :, None, None]
    h5 = tl.arange(0, 2)[None, None, None, :, None]
    j5 = tl.arange(0, 4)[None, None, None, None, :]
    m6 = wmask[:, :, None, None, None, None]
    u32 = w_ptr.to(tl.pointer_type(tl.int32))
    qw = tl.load(u32 + ((base + 16) >> 2)[:, :, None, None, None, None] + 8 * n6 + 4 * h6 + w6,
                 mask=m6, other=0)                                          # [S, R, 2, 2, 4, 1]
    q4 = (qw >> (2 * j6)) & 0x03030303                                      # [S, R, 2, 2, 4, 4]
    xw = tl.load(xw_ptr + xw_off[:, :, None, None, None, None] + 32 * n6 + 8 * j6 + 4 * h6 + w6,
                 mask=xmask[:, :, None, None, None, None], other=0)        # [S, 1, 2, 2, 4, 4]
    p = tl.sum(_dp4a(q4, xw, DP4A), axis=4)                                 # [S, R, 2, 2, 4]
    s = 8 * n5 + 2 * j5 + h5
    m5 = wmask[:, :, None, None, None]
    sc = tl.load(w_ptr + base[:, :, None, None, None] + s, mask=m5, other=0).to(tl.int32)
    bs = tl.load(xbs_ptr + xbs_off[:, :, None, None, None] + s, mask=xmask[:, :, None, None, None],
                 other=0)                                                   # [S, 1, 2, 2, 4]
    a = tl.sum(tl.sum(tl.sum(p * (sc & 15), axis=4), axis=3), axis=2)
    bm = tl.sum(tl.sum(tl.sum((sc >> 4) * bs, axis=4), axis=3), axis=2)
    d = tl.load(_f16_ptr(w_ptr) + ((base + 80) >> 1), mask=wmask, other=0.0).to(tl.float32)
    dmin = tl.load(_f16_ptr(w_ptr) + ((base + 82) >> 1), mask=wmask, other=0.0).to(tl.float32)
    return a, bm, d, dmin


@triton.jit
def _expert_small_kernel(w_ptr, w2_ptr, stride_we, stride_wn, xw_ptr, xd_ptr, xbs_ptr, xrow_t, xrow_k,
                         ids_ptr, rw_ptr, out_ptr, stride_ot, stride_ok, grid_ptr, sign_ptr,
                         N, K, KB, clamp,
                         QT: tl.constexpr, R: tl.constexpr, S: tl.constexpr, NB: tl.constexpr,
                         MODE: tl.constexpr, DP4A: tl.constexpr):
    """Grid (T * cdiv(K, S), cdiv(N, R)): program (p, n) takes token t = p // cdiv(K, S), its S
    slots from (p % cdiv(K, S)) * S, and rows n*R .. n*R+R-1 of each slot's expert.
    The activation of (t, k) is row t*xrow_t + k*xrow_k of the pre-quantised Q8_K buffers: packed
    int8 words xw [rows, KB*64], scales xd [rows, KB], block sums xbs [rows, KB*16].
    MODE_SLOTS: out [T, K, N], zeros for id -1. MODE_SUM: S >= K, out [T, N] = the sum over the
    slots (one reduction over the slot axis, no atomics). MODE_SWIGLU: w2 = up, out [T, K, N] =
    swiglu_clamped(gate, up) * router weight."""
    pid = tl.program_id(0)
    ngrp = tl.cdiv(K, S)
    t = pid // ngrp
    k = (pid - t * ngrp) * S + tl.arange(0, S)
    kmask = k < K
    e = tl.load(ids_ptr + t * K + k, mask=kmask, other=-1).to(tl.int64)
    live = kmask & (e >= 0)
    rows = tl.program_id(1) * R + tl.arange(0, R)
    rmask = rows < N
    wbase = (tl.maximum(e, 0) * stride_we)[:, None] + rows.to(tl.int64)[None, :] * stride_wn   # [S, R]
    wmask = live[:, None] & rmask[None, :]
    xrow = t.to(tl.int64) * xrow_t + k.to(tl.int64) * xrow_k                                   # [S]
    xm = live[:, None]
    acc = tl.zeros([S, R], tl.float32)
    acc2 = tl.zeros([S, R], tl.float32)
    for kb0 in range(0, KB, NB):
        for jj in tl.static_range(NB):
            kb = kb0 + jj
            dx = tl.load(xd_ptr + xrow * KB + kb, mask=live, other=0.0)[:, None]
            xw_off = (xrow * (KB * 64) + kb * 64)[:, None]
            if QT == 16:  # IQ2_XXS
                isum, d = _iq2_xxs_sb_dot(w_ptr, wbase + kb * 66, wmask, xw_ptr, xw_off, xm,
                                          grid_ptr, sign_ptr, DP4A)
                acc += isum.to(tl.float32) * (d * 0.125) * dx
                if MODE == 2:
                    isum2, d2 = _iq2_xxs_sb_dot(w2_ptr, wbase + kb * 66, wmask, xw_ptr, xw_off, xm,
                                                grid_ptr, sign_ptr, DP4A)
                    acc2 += isum2.to(tl.float32) * (d2 * 0.125) * dx
            else:  # Q2_K
                xbs_off = (xrow * (KB * 16) + kb * 16)[:, None]
                a, bm, d, dmin = _q2_k_sb_dot(w_ptr, wbase + kb * 84, wmask, xw_ptr, xw_off,
                                              xbs_ptr, xbs_off, xm, DP4A)
                acc += (a.to(tl.float32) * d - bm.to(tl.float32) * dmin) * dx
                if MODE == 2:
                    a2, bm2, d2, dmin2 = _q2_k_sb_dot(w2_ptr, wbase + kb * 84, wmask, xw_ptr, xw_off,
                                                      xbs_ptr, xbs_off, xm, DP4A)
                    acc2 += (a2.to(tl.float32) * d2 - bm2.to(tl.float32) * dmin2) * dx
    if MODE == 1:
        tl.store(out_ptr + t.to(tl.int64) * stride_ot + rows, tl.sum(acc, axis=0), mask=rmask)
    else:
        if MODE == 2:   # clamped SwiGLU times the router weight (numerics.swiglu_clamped)
            g = tl.minimum(acc, clamp)
            u = tl.minimum(tl.maximum(acc2, -clamp), clamp)
            rw = tl.load(rw_ptr + t * K + k, mask=live, other=0.0)
            acc = g * tl.sigmoid(g) * u * rw[:, None]
        ooff = (t.to(tl.int64) * stride_ot + k.to(tl.int64) * stride_ok)[:, None] + rows[None, :]
        tl.store(out_ptr + ooff, tl.where(xm, acc, 0.0), mask=kmask[:, None] & rmask[None, :])


@triton.jit
def _q2k_sum_kernel(w_ptr, stride_we, stride_wn, xw_ptr, xd_ptr, xbs_ptr, xrow_t, xrow_k, ids_ptr,
                    out_ptr, stride_ot, N, K, KB: tl.constexpr, BN: tl.constexpr, DP4A: tl.constexpr):
    """Routed Q2_K down projection for few tokens, summed over the slots: grid (T, cdiv(N, BN)).
    Program (t, n) walks the K slots of token t (skipping id -1) and the super-blocks of rows
    n*BN.. of each slot's expert, keeping a [BN] float32 accumulator; no slot padding, no
    atomics. Per super-block (84 bytes, 4-aligned): qs word w (of 16) holds, at bits 2j of its
    4 bytes, the elements 128*(w//8) + 32j + 4*(w%8) + (0..3), i.e. one packed Q8_K activation
    word; their 16-element block is s = 8*(w//8) + 2j + (w%8)//4. Integer sums per block are
    exact; A = sum_s sc_s (q.x)_s and B = sum_s min_s bsum_s as in _q2_k_sb_dot."""
    t = tl.program_id(0)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < N
    w16 = tl.arange(0, 16)
    j4 = tl.arange(0, 4)
    xword = ((w16 // 8) * 32 + (w16 % 8))[:, None] + 8 * j4[None, :]            # [16, 4]
    sidx = (8 * tl.arange(0, 2)[:, None, None] + tl.arange(0, 2)[None, :, None]
            + 2 * tl.arange(0, 4)[None, None, :])                                # [2, 2, 4] (wh, wq, j)
    u32 = w_ptr.to(tl.pointer_type(tl.int32))
    acc = tl.zeros([BN], tl.float32)
    for k in range(0, K):
        e = tl.load(ids_ptr + t * K + k).to(tl.int64)
        if e >= 0:
            xrow = t.to(tl.int64) * xrow_t + k * xrow_k
            wrow = e * stride_we + rows.to(tl.int64) * stride_wn                 # [BN] byte offsets
            for kb in tl.static_range(KB):      # unrolled: all super-blocks' loads in flight
                base = wrow + kb * 84
                qw = tl.load(u32 + ((base + 16) >> 2)[:, None] + w16[None, :], mask=rmask[:, None], other=0)
                q4 = (qw[:, :, None] >> (2 * j4)[None, None, :]) & 0x03030303   # [BN, 16, 4]
                xw = tl.load(xw_ptr + xrow * (KB * 64) + kb * 64 + xword)          # [16, 4]
                p = _dp4a(q4, tl.broadcast_to(xw[None, :, :], (BN, 16, 4)), DP4A)
                ps = tl.sum(tl.reshape(p, (BN, 2, 2, 4, 4)), axis=3)              # [BN, wh, wq, j]
                sc = tl.load(w_ptr + base[:, None, None, None] + sidx[None, :, :, :],
                             mask=rmask[:, None, None, None], other=0).to(tl.int32)
                bs = tl.load(xbs_ptr + xrow * (KB * 16) + kb * 16 + sidx)          # [2, 2, 4]
                a = tl.sum(tl.sum(tl.sum(ps * (sc & 15), axis=3), axis=2), axis=1)
                bm = tl.sum(tl.sum(tl.sum((sc >> 4) * bs[None, :, :, :], axis=3), axis=2), axis=1)
                d = tl.load(_f16_ptr(w_ptr) + ((base + 80) >> 1), mask=rmask, other=0.0).to(tl.float32)
                dmin = tl.load(_f16_ptr(w_ptr) + ((base + 82) >> 1), mask=rmask, other=0.0).to(tl.float32)
                dx = tl.load(xd_ptr + xrow * KB + kb)
                acc += (a.to(tl.float32) * d - bm.to(tl.float32) * dmin) * dx
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + rows, acc, mask=rmask)


# ================================================================================================
# host side
# ================================================================================================
@dataclass(frozen=True)
class Cfg:
    """Launch shape.
    bn     output rows per program (a power of two >= 16 where a tensor-core dot is used)
    nb     blocks per K step (unrolled): F16 elements, Q8_0 32-blocks, K-quant 256-super-blocks
    split  programs along K (linear) or over the (token, slot) pairs (expert_linear sum_slots)
    mma    Q8_0 only: int8 tensor-core path instead of float FMA
    pre    quantise the activation once in a separate launch instead of in every program
    tq_min smallest token tile for the dot paths (0: the module's TQ_MIN)
    q8s    Q8_0, one token: the split-layout kernel (_q8s_matvec_kernel; bn rows per program,
           nb 32-blocks per K step, split K programs) instead of the tile kernel
    q2s    Q2_K routed down summed over slots, T <= Q2K_SUM_MAX_T: True = _q2k_sum_kernel (bn
           rows per program, warps), False = the tile kernel, None = the default rule (the
           kernel for rows of <= Q2K_SUM_MAX_IN inputs)
    small  routed experts: None = the packed-integer few-token path where it applies (SMALL_TYPES,
           T*K <= SMALL_MAX_PAIRS), True = also for Q2_K (kept for tests and sweeps), False = never. On that path bn = rows per program,
           nb = super-blocks per unrolled step, split = slots per program (slots / swiglu modes;
           the slot sum always takes all K slots in one program), mma / pre / tq_min are unused.
    """
    bn: int = 32
    nb: int = 8
    split: int = 1
    mma: bool = False
    pre: bool = False
    warps: int = 4
    stages: int = 2
    tq_min: int = 0          # 0: TQ_MIN
    small: bool | None = None
    q8s: bool = True         # Q8_0 at T = 1: the split-layout kernel (bn rows, nb*32 = BK)
    q2s: bool | None = None  # Q2_K slot sum, few tokens: _q2k_sum_kernel (None: by input width)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n."""
    p = 1
    while p < cap and n % (2 * p) == 0:
        p *= 2
    return p


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=8)
def _iq2_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ2_XXS lookup tables built from gguf's: fp16 bit patterns of the 256x8 grid magnitudes,
    and for each 7-bit sign index the 8 sign bits (0x8000 = negative) of ksigns (the index plus
    its parity bit)."""
    import numpy as np
    from gguf.quants import IQ2_XXS as _G
    _G.init_grid()
    grid = np.asarray(_G.grid, dtype=np.float32).reshape(256, 8).astype(np.float16).view(np.int16)
    ks = np.frombuffer(_G.ksigns, dtype=np.uint8)
    bits = (ks[:, None] >> np.arange(8, dtype=np.uint8)[None, :]) & 1
    sign = np.where(bits == 1, np.int16(-32768), np.int16(0)).astype(np.int16)
    return (torch.from_numpy(grid.reshape(-1).copy()).to(device),
            torch.from_numpy(sign.reshape(-1).copy()).to(device))


@functools.lru_cache(maxsize=8)
def _iq2_grid64(device: torch.device) -> torch.Tensor:
    """The packed-integer path's IQ2_XXS grid: int64 [256], the 8 magnitudes of row g in bytes
    0..7 (little-endian), so one 64-bit load fetches a row."""
    import numpy as np
    from gguf.quants import IQ2_XXS as _G
    _G.init_grid()
    grid = np.asarray(_G.grid, dtype=np.float32).reshape(256, 8)
    assert np.array_equal(grid, np.rint(grid)) and grid.min() >= 1 and grid.max() <= 127
    return torch.from_numpy(np.ascontiguousarray(grid.astype(np.uint8)).view("<i8").reshape(-1).copy()).to(device)


_TICKET_BUFFERS: dict = {}   # (device index, stream handle) -> int32 [_TICKETS]; never evicted


def _tickets(device: torch.device) -> torch.Tensor:
    """Split tickets, one per output tile. Every launch leaves them at zero, so one zeroed buffer
    serves all launches issued on one stream; each stream has its own (ds4tp.streams runs work
    on two streams at once). Buffers are kept for the process's life: a captured CUDA graph
    holds their addresses."""
    device = torch.device(device)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    buf = _TICKET_BUFFERS.get(key)
    if buf is None:
        buf = _TICKET_BUFFERS[key] = torch.zeros(_TICKETS, dtype=torch.int32, device=device)
    return buf


def _raw(w) -> torch.Tensor:
    """The raw bytes in GGUF's order (QTensor.gguf_raw: a copy for rows re-ordered for the CUDA C
    decode kernel) with a contiguous byte axis (other strides are passed to the kernel)."""
    raw = w.gguf_raw()
    if raw.stride(-1) != 1 or raw.data_ptr() % 2:
        raw = raw.contiguous()
    return raw


def default_cfg(qtype: int, n_rows: int, n_in: int, T: int, device, mult: int = 1,
                can_split: bool = True) -> Cfg:
    """Heuristic launch shape (a starting point: bench/kernels_check.py --sweep measures others).
    Row tiles shrink, then K is split, until there are about two programs per SM (four for small
    matrices); `mult` counts independent programs per row tile (e.g. the experts of an expert
    launch). Tuned on the H200 sweep (bench/results/kernels_h200_run1.json):
      * the tensor-core dot paths (Q8_0 mma, F16 at T > 2) keep their row tile and split K
        instead (attn_q_a / attn_out_a / attn_out_b at T = 16: about 2x faster);
      * matrices of <= 4M weights aim at four programs per SM (attn_q_a 8.3 -> 7.0 us,
        compressor 7.3 -> 6.2 us at T = 1);
      * the Q8_0 float path quantises the activation once (pre) when it has >= 4 row tiles per
        SM, instead of in every program (output head 332 -> 278 us, attn_q_b 25.9 -> 23.8 us)."""
    sms = _sm_count(torch.device(device))
    if qtype == F16:
        cfg = Cfg(bn=32 if T <= 2 else 64, nb=128 if T == 1 else 32)
    elif qtype == Q8_0:
        mma = T > FMA_MAX_T
        cfg = Cfg(bn=64 if mma else 32, nb=4 if mma else 8, mma=mma, pre=T >= PRE_MIN_T_Q8_0)
    else:
        cfg = Cfg(bn=64, nb=1, pre=T >= PRE_MIN_T_KQ)
    cfg = _fit(cfg, qtype, n_in)
    target = (4 if n_rows * n_in <= SMALL_MATRIX else 2) * sms
    keep_bn = can_split and (cfg.mma or (qtype == F16 and T > 2))
    bn = cfg.bn
    while bn > 16 and (bn >= 2 * n_rows if keep_bn else triton.cdiv(n_rows, bn) * mult < target):
        bn //= 2
    tiles = triton.cdiv(n_rows, bn) * mult
    split = 1
    if can_split and tiles < target:
        steps = n_in // _EPB[qtype] // cfg.nb
        split = max(1, min(triton.cdiv(target, tiles), steps // 2, 32))
    pre = cfg.pre or (qtype == Q8_0 and can_split and not cfg.mma and tiles >= 4 * sms)
    return replace(cfg, bn=bn, split=split, pre=pre)


def _token_tile(c: Cfg, qtype: int, T: int) -> int:
    """Token columns per tile: T rounded up to a power of two; the dot paths (everything except
    the T = 1 float FMA paths of F16 and Q8_0) take at least tq_min."""
    tq = _pow2_at_least(T)
    if tq == 1 and (qtype == F16 or (qtype == Q8_0 and not c.mma)):
        return 1
    return max(tq, c.tq_min or TQ_MIN)


def _fit(cfg: Cfg, qtype: int, n_in: int) -> Cfg:
    """Make nb legal for this type and width (a power of two dividing the block count)."""
    kb = n_in // _EPB[qtype]
    return replace(cfg, nb=_pow2_divisor(kb, cfg.nb), mma=cfg.mma and qtype == Q8_0,
                   pre=cfg.pre and qtype != F16)


def _check_act(x: torch.Tensor, n_in: int, where: str) -> torch.Tensor:
    if x.dtype != torch.float32:
        raise ValueError(f"{where}: activation must be float32, got {x.dtype}")
    if x.shape[-1] != n_in:
        raise ValueError(f"{where}: activation width {x.shape[-1]} != {n_in}")
    if not x.is_contiguous():
        x = x.contiguous()
    return x


def _prequant(qtype: int, x2: torch.Tensor):
    """(q, d, block sums) of x2 [R, n] for weight type qtype, with dummies where unused."""
    if qtype == Q8_0:
        q, d = quantize_q8_0(x2)
        return q, d, d
    return quantize_q8_k(x2)


def _linear_args(w, x: torch.Tensor, groups: int, where: str):
    """Checked (n_out, n_in, contiguous x) of a linear launch; shared by triton_gemm."""
    if w.qtype not in SUPPORTED:
        raise ValueError(f"{where}: no Triton kernel for {type_name(w.qtype)}")
    if len(w.shape) != 2:
        raise ValueError(f"{where} expects a 2-D weight, got shape {w.shape}")
    n_out, n_in = w.shape
    if groups < 1 or n_out % groups:
        raise ValueError(f"{n_out} rows do not split into {groups} groups")
    if x.dim() != 2:
        raise ValueError(f"{where} expects x [T, in], got {tuple(x.shape)}")
    return n_out, n_in, _check_act(x, groups * n_in, where)


def linear(w, x: torch.Tensor, groups: int = 1, cfg: Cfg | None = None) -> torch.Tensor:
    """y [T, out] = act_quant(x) @ dequant(W)^T for w (out, in), x [T, groups*in] float32.

    groups > 1: W's rows form `groups` equal groups and group g multiplies the input columns
    [g*in, (g+1)*in) (DS4's grouped attention output A)."""
    n_out, n_in, x = _linear_args(w, x, groups, "linear")
    T = x.shape[0]
    y = torch.empty(T, n_out, dtype=torch.float32, device=x.device)
    if T == 0:
        return y
    if w.qtype == Q8_0 and T == 1 and (cfg is None or cfg.q8s):
        return _q8s_linear(w, x, y, groups, cfg)
    raw = _raw(w)
    grid_t, sign_t = _iq2_tables(x.device) if w.qtype == IQ2_XXS else (y, y)
    rows_per_group = n_out // groups
    kb = n_in // _EPB[w.qtype]
    for t0 in range(0, T, TQ_MAX):
        xs, ys = x[t0:t0 + TQ_MAX], y[t0:t0 + TQ_MAX]
        Tc = xs.shape[0]
        c = _fit(cfg, w.qtype, n_in) if cfg else default_cfg(w.qtype, n_out, n_in, Tc, x.device)
        bn = min(c.bn, _pow2_divisor(rows_per_group, c.bn)) if groups > 1 else c.bn
        tq = _token_tile(c, w.qtype, Tc)
        per, split = _split_k(kb, c.nb, c.split)
        tiles = triton.cdiv(n_out, bn)
        ws, cnt = _split_buffers(split, tiles, bn, tq, x.device, ys)
        xq, xd, xbs = _prequant(w.qtype, xs) if c.pre else (xs, xs, xs)
        _linear_kernel[(tiles, split)](
            raw, raw.stride(-2), xs, xq, xd, xbs, xs.stride(0), ys, ys.stride(0), ws, cnt, grid_t, sign_t,
            n_out, Tc, kb, per, rows_per_group, n_in,
            QT=w.qtype, BN=bn, TQ=tq, NB=c.nb, SPLIT=split, MMA=c.mma, PRE=c.pre,
            num_warps=c.warps, num_stages=c.stages, **pdl.triton_args(x.device))
    return y


def q8_0_split(w) -> tuple[torch.Tensor, torch.Tensor]:
    """The split layout of a 2-D Q8_0 weight, built once and kept on the QTensor: quants uint8
    [N, K] (the int8 bytes as stored) and scales float16 [N, K/32]. Same bytes as raw."""
    got = w.kernel_cache.get("q8_0_split")
    if got is None:
        n, k = w.shape
        blocks = w.raw.reshape(n, k // 32, 34)
        d = blocks[..., :2].contiguous().view(torch.float16).reshape(n, k // 32)
        q = blocks[..., 2:].reshape(n, k).contiguous()
        got = w.kernel_cache["q8_0_split"] = (q, d)
    return got


def q8s_cfg(n_rows: int, n_in: int, device, bn: int = 16, bk: int = 512) -> Cfg:
    """Launch shape of the split-layout Q8_0 matvec: by default 16-row tiles and 512-wide K
    steps, K split until there are about four programs per SM. Measured on an H200 with the
    int8 path (bench/results/kernels_h200_s5_i8_20261129.json): against 1024-wide steps
    attn_q_b 11.8 vs 12.8 us, attn_out_a 13.4 vs 15.6, attn_out_b 15.1 vs 15.9, the output head
    131.6 vs 135.9, attn_q_a 6.1 vs 6.8."""
    bk = _pow2_divisor(n_in, bk)
    tiles = triton.cdiv(n_rows, bn)
    steps = n_in // bk
    split = max(1, min(triton.cdiv(4 * _sm_count(torch.device(device)), tiles), steps // 2, 32))
    return Cfg(bn=bn, nb=bk // 32, split=split, warps=4)


def _q8s_linear(w, x, y, groups: int, cfg: Cfg | None, norm=None, eps: float = 0.0):
    n_out, n_in = w.shape
    q, d = q8_0_split(w)
    c = cfg if cfg is not None else q8s_cfg(n_out, n_in, x.device)
    bk = 32 * _pow2_divisor(n_in // 32, c.nb)
    rows_per_group = n_out // groups
    bn = min(c.bn, _pow2_divisor(rows_per_group, c.bn)) if groups > 1 else c.bn
    per, split = _split_k(n_in, bk, c.split)
    tiles = triton.cdiv(n_out, bn)
    ws, cnt = _split_buffers(split, tiles, bn, 1, x.device, y)
    _q8s_matvec_kernel[(tiles, split)](q, d, x, y, ws, cnt, n_out, n_in, per, rows_per_group, n_in,
                                       x if norm is None else norm, eps,
                                       BN=bn, BK=bk, SPLIT=split, NORM=norm is not None,
                                       KP=triton.next_power_of_2(n_in) if norm is not None else 1,
                                       DP4A=x.is_cuda, num_warps=c.warps, num_stages=c.stages)
    return y


NORMED_MAX_IN = 1 << 14    # linear_normed: the whole input row is read by every program


def linear_normed(w, x: torch.Tensor, norm: torch.Tensor, eps: float, cfg: Cfg | None = None):
    """y [1, out] = linear(w, rms_norm(x, norm)) for one token and a Q8_0 weight (out, in): the
    split-layout matvec with the norm in its prologue. None where that does not apply."""
    if w.qtype != Q8_0 or len(w.shape) != 2 or x.dim() != 2 or x.shape[0] != 1:
        return None
    if w.shape[1] > NORMED_MAX_IN or (cfg is not None and not cfg.q8s):
        return None
    n_out, n_in, x = _linear_args(w, x, 1, "linear_normed")
    if norm.shape != (n_in,) or norm.dtype != torch.float32:
        raise ValueError(f"linear_normed: norm weight {norm.dtype} {tuple(norm.shape)} does not "
                         f"match {n_in} inputs")
    y = torch.empty(1, n_out, dtype=torch.float32, device=x.device)
    return _q8s_linear(w, x, y, 1, cfg, norm.contiguous(), eps)


def _split_k(total: int, step: int, want: int) -> tuple[int, int]:
    """K split into about `want` chunks of whole steps: (chunk length, number of chunks)."""
    steps = total // step
    per = triton.cdiv(steps, max(1, min(want, steps))) * step
    return per, triton.cdiv(total, per)


def _split_buffers(split, tiles, bn, tq, device, dummy):
    if split == 1:
        return dummy, dummy
    if tiles > _TICKETS:
        raise ValueError(f"a split launch over {tiles} row tiles exceeds the ticket buffer")
    return torch.empty(tiles * split * bn * tq, dtype=torch.float32, device=device), _tickets(device)


def _expert_args(w, x, ids, where):
    if w.qtype not in SUPPORTED:
        raise ValueError(f"{where}: no Triton kernel for {type_name(w.qtype)}")
    if len(w.shape) != 3:
        raise ValueError(f"{where}: expects expert weights (E, out, in), got {w.shape}")
    E, n_out, n_in = w.shape
    if ids.dim() != 2:
        raise ValueError(f"{where}: ids must be [T, K], got {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: ids must be int32 or int64, got {ids.dtype}")
    T, K = ids.shape
    x = _check_act(x, n_in, where)
    if x.dim() == 2 and x.shape[0] == T:
        per_slot = False
    elif x.dim() == 3 and tuple(x.shape[:2]) == (T, K):
        per_slot = True
    else:
        raise ValueError(f"{where}: x must be [T, in] or [T, K, in] for ids [T={T}, K={K}], "
                         f"got {tuple(x.shape)}")
    return n_out, n_in, T, K, x, per_slot, ids.contiguous()


def expert_linear(w, x: torch.Tensor, ids: torch.Tensor, sum_slots: bool = False,
                  cfg: Cfg | None = None) -> torch.Tensor:
    """Routed experts, w (E, out, in); ids [T, K] local expert ids (-1 = skip); x [T, in]
    (shared by the slots) or [T, K, in]. Returns [T, K, out] (zeros for skipped slots), or with
    sum_slots the sum over the slots [T, out]."""
    n_out, n_in, T, K, x, per_slot, ids = _expert_args(w, x, ids, "expert_linear")
    out = torch.empty((T, n_out) if sum_slots else (T, K, n_out), dtype=torch.float32, device=x.device)
    if T == 0 or K == 0:
        return out.zero_()
    _experts(w, None, x, per_slot, ids, None, out, MODE_SUM if sum_slots else MODE_SLOTS, 0.0, cfg)
    return out


def expert_swiglu(w_gate, w_up, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                  clamp: float = SWIGLU_CLAMP, cfg: Cfg | None = None) -> torch.Tensor:
    """mid [T, K, out] = swiglu_clamped(gate, up, clamp) * weights[..., None] for the selected
    experts (zeros for id -1), gate/up = expert_linear of x [T, in] (or [T, K, in]); one launch
    that reads the activation once for both."""
    n_out, n_in, T, K, x, per_slot, ids = _expert_args(w_gate, x, ids, "expert_swiglu")
    _check_swiglu(w_gate, w_up, weights, T, K)
    out = torch.empty(T, K, n_out, dtype=torch.float32, device=x.device)
    if T == 0 or K == 0:
        return out
    _experts(w_gate, w_up, x, per_slot, ids, weights.contiguous(), out, MODE_SWIGLU, float(clamp), cfg)
    return out


def _check_swiglu(w_gate, w_up, weights: torch.Tensor | None, T: int, K: int) -> None:
    """Gate and up of one type and shape, router weights float32 [T, K]; shared by triton_gemm."""
    if w_up is None or w_gate.qtype != w_up.qtype or tuple(w_gate.shape) != tuple(w_up.shape):
        raise ValueError(f"gate/up mismatch: {type_name(w_gate.qtype)} {w_gate.shape} vs "
                         f"{None if w_up is None else (type_name(w_up.qtype), w_up.shape)}")
    if weights is None or tuple(weights.shape) != (T, K) or weights.dtype != torch.float32:
        raise ValueError(f"expert_swiglu: weights must be float32 [T, K], got "
                         f"{None if weights is None else (weights.dtype, tuple(weights.shape))}")


def _words_aligned(raw: torch.Tensor) -> bool:
    """Whether every row of raw starts on a 4-byte boundary (kernels that load int32 words)."""
    return raw.stride(-1) == 1 and raw.data_ptr() % 4 == 0 and all(st % 4 == 0 for st in raw.stride()[:-1])


def small_path(w, T: int, K: int, cfg: Cfg | None = None) -> bool:
    """Whether an expert launch of T tokens x K slots takes the packed-integer few-token path."""
    if cfg is not None and cfg.small is False:
        return False
    types = SMALL_TYPES if cfg is None or cfg.small is None else (IQ2_XXS, Q2_K)   # True forces
    if w.qtype not in types or T * K > SMALL_MAX_PAIRS or K > SMALL_MAX_K:
        return False
    raw = w.raw
    if w.qtype == Q2_K:   # int32 loads of the qs words
        return _words_aligned(raw)
    return True


def small_cfg(n_rows: int, T: int, K: int, mode: int, device) -> Cfg:
    """Default launch shape of the few-token path: row tiles shrink (down to 8 rows) until there
    are about four programs per SM; slot-sum programs take all K slots of a token."""
    sms = _sm_count(torch.device(device))
    per_tile = T if mode == MODE_SUM else T * K
    bn = 32
    while bn > 16 and triton.cdiv(n_rows, bn) * per_tile < 4 * sms:
        bn //= 2
    return Cfg(bn=bn, nb=2, split=1, warps=4)


def expert_cfg(w, T: int, K: int, mode: int, device, cfg: Cfg | None = None) -> Cfg:
    """The launch shape an expert launch uses (cfg, or the default of its path), for reports."""
    if cfg is not None:
        return cfg
    E, n_out, n_in = w.shape
    if small_path(w, T, K):
        return small_cfg(n_out, T, K, mode, device)
    Tc = min(T, TQ_MAX)
    c = default_cfg(w.qtype, n_out, n_in, Tc, device, mult=min(Tc * K, E), can_split=False)
    return replace(c, split=min(Tc * K, 16) if mode == MODE_SUM else 1)


def q2k_sum_path(w, T: int, K: int, mode: int, cfg: Cfg | None = None) -> bool:
    """Whether a Q2_K slot-sum launch takes _q2k_sum_kernel (few tokens, 4-aligned rows)."""
    if w.qtype != Q2_K or mode != MODE_SUM or T > Q2K_SUM_MAX_T:
        return False
    if cfg is not None and cfg.small is not None:
        return False
    if not (cfg.q2s if cfg is not None and cfg.q2s is not None else w.shape[-1] <= Q2K_SUM_MAX_IN):
        return False
    return _words_aligned(w.raw)


def _q2k_sum(w, x, per_slot, ids, out, cfg):
    E, n_out, n_in = w.shape
    T, K = ids.shape
    raw = w.raw
    bn = cfg.bn if cfg is not None else Q2K_SUM_BN
    xq, xd, xbs = quantize_q8_k(x.reshape(-1, n_in))
    xrow_t, xrow_k = (K, 1) if per_slot else (1, 0)
    _q2k_sum_kernel[(T, triton.cdiv(n_out, bn))](
        raw, raw.stride(0), raw.stride(1), xq.view(torch.int32), xd, xbs, xrow_t, xrow_k, ids,
        out, out.stride(0), n_out, K, KB=n_in // 256, BN=bn, DP4A=x.is_cuda,
        num_warps=cfg.warps if cfg is not None else Q2K_SUM_WARPS)


def _experts_small(w, raw, raw2, x, per_slot, ids, rw, out, mode, clamp, cfg):
    E, n_out, n_in = w.shape
    T, K = ids.shape
    kb = n_in // 256
    c = cfg or small_cfg(n_out, T, K, mode, x.device)
    nb = _pow2_divisor(kb, c.nb)
    kp = _pow2_at_least(K)
    S = kp if mode == MODE_SUM else min(_pow2_at_least(max(1, c.split)), kp)
    xq, xd, xbs = quantize_q8_k(x.reshape(-1, n_in))      # one row per token, or per (token, slot)
    xrow_t, xrow_k = (K, 1) if per_slot else (1, 0)
    grid_w, sign_w = (_iq2_grid64(x.device), xd) if w.qtype == IQ2_XXS else (xd, xd)
    _expert_small_kernel[(T * triton.cdiv(K, S), triton.cdiv(n_out, c.bn))](
        raw, raw2, raw.stride(0), raw.stride(1), xq.view(torch.int32), xd, xbs, xrow_t, xrow_k,
        ids, rw if rw is not None else out, out, out.stride(0), out.stride(1) if mode != MODE_SUM else 0,
        grid_w, sign_w, n_out, K, kb, clamp,
        QT=w.qtype, R=c.bn, S=S, NB=nb, MODE=mode, DP4A=x.is_cuda, num_warps=c.warps)


def _experts(w, w2, x, per_slot, ids, rw, out, mode, clamp, cfg):
    E, n_out, n_in = w.shape
    raw = _raw(w)
    raw2 = _raw(w2) if w2 is not None else raw
    if raw2.stride() != raw.stride():
        raise ValueError("gate and up raw bytes must have the same strides")
    if q2k_sum_path(w, *ids.shape, mode, cfg):
        _q2k_sum(w, x, per_slot, ids, out, cfg)
        return
    if small_path(w, *ids.shape, cfg) and (w2 is None or small_path(w2, *ids.shape, cfg)):
        _experts_small(w, raw, raw2, x, per_slot, ids, rw, out, mode, clamp, cfg)
        return
    grid_t, sign_t = _iq2_tables(x.device) if w.qtype == IQ2_XXS else (out, out)
    T, K = ids.shape
    kb = n_in // _EPB[w.qtype]
    for t0 in range(0, T, TQ_MAX):
        xs, ids_c, os = x[t0:t0 + TQ_MAX], ids[t0:t0 + TQ_MAX], out[t0:t0 + TQ_MAX]
        rw_c = rw[t0:t0 + TQ_MAX] if rw is not None else os
        Tc = ids_c.shape[0]
        P = Tc * K
        if cfg:
            c = _fit(cfg, w.qtype, n_in)
        else:
            c = default_cfg(w.qtype, n_out, n_in, Tc, x.device, mult=min(P, E), can_split=False)
            c = replace(c, split=min(P, 16) if mode == MODE_SUM else 1)
        tq = _token_tile(c, w.qtype, Tc)
        tiles = triton.cdiv(n_out, c.bn)
        split = max(1, min(c.split, P)) if mode == MODE_SUM else 1
        ws, cnt = _split_buffers(split, tiles, c.bn, tq, x.device, os)
        xq, xd, xbs = _prequant(w.qtype, xs.reshape(-1, n_in)) if c.pre else (xs, xs, xs)
        sxt = xs.stride(0)
        sxk = xs.stride(1) if per_slot else 0
        grid = (tiles, split) if mode == MODE_SUM else (P, tiles)
        _expert_kernel[grid](
            raw, raw2, raw.stride(0), raw.stride(1), xs, xq, xd, xbs, sxt, sxk, ids_c, rw_c, os,
            os.stride(0), os.stride(1) if mode != MODE_SUM else 0, ws, cnt, grid_t, sign_t,
            n_out, Tc, K, P, kb, clamp,
            QT=w.qtype, BN=c.bn, TQ=tq, KP=_pow2_at_least(K), NB=c.nb,
            MMA=c.mma, MODE=mode, SPLIT=split, PRE=c.pre, num_warps=c.warps, num_stages=c.stages)


# ---- standalone activation quantisers -------------------------------------------------------
def _quantize(x: torch.Tensor, block: int, name: str):
    """(q int8 [R, n], d float32 [R, n/block], block sums of 16 int32 [R, n/16] for Q8_K)."""
    x = _check_act(x, x.shape[-1], f"quantize_{name}")
    R, n = x.shape
    if n % block:
        raise ValueError(f"{name.upper()} activation width {n} is not a multiple of {block}")
    nblk = n // block
    kq = block == 256
    q = torch.empty(R, n, dtype=torch.int8, device=x.device)
    d = torch.empty(R, nblk, dtype=torch.float32, device=x.device)
    bs = torch.empty(R, n // 16, dtype=torch.int32, device=x.device) if kq else d
    nbp = min(4 if kq else 32, _pow2_at_least(nblk))
    _quant_kernel[(R, triton.cdiv(nblk, nbp))](x, x.stride(0), q, d, bs, nblk, KQ=kq, NBP=nbp)
    return q, d, bs


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, n] float32 -> (q int8 [R, n], d float32 [R, n/32]); q*d == numerics.q8_0_act(x)."""
    q, d, _ = _quantize(x, 32, "q8_0")
    return q, d


def quantize_q8_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, n] float32 -> (q int8 [R, n], d float32 [R, n/256], block sums of 16 int32
    [R, n/16]); q*d == numerics.q8_k_act(x)."""
    return _quantize(x, 256, "q8_k")
