"""Many-token products (prefill) on the quantised weights, one launch per weight.

The decode kernels (triton_matvec) take at most TQ_MAX tokens per launch and re-read the weight
for every further chunk; the old prefill path instead decoded each weight whole into float32 and
ran float32 GEMMs (256 of them per routed tensor per layer). Here one launch covers all tokens:

  * program (m, n) multiplies a tile of BN weight rows with a tile of TQ token rows, decoding the
    weight in registers (`_mv_tile`, the same exact integer block dots on tensor cores as the
    decode tile kernel: int8 for Q8_0 / Q2_K, fp16 holding exact integers for IQ2_XXS / Q4_K,
    block sums scaled in float32). The result is the torch twin's up to float32 summation order.
  * the activation is quantised once (Q8_0 / Q8_K, bit-identical to ds4tp.numerics) before the
    launch; m is the fast grid axis, so the programs sharing a weight tile run together (L2).
  * routed experts: the (token, slot) pairs are sorted by expert (one stable sort; the tile table
    is built on the device, expert_tiles_device, so no host sync) and cut into token tiles of one
    expert each; a tile's columns are pairs, so no activation or weight is gathered or copied,
    and each expert's rows are decoded once per tile of its tokens. Outputs land at their
    (token, slot) row directly.

F16 weights (mixer, router, compressors, indexer) take float32 activations as they are. On
cuBLAS (`f16_split_mm`, the default where torch multiplies float16 into float32): each activation
row scaled by a power of two into float16's range and split into a float16 head and tail (x =
(hi + lo) * 2^e to ~2^-22 relative), both multiplied by the weight (exact in float16) in one
float16 GEMM with float32 sums, then added and scaled back. Otherwise, or for an explicit launch
shape: dots in 3xTF32 (the activation split into a TF32 head and tail; the weight is exact in
TF32) in the Triton kernel below. Both near float32 accuracy at tensor-core speed (cuBLAS's
float32 sums in the tensor cores are not rounded per addition: 8.5e-6 of the largest output
against the twin at K=4096 on an H200, 3xTF32 within 3e-6).

Float16 path (h16): weights and the activation in float16, float32 accumulation, no per-block
float32 rescaling. Dense weights are decoded once by `dequant_h16` (each value the exact float32
dequantisation rounded once to float16) and multiplied by cuBLAS (torch.mm with a float32
result; the Triton dots below where torch lacks it, or for an explicit launch shape). Routed
IQ2_XXS / Q2_K experts are decoded in registers, never written back: the tensor-core CUDA C
kernels of cuda_experts.many where CuPy is here, else `_experts_h16_kernel`; other routed types
through dequant_h16, H16_EXPERT_GROUP experts at a time. Default for dense weights from
H16_MIN_T tokens and routed experts from H16_MIN_PAIRS pairs. Not the twin's arithmetic: the
activation is rounded to 11 significant bits where the twin, like the reference engine, rounds
it to 8-bit Q8_0 / Q8_K integers; the float16 path is the closer of the two to the exact
product (tests compare it with the float64 product, tests/kernel_cases.exact_linear).
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ds4tp.config import F16, IQ2_XXS, Q2_K, Q8_0
from ds4tp.kernels.triton_matvec import (_EPB, _check_swiglu, _expert_args, _f16_head_tail,
                                         _f16_ptr, _iq2_grid64, _iq2_tables, _iq2_xxs_fields,
                                         _iq2_xxs_wblock, _linear_args, _mv_tile, _pow2_at_least,
                                         _pow2_divisor, _prequant, _q2_k_wblock, _q8_0_wtile_f32,
                                         _raw, q8_0_split)

MODE_SLOTS, MODE_SWIGLU = 0, 2
H16_TYPES = (Q8_0, Q2_K, IQ2_XXS)
# Defaults (None: never by default). Dense: measured once on an H200 with both on (2048-token
# prefill, TP=1: 1541 tok/s against 1436 earlier that day, inside the run-to-run spread;
# bench/results/bench_h200_tp1_s5_h16_20261129.json); on cuBLAS since, attn_q_b 1.28 -> 0.39 ms
# against the exact path (gemm_sweep_h200_s9_pf1_*). Routed experts: the CUDA C tensor-core
# kernels take a 2048-token prefill's gate/up in 3.5 ms and down in 1.7 ms against 7.0 and 2.8
# ms on the exact path, and the 43-layer prefill 2019 / 2162 against 1777 tok/s (same run,
# prefill_ab_h200_s9_pf6_*). Without CuPy, _experts_h16_kernel: gate/up 5.0 ms, down 4.1 ms
# (slower than the exact path's 3.3 there; gemm_sweep_h200_s9_pf1_*).
F16_CUBLAS = True        # F16 weights: split activation on cuBLAS (f16_split_mm) where it can
H16_MIN_T = 64           # dense: tokens from which the float16 path is the default
H16_MIN_PAIRS = 1        # routed experts: (token, slot) pairs from which it is the default
H16_EXPERT_GROUP = 64    # experts decoded to float16 per launch pair


@dataclass(frozen=True)
class GemmCfg:
    """bn weight rows x tq token rows per program; nb blocks per unrolled K step (Q8_0 32-blocks
    of the GGUF layout, K-quant super-blocks). stages: software pipelining depth (with 2 the
    IQ2_XXS SwiGLU launch measured 7x slower on an H200: bench/results/gemm_sweep_h200_*)."""
    bn: int = 64
    tq: int = 64
    nb: int = 4
    warps: int = 4
    stages: int = 1


# launch shape of the float16 dots: nb float16 columns per K step, software pipelined
H16_CFG = GemmCfg(bn=128, tq=128, nb=64, warps=8, stages=3)
# the float16 routed experts decoded in registers (FUSED_TYPES): bn weight rows per program; the
# token tile is expert_token_tile's, nb unused (one super-block per K step)
EXPERT_H16_CFG = GemmCfg(bn=64, tq=64, nb=1, warps=4, stages=1)


def expert_token_tile(rows_per_expert: int) -> int:
    """Token tile of an expert launch: the mean rows per used expert rounded up to a power of
    two, 16..64 (a tile holds one expert's rows, so larger tiles would be mostly padding)."""
    return max(16, min(64, _pow2_at_least(max(1, rows_per_expert))))


def default_cfg(qtype: int, n_in: int, tq: int = 128) -> GemmCfg:
    """64 weight rows x tq tokens (dense: 128, the fastest in the H200 sweep), per K step 32 F16
    columns, four Q8_0 blocks or one super-block, no software pipelining."""
    nb = {F16: 32, Q8_0: 4}.get(qtype, 1)
    return GemmCfg(bn=64, tq=tq, nb=_pow2_divisor(n_in // _EPB[qtype], nb))


@triton.jit
def _store_pairs(acc, acc2, p, live, rows, rmask, rw_ptr, out_ptr, stride_op, clamp,
                 MODE: tl.constexpr):
    """Store the tile acc [BN rows, TQ pairs] at out[p * stride_op + row]; MODE_SWIGLU: first the
    clamped SwiGLU of gate acc and up acc2 times the pair's router weight
    (numerics.swiglu_clamped)."""
    if MODE == 2:
        g = tl.minimum(acc, clamp)
        u = tl.minimum(tl.maximum(acc2, -clamp), clamp)
        rw = tl.load(rw_ptr + p, mask=live, other=0.0)
        acc = g * tl.sigmoid(g) * u * rw[None, :]
    ooff = p[None, :].to(tl.int64) * stride_op + rows[:, None]
    tl.store(out_ptr + ooff, acc, mask=rmask[:, None] & live[None, :])


@triton.jit
def _tile_pairs(tiles_ptr, pairs_ptr, pid_m, j):
    """Row pid_m of an expert tile table (expert, first index into pairs, count): its expert, the
    pairs p at columns j (0 past the count), which columns are live, and the count (0: a spare
    row of expert_tiles_device's table, which the kernels skip)."""
    e = tl.load(tiles_ptr + 3 * pid_m)
    first = tl.load(tiles_ptr + 3 * pid_m + 1)
    n_live = tl.load(tiles_ptr + 3 * pid_m + 2)
    live = j < n_live
    return e, tl.load(pairs_ptr + first + j, mask=live, other=0), live, n_live


@triton.jit
def _gemm_kernel(w_ptr, w2_ptr, stride_we, stride_wn, x_ptr, xq_ptr, xd_ptr, xbs_ptr,
                 stride_xt, stride_xk, tiles_ptr, pairs_ptr, rw_ptr, out_ptr, stride_op,
                 grid_ptr, sign_ptr, N, P, K, KB, rows_per_group, group_in, clamp,
                 QT: tl.constexpr, BN: tl.constexpr, TQ: tl.constexpr, NB: tl.constexpr,
                 TABLE: tl.constexpr, MODE: tl.constexpr, QS: tl.constexpr,
                 X16: tl.constexpr = False):
    """Columns are pairs p = t*K + k (dense: K = 1, p = t); the activation row of p starts at
    element t*stride_xt + k*stride_xk (+ the group's offset), its output row at p*stride_op.
    TABLE: tile m is (expert, first index into pairs_ptr, count) from tiles_ptr; otherwise tile m
    is pairs m*TQ .. m*TQ+TQ-1 of expert 0. MODE_SWIGLU: w (gate) and w2 (up) are multiplied
    with the same activation and the output is the clamped SwiGLU times the pair's router weight.
    QS (dense Q8_0): the weight is the split layout (triton_matvec.q8_0_split), whose rows load
    as whole 32-byte blocks instead of byte by byte out of 34-byte blocks.
    X16 (F16 weights only): the activation is rounded to float16 and the dots are plain float16
    ones (the float16 path: w and w2 are weights decoded by dequant_h16)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    j = tl.arange(0, TQ)
    if TABLE:
        e, p, live, n_live = _tile_pairs(tiles_ptr, pairs_ptr, pid_m, j)
        if n_live == 0:
            return
    else:
        e = pid_m * 0
        p = pid_m * TQ + j
        live = p < P
    t = p // K
    k = p - t * K
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    row_off = rows.to(tl.int64) * stride_wn
    grp = (pid_n * BN) // rows_per_group          # a row tile never straddles two groups
    x_off = t.to(tl.int64) * stride_xt + k.to(tl.int64) * stride_xk + grp.to(tl.int64) * group_in
    eoff = e.to(tl.int64) * stride_we
    if QS:   # Q8_0 on the split layout: w_ptr int8 quants [N, KB*32], w2_ptr f16 scales [N, KB]
        acc = tl.zeros([BN, TQ], tl.float32)
        i = tl.arange(0, 32)
        qrow = w_ptr + rows.to(tl.int64)[:, None] * (KB * 32) + i[None, :]
        drow = w2_ptr.to(tl.pointer_type(tl.float16)) + rows.to(tl.int64) * KB
        xrow = xq_ptr + x_off[:, None] + i[None, :]
        for kb in range(0, KB):
            wq = tl.load(qrow + kb * 32, mask=rmask[:, None], other=0).to(tl.int8, bitcast=True)
            xv = tl.load(xrow + kb * 32, mask=live[:, None], other=0)                 # [TQ, 32]
            dw = tl.load(drow + kb, mask=rmask, other=0.0).to(tl.float32)
            dx = tl.load(xd_ptr + (x_off >> 5) + kb, mask=live, other=0.0)
            r = tl.dot(wq, tl.trans(xv), out_dtype=tl.int32).to(tl.float32)          # exact
            acc += r * (dw[:, None] * dx[None, :])
        acc2 = acc
    elif QT == 1:   # F16 weight x float32 activation: 3xTF32 dots (an F16 weight is exact in
        acc = tl.zeros([BN, TQ], tl.float32)          # TF32, so only the activation is split)
        acc2 = tl.zeros([BN, TQ], tl.float32)
        kk = tl.arange(0, NB)
        wrow = (w_ptr + eoff).to(tl.pointer_type(tl.float16)) + (row_off >> 1)[:, None] + kk[None, :]
        w2row = (w2_ptr + eoff).to(tl.pointer_type(tl.float16)) + (row_off >> 1)[:, None] + kk[None, :]
        xrow = x_ptr + x_off[:, None] + kk[None, :]
        for k in range(0, KB, NB):
            wv = tl.load(wrow + k, mask=rmask[:, None], other=0.0)                     # [BN, NB]
            xv = tl.load(xrow + k, mask=live[:, None], other=0.0)                      # [TQ, NB]
            if X16:
                xh = tl.trans(xv.to(tl.float16))
                acc = tl.dot(wv, xh, acc)
                if MODE == 2:
                    acc2 = tl.dot(tl.load(w2row + k, mask=rmask[:, None], other=0.0), xh, acc2)
            else:
                acc = tl.dot(wv.to(tl.float32), tl.trans(xv), acc, input_precision="tf32x3")
        if not X16:
            acc2 = acc
    else:
            acc, acc2 = _mv_tile(w_ptr + eoff, w2_ptr + eoff, row_off, rmask, x_ptr, xq_ptr, xd_ptr,
                             xbs_ptr, x_off, live, 0, KB, grid_ptr, sign_ptr, QT, BN, TQ, NB,
                             QT == 8, MODE == 2, True)
    _store_pairs(acc, acc2, p, live, rows, rmask, rw_ptr, out_ptr, stride_op, clamp, MODE)


@triton.jit
def _dequant_h16_kernel(w_ptr, stride_we, stride_wn, out_ptr, N, K, grid_ptr, sign_ptr,
                        QT: tl.constexpr, BN: tl.constexpr):
    """Program (n, b, e): rows n*BN.. of expert e (0 for a dense weight), elements 256b..256b+255,
    decoded exactly in float32 (the decode tile helpers) and stored rounded to float16 in
    out [E, N, K]."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    e = tl.program_id(2)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    row_off = rows.to(tl.int64) * stride_wn
    wp = w_ptr + e.to(tl.int64) * stride_we
    if QT == 8:       # Q8_0: eight 32-blocks
        v = tl.reshape(_q8_0_wtile_f32(wp, row_off, rmask, 8 * b, 8), (BN, 256))
    elif QT == 16:    # IQ2_XXS: d/8 times the integers (2s+1)*grid*sign
        a, d = _iq2_xxs_wblock(wp, row_off, rmask, b, grid_ptr, sign_ptr, BN)
        v = a.to(tl.float32) * (d * 0.125)[:, None]
    else:             # Q2_K: d*scale*q - dmin*min per 16-element sub-block
        a, mn, d, dmin = _q2_k_wblock(wp, row_off, rmask, b, BN)
        v = (tl.reshape(a.to(tl.float32), (BN, 16, 16)) * d[:, None, None]
             - (mn.to(tl.float32) * dmin[:, None])[:, :, None])
        v = tl.reshape(v, (BN, 256))
    cols = b * 256 + tl.arange(0, 256)
    off = (e.to(tl.int64) * N + rows.to(tl.int64))[:, None] * K + cols[None, :]
    tl.store(out_ptr + off, v.to(tl.float16), mask=rmask[:, None])


# ---- float16 routed experts, decoded in registers ----------------------------------------------
# The float16 path above writes each decoded weight to memory (2 bytes per value) and reads it
# back; for the routed experts that is 8x the quantised bytes (a 2048-token prefill reads 4.3 G
# IQ2_XXS gate/up values per layer). Here the launch decodes each super-block in registers into
# float16 *integers* (exact: IQ2_XXS (2s+1)*grid*sign <= 1333, Q2_K scale*q <= 45), multiplies
# them with the float16 activation in tensor-core dots with float32 accumulation, and applies the
# super-block's scale to the partial sum (Q2_K: minus dmin times the dot of its 4-bit mins with
# the activation's 16-element sums, split into float16 head and tail). The weights are exact;
# only the activation is rounded (to float16, once, before the launch).
FUSED_TYPES = (IQ2_XXS, Q2_K)


@triton.jit
def _h16_magic(v):
    """Integers 0..1023 (int32) -> float16 1024 + v, without the conversion unit."""
    return (v | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _iq2_plane(word, shift: tl.constexpr, sg, e: tl.constexpr, sc):
    """Value e of every group: magnitude byte (word >> shift) times sc, negated where bit e of
    the group's 8 sign bits is set (float16 bits; the integer result is exact)."""
    v = (_h16_magic((word >> shift) & 255) - 1024.0) * sc
    neg = ((sg >> e) & 1) << 15
    return (v.to(tl.int16, bitcast=True) ^ neg.to(tl.int16)).to(tl.float16, bitcast=True)


@triton.jit
def _iq2_xxs_h16(w_ptr, row_off, rmask, kb, half: tl.constexpr, grid_ptr, BN: tl.constexpr):
    """Elements 128*half .. +127 of IQ2_XXS super-block kb of each row: float16 [BN, 128]
    holding the integers (2s+1)*grid*sign (the weight is d/8 times them). grid_ptr: the int64
    table of triton_matvec._iq2_grid64 (a grid row's 8 magnitudes in one word)."""
    s = tl.arange(0, 4)
    k = tl.arange(0, 4)
    sb = row_off[:, None] + kb * 66 + 2 + 8 * (4 * half + s)[None, :]       # [BN, 4] sub-blocks
    g, t, sc = _iq2_xxs_fields(w_ptr, sb, rmask)
    sg = (t[:, :, None] >> (7 * k)[None, None, :]) & 127                    # [BN, 4, 4] sign index
    par = sg ^ (sg >> 4)
    par = par ^ (par >> 2)
    par = par ^ (par >> 1)
    sg = sg | ((par & 1) << 7)                                              # ksigns: + parity bit
    row = tl.load(grid_ptr + g.to(tl.int32))                                # [BN, 4, 4] int64
    m_lo = row.to(tl.int32)                                                 # magnitudes 0..3
    m_hi = (row >> 32).to(tl.int32)                                         # magnitudes 4..7
    scb = sc[:, :, None]
    # the 8 values of each grid row as planes [BN, 4, 4], joined below (in-thread, value e last)
    v0 = _iq2_plane(m_lo, 0, sg, 0, scb)
    v1 = _iq2_plane(m_lo, 8, sg, 1, scb)
    v2 = _iq2_plane(m_lo, 16, sg, 2, scb)
    v3 = _iq2_plane(m_lo, 24, sg, 3, scb)
    v4 = _iq2_plane(m_hi, 0, sg, 4, scb)
    v5 = _iq2_plane(m_hi, 8, sg, 5, scb)
    v6 = _iq2_plane(m_hi, 16, sg, 6, scb)
    v7 = _iq2_plane(m_hi, 24, sg, 7, scb)
    # a join's new axis goes last, so the first join takes bit 2 of e, the last bit 0
    v = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    return tl.reshape(v, (BN, 128))


@triton.jit
def _q2_k_h16(w_ptr, row_off, rmask, kb, half: tl.constexpr, BN: tl.constexpr):
    """Elements 128*half .. +127 of Q2_K super-block kb: float16 [BN, 128] = scale*q (exact;
    the weight is d*scale*q - dmin*min). Sub-block s = 8*half + 2j + p holds bits 2j of bytes
    16 + 32*half + 16p + l (l = 0..15) and its scale in the low bits of byte 8*half + 2j + p."""
    i = tl.arange(0, 8)
    j = tl.arange(0, 4)
    p = tl.arange(0, 2)
    l = tl.arange(0, 16)
    base = row_off + kb * 84
    scb = tl.load(w_ptr + base[:, None] + 8 * half + i[None, :], mask=rmask[:, None], other=0).to(tl.int32)
    qo = 16 + 32 * half + 16 * p[:, None] + l[None, :]                      # [2, 16]
    qb = tl.load(w_ptr + base[:, None, None] + qo[None, :, :], mask=rmask[:, None, None],
                 other=0).to(tl.int32)
    q = (qb[:, None, :, :] >> (2 * j)[None, :, None, None]) & 3             # [BN, 4, 2, 16]
    sc = tl.reshape((scb & 15).to(tl.float16), (BN, 4, 2))
    a = (_h16_magic(q) - 1024.0) * sc[:, :, :, None]                        # exact, <= 45
    return tl.reshape(a, (BN, 128))


@triton.jit
def _experts_h16_kernel(w_ptr, w2_ptr, stride_we, stride_wn, x_ptr, stride_xt, stride_xk,
                        tiles_ptr, pairs_ptr, rw_ptr, out_ptr, stride_op, grid_ptr, N, K, KB,
                        clamp, QT: tl.constexpr, BN: tl.constexpr, TQ: tl.constexpr,
                        MODE: tl.constexpr):
    """Program (m, n): tile m of the expert tile table (expert, first pair, count) times weight
    rows n*BN..; x is float16 (pair p = t*K + k reads row t*stride_xt + k*stride_xk). Each
    super-block is decoded in two halves of 128 values into exact float16 integers, dotted
    with x, and scaled once (see FUSED_TYPES above); MODE as in _gemm_kernel."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    j = tl.arange(0, TQ)
    e, p, live, n_live = _tile_pairs(tiles_ptr, pairs_ptr, pid_m, j)
    if n_live == 0:
        return
    t = p // K
    x_off = t.to(tl.int64) * stride_xt + (p - t * K).to(tl.int64) * stride_xk
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    row_off = rows.to(tl.int64) * stride_wn
    wp = w_ptr + e.to(tl.int64) * stride_we
    w2p = w2_ptr + e.to(tl.int64) * stride_we
    ar = tl.arange(0, 128)
    # a Q2_K super-block's 16 mins in the order of the sums below: position 2i + h is
    # sub-block 8h + i (the two halves' sums are joined)
    mpos = tl.arange(0, 16)
    msub = 8 * (mpos % 2) + mpos // 2
    acc = tl.zeros([BN, TQ], tl.float32)
    acc2 = tl.zeros([BN, TQ], tl.float32)
    for kb in range(0, KB):
        x0 = tl.load(x_ptr + x_off[:, None] + kb * 256 + ar[None, :], mask=live[:, None], other=0.0)
        x1 = tl.load(x_ptr + x_off[:, None] + (kb * 256 + 128) + ar[None, :], mask=live[:, None], other=0.0)
        x0t = tl.trans(x0)                                                   # [128, TQ] float16
        x1t = tl.trans(x1)
        if QT == 16:   # IQ2_XXS
            d = tl.load(_f16_ptr(wp) + ((row_off + kb * 66) >> 1), mask=rmask, other=0.0).to(tl.float32)
            part = tl.dot(_iq2_xxs_h16(wp, row_off, rmask, kb, 0, grid_ptr, BN), x0t)
            part = tl.dot(_iq2_xxs_h16(wp, row_off, rmask, kb, 1, grid_ptr, BN), x1t, part)
            acc += part * (d * 0.125)[:, None]
            if MODE == 2:
                d2 = tl.load(_f16_ptr(w2p) + ((row_off + kb * 66) >> 1), mask=rmask, other=0.0).to(tl.float32)
                part2 = tl.dot(_iq2_xxs_h16(w2p, row_off, rmask, kb, 0, grid_ptr, BN), x0t)
                part2 = tl.dot(_iq2_xxs_h16(w2p, row_off, rmask, kb, 1, grid_ptr, BN), x1t, part2)
                acc2 += part2 * (d2 * 0.125)[:, None]
        else:          # Q2_K: minus dmin * (mins . 16-element sums of x), sums as head + tail
            base = row_off + kb * 84
            d = tl.load(_f16_ptr(wp) + ((base + 80) >> 1), mask=rmask, other=0.0).to(tl.float32)
            dmin = tl.load(_f16_ptr(wp) + ((base + 82) >> 1), mask=rmask, other=0.0).to(tl.float32)
            mn = (tl.load(wp + base[:, None] + msub[None, :], mask=rmask[:, None], other=0).to(tl.int32) >> 4)
            part = tl.dot(_q2_k_h16(wp, row_off, rmask, kb, 0, BN), x0t)
            part = tl.dot(_q2_k_h16(wp, row_off, rmask, kb, 1, BN), x1t, part)
            s0 = tl.sum(tl.reshape(x0.to(tl.float32), (TQ, 8, 16)), axis=2)
            s1 = tl.sum(tl.reshape(x1.to(tl.float32), (TQ, 8, 16)), axis=2)
            xs = tl.reshape(tl.join(s0, s1), (TQ, 16))                       # [TQ, 16]
            xs_hi, xs_lo = _f16_head_tail(xs)
            mn16 = mn.to(tl.float16)
            mpart = tl.dot(mn16, tl.trans(xs_hi))
            mpart = tl.dot(mn16, tl.trans(xs_lo), mpart)
            acc += part * d[:, None] - mpart * dmin[:, None]
    _store_pairs(acc, acc2, p, live, rows, rmask, rw_ptr, out_ptr, stride_op, clamp, MODE)


def h16_supported(w) -> bool:
    """Whether dequant_h16 takes this weight (a type with a decode helper, whole 256-element
    units per row, a contiguous byte axis)."""
    return w.qtype in H16_TYPES and w.shape[-1] % 256 == 0 and w.raw.stride(-1) == 1


def dequant_h16(w, first: int = 0, count: int | None = None) -> torch.Tensor:
    """The weight decoded to float16: [out, in] for a dense weight, [count, out, in] for experts
    first..first+count-1 of an expert weight. Each value is the exact dequantisation
    (ds4tp.dequant) rounded to float16."""
    if not h16_supported(w):
        raise ValueError(f"dequant_h16: no float16 decoding for {w.qtype} {w.shape}")
    raw = _raw(w)
    n_out, n_in = w.shape[-2], w.shape[-1]
    if len(w.shape) == 3:
        count = w.shape[0] - first if count is None else count
        if not (0 <= first and 0 < count and first + count <= w.shape[0]):
            raise ValueError(f"dequant_h16: experts {first}..{first + count - 1} out of {w.shape[0]}")
        raw, stride_we = raw[first:first + count], raw.stride(0)
    else:
        count, stride_we = 1, 0
    out = torch.empty(count, n_out, n_in, dtype=torch.float16, device=raw.device)
    grid_t, sign_t = _iq2_tables(raw.device) if w.qtype == IQ2_XXS else (out, out)
    bn = 16
    _dequant_h16_kernel[(triton.cdiv(n_out, bn), n_in // 256, count)](
        raw, stride_we, raw.stride(-2), out, n_out, n_in, grid_t, sign_t, QT=w.qtype, BN=bn,
        num_warps=4)
    return out if len(w.shape) == 3 else out[0]


@functools.lru_cache(maxsize=8)
def cublas_h16(device: torch.device) -> bool:
    """Whether torch multiplies float16 matrices into a float32 result here (torch.mm's
    out_dtype, CUDA only): the dense float16 path's GEMM, else its Triton kernel."""
    if torch.device(device).type != "cuda":
        return False
    try:
        a = torch.ones(16, 16, dtype=torch.float16, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


@triton.jit(do_not_specialize=["T"])   # see triton_attn._comp_rows_kernel
def _split_h16_kernel(x_ptr, stride_x, out_ptr, scale_ptr, T, K, BK: tl.constexpr):
    """Row t of x [T, K] -> rows t (head) and T + t (tail) of out [2T, K] float16 and scale[t]:
    hi = f16(x * 2^-e), lo = f16(x * 2^-e - hi), scale = 2^e with e the row's largest |x|'s
    binary exponent (frexp; 0 for a zero row), clamped to [-126, 126] so both powers of two are
    normal float32 numbers. Scaling by a power of two is exact, so |x| < 2^e keeps hi within
    float16's range."""
    t = tl.program_id(0)
    k = tl.arange(0, BK)
    m = k < K
    x = tl.load(x_ptr + t.to(tl.int64) * stride_x + k, mask=m, other=0.0)
    amax = tl.max(tl.abs(x), axis=0)
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 255) - 126
    e = tl.minimum(tl.maximum(tl.where(amax > 0, e, 0), -126), 126)
    xs = x * ((127 - e) << 23).to(tl.float32, bitcast=True)          # x * 2^-e
    hi, lo = _f16_head_tail(xs)
    row = t.to(tl.int64) * K
    tl.store(out_ptr + row + k, hi, mask=m)
    tl.store(out_ptr + T.to(tl.int64) * K + row + k, lo, mask=m)
    tl.store(scale_ptr + t, ((e + 127) << 23).to(tl.float32, bitcast=True))


SPLIT_MAX_K = 32768      # widest activation row _split_h16_kernel takes in one program


def split_h16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] float32 -> (hl [2T, K] float16: the heads, then the tails; scale [T] float32)
    with x[t] = (hl[t] + hl[T + t]) * scale[t] to ~2^-22 relative (_split_h16_kernel)."""
    T, K = x.shape
    if K > SPLIT_MAX_K or x.dtype != torch.float32 or x.stride(1) != 1:
        raise ValueError(f"split_h16: float32 rows of at most {SPLIT_MAX_K} with unit column "
                         f"stride, got {x.dtype} {tuple(x.shape)} strides {x.stride()}")
    hl = torch.empty(2 * T, K, dtype=torch.float16, device=x.device)
    scale = torch.empty(T, dtype=torch.float32, device=x.device)
    if T:
        bk = triton.next_power_of_2(K)
        _split_h16_kernel[(T,)](x, x.stride(0), hl, scale, T, K, BK=bk,
                                num_warps=8 if bk >= 4096 else 4)
    return hl, scale


def f16_split_path(w, groups: int, cfg, h16, device) -> bool:
    """Whether linear() takes an F16 weight through f16_split_mm: one group, no explicit launch
    shape or float16 choice, F16_CUBLAS on, rows of at most SPLIT_MAX_K, cuBLAS here."""
    return (w.qtype == F16 and groups == 1 and cfg is None and h16 is None and F16_CUBLAS
            and w.shape[-1] <= SPLIT_MAX_K and cublas_h16(device))


def f16_split_mm(w, x: torch.Tensor) -> torch.Tensor:
    """y [T, out] = x @ W^T for an F16 weight (out, in) and float32 x [T, in] on cuBLAS: the
    activation split into float16 head and tail (split_h16), one float16 GEMM over both with a
    float32 result, heads' and tails' products added, scaled back."""
    n_out, n_in = w.shape
    T = x.shape[0]
    w16 = _raw(w).view(torch.float16)                  # [out, in]: F16 bytes as stored
    hl, scale = split_h16(x)
    y2 = torch.mm(hl, w16.t(), out_dtype=torch.float32)
    return (y2[:T] + y2[T:]).mul_(scale[:, None])


def h16_path(w, count: int, h16: bool | None = None, w2=None) -> bool:
    """Whether a launch takes the float16 path: h16 True / False forces it (True raises for a
    weight it cannot decode), None applies the default rule: count = tokens of a dense launch
    (>= H16_MIN_T) or (token, slot) pairs of an expert launch (>= H16_MIN_PAIRS)."""
    ok = h16_supported(w) and (w2 is None or h16_supported(w2))
    if h16 and not ok:
        raise ValueError(f"float16 path requested for an unsupported weight {w.qtype} {w.shape}")
    if h16 is not None:
        return h16
    limit = H16_MIN_PAIRS if len(w.shape) == 3 else H16_MIN_T
    return ok and limit is not None and count >= limit


def _h16_launch(w16, w216, x, y, table, pairs, rw, n_out, n_in, P, K, sxt, sxk, stride_op,
                rows_per_group, group_in, mode, clamp, c: GemmCfg):
    """One float16-path launch over weights decoded to float16 ([E, N, K] or [N, K]): one
    program row per tile of table (experts) or per c.tq tokens (dense)."""
    wb = w16.view(torch.uint8)
    w2b = w216.view(torch.uint8) if w216 is not None else wb
    stride_we = n_out * n_in * 2 if w16.dim() == 3 else 0
    nb = _pow2_divisor(n_in, max(16, c.nb))          # float16 dots take K steps of >= 16
    grid_m = table.shape[0] if table is not None else triton.cdiv(P, c.tq)
    bn = min(c.bn, _pow2_divisor(rows_per_group, c.bn)) if rows_per_group != n_out else c.bn
    _gemm_kernel[(grid_m, triton.cdiv(n_out, bn))](
        wb, w2b, stride_we, n_in * 2, x, x, x, x, sxt, sxk,
        table if table is not None else y, pairs if pairs is not None else y,
        rw if rw is not None else y, y, stride_op, y, y,
        n_out, P, K, n_in, rows_per_group, group_in, float(clamp),
        QT=F16, BN=bn, TQ=c.tq, NB=nb, TABLE=table is not None, MODE=mode, QS=False, X16=True,
        num_warps=c.warps, num_stages=c.stages)


def linear(w, x: torch.Tensor, groups: int = 1, cfg: GemmCfg | None = None,
           h16: bool | None = None) -> torch.Tensor:
    """y [T, out] = act_quant(x) @ dequant(W)^T for x [T, groups*in]; see triton_matvec.linear.
    h16: the float16 path (see the module docstring; None: by h16_path's default rule)."""
    n_out, n_in, x = _linear_args(w, x, groups, "gemm linear")
    T = x.shape[0]
    y = torch.empty(T, n_out, dtype=torch.float32, device=x.device)
    if T == 0:
        return y
    rows_per_group = n_out // groups
    if f16_split_path(w, groups, cfg, h16, x.device):
        return f16_split_mm(w, x)
    if h16_path(w, T, h16):
        w16 = dequant_h16(w)
        if cfg is None and cublas_h16(x.device):   # cuBLAS float16 GEMM, float32 output
            x16 = x.to(torch.float16)
            if groups == 1:
                return torch.mm(x16, w16.t(), out_dtype=torch.float32)
            y = torch.bmm(x16.view(T, groups, n_in).transpose(0, 1),
                          w16.view(groups, rows_per_group, n_in).transpose(1, 2), out_dtype=torch.float32)
            return y.transpose(0, 1).reshape(T, n_out)
        _h16_launch(w16, None, x, y, None, None, None, n_out, n_in, T, 1, x.stride(0), 0,
                    y.stride(0), rows_per_group, n_in, MODE_SLOTS, 0.0, cfg or H16_CFG)
        return y
    c = cfg or default_cfg(w.qtype, n_in)
    bn = min(c.bn, _pow2_divisor(rows_per_group, c.bn)) if groups > 1 else c.bn
    qs = w.qtype == Q8_0
    if qs:
        wa, wb = q8_0_split(w)          # the decode path's copy (built once, kept on w)
    else:
        wa = wb = _raw(w)
    grid_t, sign_t = _iq2_tables(x.device) if w.qtype == IQ2_XXS else (y, y)
    xq, xd, xbs = _prequant(w.qtype, x) if w.qtype != F16 else (x, x, x)
    _gemm_kernel[(triton.cdiv(T, c.tq), triton.cdiv(n_out, bn))](
        wa, wb, 0, wa.stride(-2), x, xq, xd, xbs, x.stride(0), 0, y, y, y, y, y.stride(0),
        grid_t, sign_t, n_out, T, 1, n_in // _EPB[w.qtype], rows_per_group, n_in, 0.0,
        QT=w.qtype, BN=bn, TQ=c.tq, NB=_pow2_divisor(n_in // _EPB[w.qtype], c.nb), TABLE=False,
        MODE=MODE_SLOTS, QS=qs, num_warps=c.warps, num_stages=c.stages)
    return y


def expert_tiles(ids: torch.Tensor, n_expert: int, tq: int | None):
    """(pairs int32 [P]: the (token, slot) pairs sorted by expert, stable; tiles int32 [M, 3]:
    (expert, first index into pairs, count <= tq); number of skipped (-1) pairs; tq; the expert
    of each tile as a host list). One host sync (the group sizes)."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat + 1, minlength=n_expert + 1).tolist()
    if len(counts) > n_expert + 1:
        raise ValueError(f"gemm experts: expert id {len(counts) - 2} out of range for {n_expert} experts")
    used = [c for c in counts[1:] if c]
    if tq is None:
        tq = expert_token_tile(-(-sum(used) // max(1, len(used))))
    tiles, start = [], counts[0]
    for e, c in enumerate(counts[1:]):
        for s in range(0, c, tq):
            tiles.append((e, start + s, min(tq, c - s)))
        start += c
    table = torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3).to(ids.device, non_blocking=True)
    return order.to(torch.int32), table, counts[0], tq, [t[0] for t in tiles]


def expert_tiles_device_torch(ids: torch.Tensor, n_expert: int, tq: int | None):
    """expert_tiles without a host sync: (pairs, tiles int32 [M, 3], tq) with M the most tiles
    any ids of this size can need (P/tq + n_expert); the live tiles come first, in expert_tiles'
    order and with its rows, the rest are (n_expert - 1, 0, 0) (count 0: the kernels skip them).
    Ids outside [0, n_expert) sit in no tile (-1: the caller zeroes their rows; other ids are not
    checked here: a check would wait for the GPU). tq None: expert_token_tile of P / n_expert.
    Plain torch (any device); expert_tiles_device_triton builds the same in one kernel."""
    flat = ids.reshape(-1)
    P, dev = flat.numel(), flat.device
    if tq is None:
        tq = expert_token_tile(-(-P // n_expert))
    order = torch.argsort(flat, stable=True)
    ok = (flat >= 0) & (flat < n_expert)
    cnt = torch.zeros(n_expert + 1, dtype=torch.long, device=dev).scatter_add_(
        0, torch.where(ok, flat + 1, 0).long(), torch.ones_like(flat, dtype=torch.long))
    skipped_before, cnt = (flat < 0).sum(), cnt[1:]          # -1 ids sort first
    ntile = (cnt + tq - 1) // tq
    tile_end = torch.cumsum(ntile, 0)
    pair_start = skipped_before + torch.cumsum(cnt, 0) - cnt
    i = torch.arange(P // tq + n_expert, device=dev)
    e = torch.searchsorted(tile_end, i, right=True)
    live = e < n_expert
    e = e.clamp(max=n_expert - 1)
    j = i - (tile_end[e] - ntile[e])
    first = torch.where(live, pair_start[e] + j * tq, 0)
    count = torch.where(live, torch.clamp(cnt[e] - j * tq, max=tq), 0)
    return order.to(torch.int32), torch.stack((e, first, count), 1).to(torch.int32), tq


@triton.jit(do_not_specialize=["P", "M", "n_iter"])   # see triton_attn._comp_rows_kernel
def _expert_tiles_kernel(vals_ptr, order_ptr, pairs_ptr, tiles_ptr, P, M, n_expert, tq, n_iter,
                         EB: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr):
    """expert_tiles_device_torch's outputs from the stably sorted ids (vals) and their order.
    Program 0 writes the tile table tiles [M, 3]; program b > 0 copies block b - 1 of order into
    pairs as int32."""
    pid = tl.program_id(0)
    if pid > 0:
        offs = (pid - 1) * BP + tl.arange(0, BP)
        tl.store(pairs_ptr + offs, tl.load(order_ptr + offs, mask=offs < P).to(tl.int32), mask=offs < P)
    else:
        # per expert e (lane): lo = #vals < e, hi = #vals < e + 1, by binary search in the sorted
        # ids. lo is the expert's first index into pairs (the -1 ids and lower experts sort
        # before it) and hi - lo its count; ids >= n_expert sort last and count nowhere.
        e = tl.arange(0, EB)
        in_e = e < n_expert
        lo_a = tl.zeros([EB], tl.int32)
        lo_b = tl.zeros([EB], tl.int32)
        hi_a = tl.zeros([EB], tl.int32) + P
        hi_b = tl.zeros([EB], tl.int32) + P
        for _ in range(n_iter):
            mid_a = (lo_a + hi_a) // 2
            mid_b = (lo_b + hi_b) // 2
            act_a = lo_a < hi_a
            act_b = lo_b < hi_b
            right_a = tl.load(vals_ptr + mid_a, mask=act_a, other=0) < e
            right_b = tl.load(vals_ptr + mid_b, mask=act_b, other=0) < e + 1
            lo_a = tl.where(act_a & right_a, mid_a + 1, lo_a)
            hi_a = tl.where(act_a & ~right_a, mid_a, hi_a)
            lo_b = tl.where(act_b & right_b, mid_b + 1, lo_b)
            hi_b = tl.where(act_b & ~right_b, mid_b, hi_b)
        pair_start = lo_a
        cnt = tl.where(in_e, lo_b - lo_a, 0)
        tile_end = tl.cumsum((cnt + tq - 1) // tq, 0)
        for i0 in range(0, M, BM):
            i = i0 + tl.arange(0, BM)
            # row i's expert: how many experts' tiles end at or before i (n_expert: a spare row);
            # its tiles start where the previous expert's end, the largest tile_end <= i
            done = (tile_end[None, :] <= i[:, None]) & in_e[None, :]
            ex = tl.sum(done.to(tl.int32), 1)
            j = i - tl.max(tl.where(done, tile_end[None, :], 0), 1)
            mine = e[None, :] == ex[:, None]
            first = tl.sum(tl.where(mine, pair_start[None, :], 0), 1) + j * tq
            count = tl.minimum(tl.sum(tl.where(mine, cnt[None, :], 0), 1) - j * tq, tq)
            live = ex < n_expert
            row = tiles_ptr + 3 * i
            tl.store(row, tl.minimum(ex, n_expert - 1), mask=i < M)
            tl.store(row + 1, tl.where(live, first, 0), mask=i < M)
            tl.store(row + 2, tl.where(live, count, 0), mask=i < M)


def expert_tiles_device_triton(ids: torch.Tensor, n_expert: int, tq: int | None):
    """expert_tiles_device_torch's outputs, bit for bit, from one stable sort and one launch of
    _expert_tiles_kernel (no host sync)."""
    flat = ids.reshape(-1)
    P = flat.numel()
    if tq is None:
        tq = expert_token_tile(-(-P // n_expert))
    M = P // tq + n_expert
    vals, order = torch.sort(flat, stable=True)
    pairs = torch.empty(P, dtype=torch.int32, device=flat.device)
    tiles = torch.empty(M, 3, dtype=torch.int32, device=flat.device)
    EB = max(16, triton.next_power_of_2(n_expert))
    BP = 4096
    _expert_tiles_kernel[(1 + triton.cdiv(P, BP),)](
        vals, order, pairs, tiles, P, M, n_expert, tq, P.bit_length(),
        EB=EB, BM=max(1, 8192 // EB), BP=BP, num_warps=4)
    return pairs, tiles, tq


def expert_tiles_device(ids: torch.Tensor, n_expert: int, tq: int | None):
    """(pairs, tiles, tq) as expert_tiles_device_torch: one Triton launch after the sort on
    CUDA, the torch twin elsewhere."""
    if ids.is_cuda:
        return expert_tiles_device_triton(ids, n_expert, tq)
    return expert_tiles_device_torch(ids, n_expert, tq)


@triton.jit
def _zero_skipped_kernel(ids_ptr, out_ptr, n_expert, N, BN: tl.constexpr):
    """Row p of out [P, N] set to zeros where ids[p] is outside [0, n_expert) (in no tile)."""
    p = tl.program_id(0)
    e = tl.load(ids_ptr + p)
    if (e < 0) | (e >= n_expert):
        for n0 in range(0, N, BN):
            nn = n0 + tl.arange(0, BN)
            tl.store(out_ptr + p.to(tl.int64) * N + nn, tl.zeros([BN], tl.float32), mask=nn < N)


def _gguf_pair(w, w2):
    """The Triton kernels' raw bytes of w and w2 (or w again), in GGUF's order: taken only where
    a Triton kernel runs, since rows in the decode order are copied for it (the CUDA C kernels
    read that order in place; taken up front, the copies made a TP=2 prefill 34% slower, s29f)."""
    raw = _raw(w)
    return raw, (_raw(w2) if w2 is not None else raw)


def experts(w, w2, x: torch.Tensor, ids: torch.Tensor, rw: torch.Tensor | None, mode: int,
            clamp: float = 0.0, cfg: GemmCfg | None = None, h16: bool | None = None) -> torch.Tensor:
    """Routed experts for many tokens: out [T, K, out] (zeros where ids is -1).
    mode MODE_SLOTS: act_quant(x) times each pair's expert (w only);
    MODE_SWIGLU: swiglu_clamped(gate, up, clamp) * rw, gate from w and up from w2.
    x [T, in] (shared by the slots) or [T, K, in]; ids [T, K] local expert ids."""
    n_out, n_in, T, K, x, per_slot, ids = _expert_args(w, x, ids, "gemm experts")
    sxt, sxk = x.stride(0), (x.stride(1) if per_slot else 0)
    if mode == MODE_SWIGLU:
        _check_swiglu(w, w2, rw, T, K)
    if w2 is not None and w2.raw.stride() != w.raw.stride():
        raise ValueError("gate and up raw bytes must have the same strides")
    out = torch.empty(T, K, n_out, dtype=torch.float32, device=x.device)
    if T * K == 0:
        return out
    E = w.shape[0]
    f16 = h16_path(w, T * K, h16, w2)
    if f16 and w.qtype not in FUSED_TYPES:   # groups of experts: tile experts on the host
        pairs, table, skipped, tq, tile_expert = expert_tiles(ids, E, cfg.tq if cfg else None)
        if skipped:
            out.masked_fill_((ids < 0)[:, :, None], 0.0)
        if table.shape[0] == 0:
            return out
    else:                # no host sync: tiles built on the device, skipped rows zeroed there
        pairs, table, tq = expert_tiles_device(ids, E, cfg.tq if cfg else None)
        flat = ids.reshape(-1).contiguous()
        _zero_skipped_kernel[(flat.numel(),)](flat, out, E, n_out,
                                              BN=min(1024, triton.next_power_of_2(n_out)), num_warps=4)
    if f16:
        rwc = rw.contiguous() if rw is not None else None
        if w.qtype in FUSED_TYPES:      # decoded in registers, nothing written back
            x16 = x.to(torch.float16)
            if cfg is None:               # the tensor-core CUDA C kernels where CuPy is here
                from ds4tp.kernels import cuda_experts
                if tq <= cuda_experts.MANY_TQ and cuda_experts.many(
                        w, w2, x16, per_slot, pairs, table, rwc, out, mode == MODE_SWIGLU, clamp):
                    return out
            c = cfg or EXPERT_H16_CFG
            sxt, sxk = x16.stride(0), (x16.stride(1) if per_slot else 0)
            grid64 = _iq2_grid64(x.device) if w.qtype == IQ2_XXS else out
            raw, raw2 = _gguf_pair(w, w2)
            _experts_h16_kernel[(table.shape[0], triton.cdiv(n_out, c.bn))](
                raw, raw2, raw.stride(0), raw.stride(1), x16, sxt, sxk, table, pairs,
                rwc if rwc is not None else out, out, n_out, grid64, n_out, K, n_in // 256,
                float(clamp), QT=w.qtype, BN=c.bn, TQ=tq, MODE=mode, num_warps=c.warps,
                num_stages=c.stages)
            return out
        c = cfg or replace(H16_CFG, tq=tq)
        # experts H16_EXPERT_GROUP at a time: decode the group to float16, run its tiles (the
        # tile table is sorted by expert, so a group's tiles are one run of rows)
        for e0 in range(0, w.shape[0], H16_EXPERT_GROUP):
            a = bisect.bisect_left(tile_expert, e0)
            b = bisect.bisect_left(tile_expert, e0 + H16_EXPERT_GROUP)
            if a == b:
                continue
            g = min(H16_EXPERT_GROUP, w.shape[0] - e0)
            sub = table[a:b].clone()
            sub[:, 0] -= e0
            w16 = dequant_h16(w, e0, g)
            w216 = dequant_h16(w2, e0, g) if w2 is not None else None
            _h16_launch(w16, w216, x, out, sub, pairs, rwc, n_out, n_in, T * K, K, sxt, sxk, n_out,
                        n_out, 0, mode, clamp, c)
        return out
    c = cfg or default_cfg(w.qtype, n_in, tq)
    grid_t, sign_t = _iq2_tables(x.device) if w.qtype == IQ2_XXS else (out, out)
    xq, xd, xbs = _prequant(w.qtype, x.reshape(-1, n_in)) if w.qtype != F16 else (x, x, x)
    raw, raw2 = _gguf_pair(w, w2)
    _gemm_kernel[(table.shape[0], triton.cdiv(n_out, c.bn))](
        raw, raw2, raw.stride(0), raw.stride(1), x, xq, xd, xbs, sxt, sxk, table, pairs,
        rw.contiguous() if rw is not None else out, out, n_out, grid_t, sign_t,
        n_out, T * K, K, n_in // _EPB[w.qtype], n_out, 0, float(clamp),
        QT=w.qtype, BN=c.bn, TQ=tq, NB=_pow2_divisor(n_in // _EPB[w.qtype], c.nb), TABLE=True,
        MODE=mode, QS=False, num_warps=c.warps, num_stages=c.stages)
    return out
