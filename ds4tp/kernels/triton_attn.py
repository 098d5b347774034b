"""The attention sublayer of one decode token in a few launches (static decoder, CUDA graphs),
and a prefill's attention over all its queries in one (`prefill_attention`, at the end).

In torch the stretch between the attention projections and the grouped output ran as ~40 small
kernels per layer (bench/results/profile_4layers_s4_baseline.txt): per-head RMS norm, RoPE,
the cache row's FP8/F16 rounding and its ring write, the compressors' two F16 matvecs, the
frontier writes, the masks, the score and value GEMMs, the softmax and the inverse RoPE. Here:

  kv_store        the KV row: RMS norm with its weight, RoPE at the token's position, FP8 E4M3
                  round trip of the non-RoPE dims (64-blocks, power-of-two scales), F16 rounding,
                  written into the raw ring at pos % n_swa with its position.
  compressor_step one compressor's two F16 projections of the token (kv and gate rows), the gate
                  plus its positional bias, written into the frontier slot of the position;
                  compressor_pair: a ratio-4 layer's two compressors (attention's, indexer's).
  compressor_emit a ratio-4 compressor's row at a token ending a window: softmax pooling of the
                  8-row frontier, RMS norm, RoPE, FP8 (kv) or Hadamard + FP4 (indexer), F16,
                  written at its cache row; the current window then becomes the previous one.
  attention       per head: RMS norm, RoPE, attention with its sink over the raw ring (positions
                  (pos - n_swa, pos]) and the visible compressed rows (optionally only those an
                  indexer mask selects), online softmax, then the inverse RoPE of the output.

The position is read on the device (a graph replays with a new one). The twins are the torch
functions of ds4tp.decode_graph (store_kv_row_torch, compressor_step_torch,
compressor_emit_torch, decode_attention_torch). Same operations in the same order where
rounding is exact-by-rule (RMS sums in float64, correctly rounded divisions and square roots,
FP8/FP4/F16 grids, the Hadamard butterfly); the float32 sums of the dot products and of the
softmax run in another order (relative differences ~1e-6, which can move a value across an
FP8/FP4 rounding boundary now and then).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4tp.kernels import pdl
from ds4tp.kernels.cuda_c import Switch
from ds4tp.kernels.triton_pdl import pdl_start
from ds4tp.kernels.triton_matvec import _TICKETS, _f16_head_tail, _rint_clamped, _tickets
from ds4tp.kernels.triton_norm import rms_from_squares


@triton.jit
def _rope_cs(cos_ptr, sin_ptr, pos, D: tl.constexpr, NROT: tl.constexpr):
    """cos/sin per adjacent pair of a [D] vector at position pos: the table's row for the last
    NROT dims (GPT-J pairs), identity (1, 0) for the others."""
    i = tl.arange(0, D // 2)
    tail = i >= (D - NROT) // 2
    j = pos * (NROT // 2) + i - (D - NROT) // 2
    c = tl.load(cos_ptr + j, mask=tail, other=1.0)
    s = tl.load(sin_ptr + j, mask=tail, other=0.0)
    return c, s


@triton.jit
def _rope(x, c, s, D: tl.constexpr):
    """Rotate the adjacent pairs (x[2i], x[2i+1]) of a [D] vector by (c[i], s[i])."""
    x0, x1 = tl.split(tl.reshape(x, (D // 2, 2)))
    return tl.reshape(tl.join(x0 * c - x1 * s, x0 * s + x1 * c), (D,))


@triton.jit
def _pow2(k):
    """2**k as float32 for integer k in [-126, 127] (exact, from the exponent bits)."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _pow2_grid_blocks(b, FLOOR: tl.constexpr, QMAX: tl.constexpr, MANT: tl.constexpr,
                      MIN_EXP: tl.constexpr):
    """Round trip of blocks b [NB, BS] through a small float grid with a power-of-two scale per
    block (numerics._pow2_ceil, _round_to_grid): amax floored at FLOOR, scale
    2**ceil(log2(amax/QMAX)), v = b/scale clamped to +-QMAX, rounded half-even to MANT mantissa
    bits (quantum 2**max(e-1-MANT, MIN_EXP) for |v| in [2**(e-1), 2**e)), times the scale."""
    amax = tl.maximum(tl.max(tl.abs(b), axis=1), FLOOR)
    y = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
    yb = y.to(tl.int32, bitcast=True)
    ey = ((yb >> 23) & 255) - 127 + ((yb & 0x7FFFFF) != 0).to(tl.int32)     # ceil(log2(y)), y normal
    v = b * _pow2(-ey)[:, None]                                             # exact: a power of two
    v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 255) - 126                  # frexp exponent (0 -> -126)
    qe = tl.maximum(e - 1 - MANT, MIN_EXP)
    t = v * _pow2(-qe)                                                      # exact; |t| < 2**(MANT+2)
    r = _rint_clamped(t).to(tl.float32)                                     # rint, half-even
    return (r * _pow2(qe)) * _pow2(ey)[:, None]


@triton.jit
def _fp8_e4m3_blocks(b):
    """E4M3 round trip of blocks b [NB, 64] (numerics.fp8_e4m3_blocks): amax floored at 1e-4,
    grid max 448, 3 mantissa bits, subnormal quantum 2**-9."""
    return _pow2_grid_blocks(b, 1e-4, 448.0, 3, -9)


@triton.jit
def _kv_store_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, pos_ptr, ring_ptr, rpos_ptr, n_swa, eps,
                     D: tl.constexpr, NROT: tl.constexpr,
                     PDL: tl.constexpr = False):
    pdl_start(PDL)
    pos = tl.load(pos_ptr)
    d = tl.arange(0, D)
    c, s = _rope_cs(cos_ptr, sin_ptr, pos, D, NROT)
    y = _kv_row(tl.load(x_ptr + d), w_ptr, c, s, eps, D, NROT)
    slot = pos % n_swa
    tl.store(ring_ptr + slot * D + d, y)
    tl.store(rpos_ptr + slot, pos)


@triton.jit
def _kv_row(x, w_ptr, c, s, eps, D: tl.constexpr, NROT: tl.constexpr):
    """A projected KV row x [D] as the cache holds it: RMS norm with weight, RoPE (c, s from
    _rope_cs), FP8 of the non-RoPE dims, F16 (model.kv_cache_row of rms_norm)."""
    d = tl.arange(0, D)
    xd = x.to(tl.float64)
    y = (x * rms_from_squares(xd * xd, D, eps)) * tl.load(w_ptr + d)
    y = _rope(y, c, s, D)
    b = tl.reshape(y, (D // 64, 64))
    nope = (tl.arange(0, D // 64) < (D - NROT) // 64)[:, None]
    y = tl.reshape(tl.where(nope, _fp8_e4m3_blocks(b), b), (D,))
    return y.to(tl.float16).to(tl.float32)


@triton.jit
def _kv_rows_kernel(x_ptr, sx, w_ptr, cos_ptr, sin_ptr, out_ptr, eps, D: tl.constexpr,
                    NROT: tl.constexpr):
    """Program t: row t of x (stride sx) as the cache holds it, with row t of cos/sin, into
    row t of out [T, D]."""
    t = tl.program_id(0)
    d = tl.arange(0, D)
    c, s = _rope_cs(cos_ptr, sin_ptr, t, D, NROT)
    tl.store(out_ptr + t * D + d, _kv_row(tl.load(x_ptr + t * sx + d), w_ptr, c, s, eps, D, NROT))


@triton.jit
def _comp_step_rows(x_ptr, wkv_ptr, wsc_ptr, ape_ptr, pos_ptr, fkv_ptr, fsc_ptr, W, E, ratio, blk,
                    BN: tl.constexpr, BE: tl.constexpr):
    """Rows blk*BN.. of both F16 projections [W, E] against x [E] (float32 sums) into the
    frontier slot of the position."""
    rows = blk * BN + tl.arange(0, BN)
    rmask = rows < W
    ee = tl.arange(0, BE)
    akv = tl.zeros([BN, BE], tl.float32)
    asc = tl.zeros([BN, BE], tl.float32)
    woff = rows.to(tl.int64)[:, None] * E
    for e0 in range(0, E, BE):
        em = (e0 + ee) < E
        xv = tl.load(x_ptr + e0 + ee, mask=em, other=0.0)[None, :]
        m = rmask[:, None] & em[None, :]
        akv += tl.load(wkv_ptr + woff + e0 + ee[None, :], mask=m, other=0.0).to(tl.float32) * xv
        asc += tl.load(wsc_ptr + woff + e0 + ee[None, :], mask=m, other=0.0).to(tl.float32) * xv
    pos = tl.load(pos_ptr)
    ph = pos % ratio
    slot = tl.where(ratio == 4, ph + 4, ph)        # ratio 4: [previous | current] window
    kv = tl.sum(akv, axis=1)
    sc = tl.sum(asc, axis=1) + tl.load(ape_ptr + ph * W + rows, mask=rmask, other=0.0)
    tl.store(fkv_ptr + slot * W + rows, kv, mask=rmask)
    tl.store(fsc_ptr + slot * W + rows, sc, mask=rmask)


@triton.jit
def _comp_step_kernel(x_ptr, wkv_ptr, wsc_ptr, ape_ptr, pos_ptr, fkv_ptr, fsc_ptr, W, E, ratio,
                      BN: tl.constexpr, BE: tl.constexpr,
                      PDL: tl.constexpr = False):
    """One compressor: program n takes rows n*BN.. of its two projections."""
    pdl_start(PDL)
    _comp_step_rows(x_ptr, wkv_ptr, wsc_ptr, ape_ptr, pos_ptr, fkv_ptr, fsc_ptr, W, E, ratio,
                    tl.program_id(0), BN, BE)


@triton.jit
def _comp_pair_kernel(x_ptr, pos_ptr, E, ratio, na,
                      akv_ptr, asc_ptr, aape_ptr, afkv_ptr, afsc_ptr, WA,
                      bkv_ptr, bsc_ptr, bape_ptr, bfkv_ptr, bfsc_ptr, WB,
                      BNA: tl.constexpr, BNB: tl.constexpr, BE: tl.constexpr,
                      PDL: tl.constexpr = False):
    """Two compressors of the same token (a ratio-4 layer's attention and indexer compressors)
    in one launch: programs 0..na-1 take compressor a's rows BNA at a time, the rest b's."""
    pdl_start(PDL)
    p = tl.program_id(0)
    if p < na:
        _comp_step_rows(x_ptr, akv_ptr, asc_ptr, aape_ptr, pos_ptr, afkv_ptr, afsc_ptr, WA, E, ratio,
                        p, BNA, BE)
    else:
        _comp_step_rows(x_ptr, bkv_ptr, bsc_ptr, bape_ptr, pos_ptr, bfkv_ptr, bfsc_ptr, WB, E, ratio,
                        p - na, BNB, BE)


@triton.jit
def _hadamard(x, N: tl.constexpr, LOGN: tl.constexpr):
    """numerics.hadamard of a [N] vector: the same butterfly (pairs i, i + h for h = 1, 2, 4, ...;
    a + b then a - b), then one multiply by float32 1/sqrt(N)."""
    y = x
    for k in tl.static_range(LOGN):
        a, b = tl.split(tl.permute(tl.reshape(y, (N >> (k + 1), 2, 1 << k)), (0, 2, 1)))
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (N,))
    return y * (1.0 / N ** 0.5)


@triton.jit
def _fp4_e2m1_blocks(b):
    """E2M1 round trip of blocks b [NB, 32] (numerics.fp4_e2m1_blocks): amax floored at 2**-126 *
    6, grid max 6, 1 mantissa bit, subnormal quantum 2**-1."""
    return _pow2_grid_blocks(b, 7.052966104933725e-38, 6.0, 1, -1)


@triton.jit
def _pool_two_windows(pv, ps, cv, cs):
    """A ratio-4 row's pooling: per channel, the softmax of the 8 gates (previous window ps,
    current window cs, [4, HD] each) times the values pv, cv, summed (torch.softmax(w, 0) * v)."""
    m = tl.maximum(tl.max(ps, axis=0), tl.max(cs, axis=0))
    ep, ec = tl.exp(ps - m[None, :]), tl.exp(cs - m[None, :])
    den = tl.sum(ep, axis=0) + tl.sum(ec, axis=0)
    return tl.sum(ep / den[None, :] * pv, axis=0) + tl.sum(ec / den[None, :] * cv, axis=0)


@triton.jit
def _comp_row_finish(x, norm_ptr, c, s, eps, HD: tl.constexpr, NROT: tl.constexpr,
                     INDEX: tl.constexpr, LOGHD: tl.constexpr):
    """A pooled row x [HD] as the cache holds it: RMS norm with weight, RoPE (c, s from
    _rope_cs), then Hadamard + FP4 (index rows) or FP8 of the non-RoPE dims (kv rows), F16."""
    d = tl.arange(0, HD)
    xd = x.to(tl.float64)
    y = (x * rms_from_squares(xd * xd, HD, eps)) * tl.load(norm_ptr + d)
    y = _rope(y, c, s, HD)
    if INDEX:
        y = tl.reshape(_fp4_e2m1_blocks(tl.reshape(_hadamard(y, HD, LOGHD), (HD // 32, 32))), (HD,))
    else:
        b = tl.reshape(y, (HD // 64, 64))
        nope = (tl.arange(0, HD // 64) < (HD - NROT) // 64)[:, None]
        y = tl.reshape(tl.where(nope, _fp8_e4m3_blocks(b), b), (HD,))
    return y.to(tl.float16).to(tl.float32)


@triton.jit
def _comp_emit(fkv_ptr, fsc_ptr, norm_ptr, cos_ptr, sin_ptr, pos_ptr, cache_ptr, eps,
               HD: tl.constexpr, NROT: tl.constexpr, INDEX: tl.constexpr, LOGHD: tl.constexpr,
               POOL_ONLY: tl.constexpr):
    """A ratio-4 frontier [8, 2HD] (rows 0-3 the previous window, 4-7 the current one) pooled
    into the compressed row (pos+1)/4 - 1 of cache, then the current window moved to rows 0-3.
    POOL_ONLY: the pooled channels [HD] (a rank's share, finished after a gather) to cache_ptr."""
    pos = tl.load(pos_ptr)
    W: tl.constexpr = 2 * HD
    r4 = tl.arange(0, 4)[:, None]
    d = tl.arange(0, HD)
    prev = r4 * W + d[None, :]              # previous window through the first half
    cur = (r4 + 4) * W + HD + d[None, :]    # current window through the second half
    pv, ps = tl.load(fkv_ptr + prev), tl.load(fsc_ptr + prev)
    cv, cs = tl.load(fkv_ptr + cur), tl.load(fsc_ptr + cur)
    cv_lo, cs_lo = tl.load(fkv_ptr + cur - HD), tl.load(fsc_ptr + cur - HD)
    x = _pool_two_windows(pv, ps, cv, cs)
    if POOL_ONLY:
        tl.store(cache_ptr + d, x)
    else:
        c, s = _rope_cs(cos_ptr, sin_ptr, pos - 3, HD, NROT)                 # the window's first position
        y = _comp_row_finish(x, norm_ptr, c, s, eps, HD, NROT, INDEX, LOGHD)
        tl.store(cache_ptr + ((pos + 1) // 4 - 1) * HD + d, y)
    tl.debug_barrier()                      # every lane's frontier reads are done
    tl.store(fkv_ptr + prev, cv_lo)
    tl.store(fsc_ptr + prev, cs_lo)
    tl.store(fkv_ptr + prev + HD, cv)
    tl.store(fsc_ptr + prev + HD, cs)


@triton.jit
def _comp_emit_kernel(fkv_ptr, fsc_ptr, norm_ptr, cos_ptr, sin_ptr, pos_ptr, cache_ptr, eps,
                      HD: tl.constexpr, NROT: tl.constexpr, INDEX: tl.constexpr,
                      LOGHD: tl.constexpr, POOL_ONLY: tl.constexpr = False, PDL: tl.constexpr = False):
    """One compressor's emission (_comp_emit) in one program."""
    pdl_start(PDL)
    _comp_emit(fkv_ptr, fsc_ptr, norm_ptr, cos_ptr, sin_ptr, pos_ptr, cache_ptr, eps, HD, NROT,
               INDEX, LOGHD, POOL_ONLY)


@triton.jit
def _comp_emit_pair_kernel(afkv_ptr, afsc_ptr, anorm_ptr, acache_ptr, bfkv_ptr, bfsc_ptr, bnorm_ptr,
                           bcache_ptr, cos_ptr, sin_ptr, pos_ptr, eps,
                           HDA: tl.constexpr, INDEXA: tl.constexpr, LOGHDA: tl.constexpr,
                           HDB: tl.constexpr, INDEXB: tl.constexpr, LOGHDB: tl.constexpr,
                           NROT: tl.constexpr, PDL: tl.constexpr = False):
    """Two compressors' emissions of the same token (a ratio-4 layer's attention and indexer
    compressors, the same RoPE tables) in one launch: program 0 emits a's row, program 1 b's."""
    pdl_start(PDL)
    if tl.program_id(0) == 0:
        _comp_emit(afkv_ptr, afsc_ptr, anorm_ptr, cos_ptr, sin_ptr, pos_ptr, acache_ptr, eps, HDA,
                   NROT, INDEXA, LOGHDA, False)
    else:
        _comp_emit(bfkv_ptr, bfsc_ptr, bnorm_ptr, cos_ptr, sin_ptr, pos_ptr, bcache_ptr, eps, HDB,
                   NROT, INDEXB, LOGHDB, False)


# Integer arguments that follow a prompt's position or length are not specialised: Triton
# compiles a new variant for an integer that equals 1 or is divisible by 16, so a served prompt
# fed at a new position (its suffix after prefix reuse) compiled kernels for 1-17 s on an H200
# (bench/warm_profile.py --chain, device mode s14c: this kernel, _prefill_attn_kernel, and
# triton_gemm's _split_h16_kernel and _expert_tiles_kernel).
@triton.jit(do_not_specialize=["c0", "base"])
def _comp_rows_kernel(kv_ptr, sc_ptr, norm_ptr, cos_ptr, sin_ptr, out_ptr, c0, base, eps,
                      W: tl.constexpr, HD: tl.constexpr, NROT: tl.constexpr, RATIO: tl.constexpr,
                      INDEX: tl.constexpr, LOGHD: tl.constexpr, BR: tl.constexpr,
                      POOL_ONLY: tl.constexpr = False):
    """Program i: compressed row c = c0 + i of a prefill, pooled from the projections kv, sc
    [N, W] whose row 0 is position `base`, finished (norm, RoPE with row i of cos/sin, quant,
    F16) into row i of out [n, HD]. Ratio 4 (W = 2HD): positions 4c-4.. through the first half
    (none before position 0) and 4c.. through the second; other ratios (W = HD): positions
    RATIO*c.. in blocks of BR rows (max, then the denominators, then the weighted sum).
    POOL_ONLY: row i of out holds the pooled channels (a rank's share, finished after a gather)."""
    i = tl.program_id(0)
    c = c0 + i
    d = tl.arange(0, HD)
    if RATIO == 4:
        r4 = tl.arange(0, 4)[:, None]
        ppos = c * 4 - 4 + r4
        prev = (tl.maximum(ppos, 0) - base) * W + d[None, :]
        cur = (c * 4 + r4 - base) * W + HD + d[None, :]
        pv = tl.load(kv_ptr + prev)
        ps = tl.where(ppos >= 0, tl.load(sc_ptr + prev), float("-inf"))
        x = _pool_two_windows(pv, ps, tl.load(kv_ptr + cur), tl.load(sc_ptr + cur))
    else:
        rr = tl.arange(0, BR)[:, None]
        first = (c * RATIO - base) * W
        m = tl.full([HD], float("-inf"), tl.float32)
        for k0 in range(0, RATIO, BR):
            m = tl.maximum(m, tl.max(tl.load(sc_ptr + first + (k0 + rr) * W + d[None, :]), axis=0))
        den = tl.zeros([HD], tl.float32)
        for k0 in range(0, RATIO, BR):
            den += tl.sum(tl.exp(tl.load(sc_ptr + first + (k0 + rr) * W + d[None, :]) - m[None, :]), axis=0)
        x = tl.zeros([HD], tl.float32)
        for k0 in range(0, RATIO, BR):
            off = first + (k0 + rr) * W + d[None, :]
            e = tl.exp(tl.load(sc_ptr + off) - m[None, :])
            x += tl.sum(e / den[None, :] * tl.load(kv_ptr + off), axis=0)
    if POOL_ONLY:
        tl.store(out_ptr + i * HD + d, x)
    else:
        c_, s_ = _rope_cs(cos_ptr, sin_ptr, i, HD, NROT)
        y = _comp_row_finish(x, norm_ptr, c_, s_, eps, HD, NROT, INDEX, LOGHD)
        tl.store(out_ptr + i * HD + d, y)


@triton.jit
def _comp_finish_kernel(x_ptr, norm_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr, eps,
                        RATIO: tl.constexpr, HD: tl.constexpr, NROT: tl.constexpr,
                        INDEX: tl.constexpr, LOGHD: tl.constexpr, DECODE: tl.constexpr,
                        PDL: tl.constexpr = False):
    """Program i: pooled row i of x [n, HD] (gathered from the ranks' channels) finished as the
    cache holds it. DECODE (n = 1): rotated at the window's first position pos+1-RATIO (cos/sin:
    tables over all positions) into row (pos+1)/RATIO - 1 of out (the cache); else with row i of
    cos/sin into row i of out."""
    pdl_start(PDL)
    i = tl.program_id(0)
    d = tl.arange(0, HD)
    x = tl.load(x_ptr + i * HD + d)
    if DECODE:
        pos = tl.load(pos_ptr)
        c, s = _rope_cs(cos_ptr, sin_ptr, pos + 1 - RATIO, HD, NROT)
        row = (pos + 1) // RATIO - 1
    else:
        c, s = _rope_cs(cos_ptr, sin_ptr, i, HD, NROT)
        row = i
    tl.store(out_ptr + row * HD + d, _comp_row_finish(x, norm_ptr, c, s, eps, HD, NROT, INDEX, LOGHD))


@triton.jit
def _online(q, kv, ok, scale, m, l, acc):
    """One block of keys kv [BK, D] (K = V) into the running max m, denominator l and value
    sum acc [D]; rows not ok score -inf (m starts finite, so an all-masked block changes nothing)."""
    sc = tl.where(ok, tl.sum(kv * q[None, :], axis=1) * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(sc, axis=0))
    alpha = tl.exp(m - m_new)
    p = tl.exp(sc - m_new)
    return m_new, l * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p[:, None] * kv, axis=0)


@triton.jit
def _ring_block(rpos_ptr, ring_ptr, rows, d, pos, n_swa, D: tl.constexpr):
    """Ring rows `rows` in the window of pos (ok) and their values (0 where not ok)."""
    rp = tl.load(rpos_ptr + rows, mask=rows < n_swa, other=-(1 << 40))
    ok = (rp <= pos) & (rp > pos - n_swa)
    return ok, tl.load(ring_ptr + rows[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _attn_kernel(qb_ptr, ring_ptr, rpos_ptr, comp_ptr, mask_ptr, sink_ptr, cos_ptr, sin_ptr,
                 pos_ptr, out_ptr, ws_ptr, cnt_ptr, n_swa, ratio, eps, scale,
                 D: tl.constexpr, NROT: tl.constexpr, BK: tl.constexpr, S: tl.constexpr,
                 HAS_COMP: tl.constexpr, HAS_MASK: tl.constexpr, HOIST: tl.constexpr = True,
                 PDL: tl.constexpr = False, K_ROWS: tl.constexpr = 0):
    """Grid (H, S): program (h, j) takes key blocks j, j+S, ... of the ring and of the compressed
    rows (split-K over keys, so a head's keys are read by S programs at once) and leaves its
    partial (max, denominator, value sum) in the workspace; the last of a head's S programs to
    arrive (atomic ticket) merges the partials in the order j = 0..S-1 with the sink, applies the
    inverse RoPE and stores the head. K_ROWS > 0: mask_ptr holds the indexer's selected rows
    instead of a mask (int32 [K_ROWS], -1 past the count), and the blocks are blocks of that
    list: only the selected rows are walked, not every visible one."""
    pdl_start(PDL)
    h = tl.program_id(0)
    j = tl.program_id(1)
    pos = tl.load(pos_ptr)
    d = tl.arange(0, D)
    kk = tl.arange(0, BK)
    q = tl.load(qb_ptr + h * D + d)
    if HOIST:   # the program's first ring block asked for with q (its mask needs only pos and
        ok0, kv0 = _ring_block(rpos_ptr, ring_ptr, j * BK + kk, d, pos, n_swa, D)   # ring_pos):
        # its rows arrive while q is normed and rotated
    qd = q.to(tl.float64)
    q = q * rms_from_squares(qd * qd, D, eps)           # per head, no weight
    c, s = _rope_cs(cos_ptr, sin_ptr, pos, D, NROT)
    q = _rope(q, c, s, D)
    m = tl.full([], -1e30, tl.float32)
    l = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([D], tl.float32)
    if HOIST:   # (the same blocks through _online in the same order: the same bits)
        m, l, acc = _online(q, kv0, ok0, scale, m, l, acc)
        ring0 = j * BK + S * BK
    else:
        ring0 = j * BK
    for k0 in range(ring0, n_swa, S * BK):
        ok, kv = _ring_block(rpos_ptr, ring_ptr, k0 + kk, d, pos, n_swa, D)
        m, l, acc = _online(q, kv, ok, scale, m, l, acc)
    if HAS_COMP and K_ROWS > 0:
        for k0 in range(j * BK, K_ROWS, S * BK):
            e = k0 + kk
            rows = tl.load(mask_ptr + e, mask=e < K_ROWS, other=-1)
            ok = rows >= 0
            kv = tl.load(comp_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
            m, l, acc = _online(q, kv, ok, scale, m, l, acc)
    elif HAS_COMP:
        n_vis = (pos + 1) // ratio
        for k0 in range(j * BK, n_vis, S * BK):
            rows = k0 + kk
            ok = rows < n_vis
            if HAS_MASK:
                ok = ok & (tl.load(mask_ptr + rows, mask=ok, other=0) != 0)
            kv = tl.load(comp_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
            m, l, acc = _online(q, kv, ok, scale, m, l, acc)
    # partials: [H, S, D + 2] (value sum, then max and denominator)
    wrow = ws_ptr + (h * S + j).to(tl.int64) * (D + 2)
    tl.store(wrow + d, acc)
    tl.store(wrow + D, m)
    tl.store(wrow + D + 1, l)
    tl.debug_barrier()                                  # all partial stores before the ticket
    ticket = tl.atomic_add(cnt_ptr + h, 1)              # acq_rel, gpu scope
    if ticket == S - 1:
        jj = tl.arange(0, S)
        hrow = ws_ptr + (h * S + jj).to(tl.int64) * (D + 2)
        mj = tl.load(hrow + D, cache_modifier=".cg")
        lj = tl.load(hrow + D + 1, cache_modifier=".cg")
        sink = tl.load(sink_ptr + h)                    # the sink joins max and denominator
        mt = tl.maximum(tl.max(mj, axis=0), sink)
        wj = tl.exp(mj - mt)
        lt = tl.sum(lj * wj, axis=0) + tl.exp(sink - mt)
        aj = tl.load(hrow[:, None] + d[None, :], cache_modifier=".cg")
        o = tl.sum(aj * wj[:, None], axis=0)
        o = tl.math.div_rn(o, tl.broadcast_to(lt, o.shape))
        o = _rope(o, c, -s, D)                          # inverse RoPE of the output
        tl.store(out_ptr + h * D + d, o)
        tl.atomic_xchg(cnt_ptr + h, 0)


ATTN_ROWS = True   # the decode graphs hand the attention the indexer's selected rows as a list
                   # (topk_mask(rows=), attention(rows=)) instead of only the mask over every
                   # visible row: a ratio-4 layer past 4 * top_k tokens walks top_k rows, not
                   # all (pos+1)/4. Replay at depth 4096 (s36a): -3.8% at TP=2, -2.5% at TP=1
                   # against the mask (critical_path variant attn_mask)
ATTN_HOIST = True  # the first ring block loaded with q (replay A/B s34g: -0.8% at TP=2, -0.2% at
                   # TP=1, bit-identical); the first compressed block too spilled at 2 warps (s34f)
ATTN_BK = 16      # keys per block
ATTN_SPLIT = 8    # programs per head (split-K over keys): the ring's 128 rows are 8 blocks
                  # (4 without the indexer's mask was slower at TP=2, s31c)
ATTN_WARPS = 4    # warps per program, up to 32 heads (a TP=2 rank's)
ATTN_WARPS_MANY = 2  # from 64 heads (TP=1: 512 programs); replay A/B (s33f): -2.0% at TP=1
                     # against 4 warps, where 2 at TP=2 were +1.0%


def attn_warps(H: int) -> int:
    """Warps a program of the decode attention for H heads on this rank."""
    return ATTN_WARPS_MANY if H >= 64 else ATTN_WARPS


def _check(name, v, shape, dtype=torch.float32):
    if tuple(v.shape) != tuple(shape) or v.dtype != dtype or not v.is_contiguous():
        raise ValueError(f"{name}: expected contiguous {dtype} {tuple(shape)}, got "
                         f"{v.dtype} {tuple(v.shape)}")


def _rope_row_width(name: str, label: str, D: int, cos) -> int:
    """n_rot from a RoPE table cos [rows, n_rot/2], checked against a cache row of D values: D a
    power of two and a multiple of 64, with its non-RoPE part in whole 64-value FP8 blocks."""
    n_rot = cos.shape[1] * 2 if cos.dim() == 2 else -1
    if D & (D - 1) or D % 64 or not 0 < n_rot <= D or (D - n_rot) % 64:
        raise ValueError(f"{name}: {label} {D} must be a power of two, a multiple of 64, with "
                         f"({label} - n_rot) % 64 == 0 (n_rot {n_rot})")
    return n_rot


def _check_rope(cos, sin, pos, n_rot):
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] * 2 != n_rot:
        raise ValueError(f"RoPE tables {tuple(cos.shape)} / {tuple(sin.shape)} do not match n_rot={n_rot}")
    _check("RoPE cos", cos, cos.shape)
    _check("RoPE sin", sin, sin.shape)
    _check("position", pos, (1,), torch.long)


KV_STORE_WARPS = 4   # warps of kv_store's one program (1, 2, 8 no faster at either width, s34b)


def kv_store(kv_lin, norm, cos, sin, pos, ring, ring_pos, eps):
    """kv_lin [1, D] (the attn_kv projection) -> the cache row written into ring [n_swa, D] at
    pos % n_swa, ring_pos [n_swa] (int64) set to pos."""
    n_swa, D = ring.shape
    n_rot = _rope_row_width("kv_store", "head_dim", D, cos)
    _check("kv_store: kv row", kv_lin, (1, D))
    _check("kv_store: norm weight", norm, (D,))
    _check("kv_store: ring positions", ring_pos, (n_swa,), torch.long)
    _check("kv_store: ring", ring, (n_swa, D))
    _check_rope(cos, sin, pos, n_rot)
    _kv_store_kernel[(1,)](kv_lin, norm, cos, sin, pos, ring, ring_pos, n_swa, eps, D=D,
                           NROT=n_rot, num_warps=KV_STORE_WARPS, **pdl.triton_args(kv_lin.device))


def kv_rows(kv_lin, norm, cos, sin, eps) -> torch.Tensor:
    """kv_lin [T, D] (the attn_kv projection; rows may be strided) -> the cache rows [T, D]:
    RMS norm with norm [D], RoPE with cos/sin [T, n_rot/2], FP8 of the non-RoPE dims, F16.
    One program per row (model.kv_rows' twin: kv_cache_row of rms_norm)."""
    T, D = kv_lin.shape
    n_rot = _rope_row_width("kv_rows", "head_dim", D, cos)
    if kv_lin.dtype != torch.float32 or kv_lin.stride(1) != 1:
        raise ValueError(f"kv_rows: kv rows must be float32 with unit column stride, got "
                         f"{kv_lin.dtype} strides {kv_lin.stride()}")
    _check("kv_rows: norm weight", norm, (D,))
    _check("kv_rows: cos", cos, (T, n_rot // 2))
    _check("kv_rows: sin", sin, (T, n_rot // 2))
    out = torch.empty(T, D, dtype=torch.float32, device=kv_lin.device)
    if T:
        _kv_rows_kernel[(T,)](kv_lin, kv_lin.stride(0), norm, cos, sin, out, eps, D=D, NROT=n_rot,
                              num_warps=4)
    return out


def _comp_step_args(x, wkv, wsc, ape, pos, front_kv, front_sc):
    """Checks one compressor step's arguments -> (ratio, W, E)."""
    r, W = ape.shape
    E = x.shape[1]
    _check("compressor_step: x", x, (1, E))
    _check("compressor_step: ape", ape, (r, W))
    for name, w in (("kv", wkv), ("gate", wsc)):
        _check(f"compressor_step: {name} weight bytes", w, (W, 2 * E), torch.uint8)
    rows = 8 if r == 4 else r
    _check("compressor_step: frontier kv", front_kv, (rows, W))
    _check("compressor_step: frontier gate", front_sc, (rows, W))
    _check("position", pos, (1,), torch.long)
    return r, W, E


def _comp_launch(W: int, E: int):
    """(rows per program, columns per step, warps) of one compressor's step.
    Launch shapes from bench/comp_step_sweep.py (s17s, one H200, graph-timed): rows of 256 or
    fewer (the indexer's, a TP=2 share of ratio 128) one row per program, 16 warps over the whole
    input (2.83-3.35 us against 3.58-3.92 before); 512 rows two per program (4.52 against 5.67);
    1024 (a whole ratio-4 kv) as before (7.37 us)."""
    if W <= 256:
        return 1, triton.next_power_of_2(E), 16
    if W <= 512:
        return 2, triton.next_power_of_2(E), 8
    return max(1, min(16, triton.next_power_of_2(W) // 256)), min(2048, triton.next_power_of_2(E)), 8


def compressor_step(x, wkv, wsc, ape, pos, front_kv, front_sc, *, launch=None):
    """x [1, E]; wkv, wsc the two F16 projections (raw uint8 [W, 2E]); ape [r, W]; front_kv /
    front_sc [rows, W]: writes kv and gate+ape of the token into the frontier slot of pos
    (ratio 4: 4 + pos % 4, else pos % r). launch: (rows per program, columns per step, warps)
    instead of the defaults (bench/comp_step_sweep.py)."""
    r, W, E = _comp_step_args(x, wkv, wsc, ape, pos, front_kv, front_sc)
    bn, be, warps = launch if launch is not None else _comp_launch(W, E)
    _comp_step_kernel[(triton.cdiv(W, bn),)](x, wkv.view(torch.float16), wsc.view(torch.float16),
                                             ape, pos, front_kv, front_sc, W, E, r, BN=bn, BE=be,
                                             num_warps=warps, **pdl.triton_args(x.device))


def _pair_launch(E: int):
    """(rows per program of a, of b, columns per step, warps) of compressor_pair: one row a
    program, 2048 columns a step, 8 warps. bench/comp_step_sweep.py --pairs (s33a, one H200,
    graph-timed, attention's and indexer's rows): 5.49 us at a TP=2 rank's 512 + 128 (the two
    launches 7.52; each compressor's shape as alone with the whole input a step, 6.58), 9.25 at
    the whole 1024 + 256 (best 9.21; the two launches 10.76; as alone 13.95)."""
    return 1, 1, min(2048, triton.next_power_of_2(E)), 8


def compressor_pair(x, a: tuple, b: tuple, pos, *, launch=None):
    """Two compressor steps of the same token x [1, E] in one launch (a ratio-4 layer's attention
    and indexer compressors): a and b each (wkv, wsc, ape, front_kv, front_sc) as compressor_step
    takes them, with the same ratio. launch: (rows per program of a, of b, columns per step,
    warps) instead of the defaults. The twin: compressor_step_torch of each."""
    ra, WA, E = _comp_step_args(x, *a[:3], pos, *a[3:])
    rb, WB, _ = _comp_step_args(x, *b[:3], pos, *b[3:])
    if ra != rb:
        raise ValueError(f"compressor_pair: ratios {ra} and {rb} differ")
    bna, bnb, be, warps = launch if launch is not None else _pair_launch(E)
    na = triton.cdiv(WA, bna)
    (akv, asc, aape, afkv, afsc), (bkv, bsc, bape, bfkv, bfsc) = a, b
    _comp_pair_kernel[(na + triton.cdiv(WB, bnb),)](
        x, pos, E, ra, na,
        akv.view(torch.float16), asc.view(torch.float16), aape, afkv, afsc, WA,
        bkv.view(torch.float16), bsc.view(torch.float16), bape, bfkv, bfsc, WB,
        BNA=bna, BNB=bnb, BE=be, num_warps=warps, **pdl.triton_args(x.device))


_pair_switch = Switch()
set_pair_enabled = _pair_switch.set     # benchmarks time the two launches in the same run


def pair_enabled() -> bool:
    return _pair_switch.on


EMIT_WARPS = 4      # warps of a decode token's emission programs (compressor_emit, _emit_pair,
                    # compressor_pool, compressor_finish of one row); on an emitting step (s36f)
                    # 2, 8, 16 were +0.3%, +1.9%, +1.1% at TP=2 and +0.9%, +0.3%, +2.6% at TP=1


def _emit_args(front_kv, front_sc, norm, cos, sin, pos, cache) -> tuple[int, int]:
    """Checks one ratio-4 compressor's emission arguments -> (row width HD, RoPE width)."""
    cap, HD = cache.shape
    n_rot = _rope_row_width("compressor_emit", "row width", HD, cos)
    _check("compressor_emit: frontier kv", front_kv, (8, 2 * HD))
    _check("compressor_emit: frontier gate", front_sc, (8, 2 * HD))
    _check("compressor_emit: norm weight", norm, (HD,))
    _check("compressor_emit: cache", cache, (cap, HD))
    _check_rope(cos, sin, pos, n_rot)
    return HD, n_rot


def compressor_emit(front_kv, front_sc, norm, cos, sin, pos, cache, index: bool, eps):
    """A ratio-4 compressor's emission at a token ending its window (pos % 4 == 3): the frontier
    front_kv / front_sc [8, 2HD] pooled (softmax of the gates per channel), RMS-normed with norm
    [HD], rotated at position pos - 3 (cos/sin: the compressed-RoPE tables), then FP8 of the
    non-RoPE dims (kv rows) or Hadamard + FP4 (index rows, `index`), F16, written to row
    (pos+1)/4 - 1 of cache [cap, HD]; then rows 4-7 of the frontier are moved to rows 0-3.
    The position is read on the device, so the row is not checked here: the caller sizes cache
    for its positions (decode_graph.StaticDecoder: max_ctx // 4 + 1 rows, steps refused beyond)."""
    HD, n_rot = _emit_args(front_kv, front_sc, norm, cos, sin, pos, cache)
    _comp_emit_kernel[(1,)](front_kv, front_sc, norm, cos, sin, pos, cache, eps, HD=HD, NROT=n_rot,
                            INDEX=bool(index), LOGHD=HD.bit_length() - 1, num_warps=EMIT_WARPS,
                            **pdl.triton_args(front_kv.device))


def compressor_emit_pair(a: tuple, b: tuple, cos, sin, pos, eps):
    """Two ratio-4 compressors' emissions of the same token in one launch (a layer's attention
    and indexer compressors): a and b each (front_kv, front_sc, norm, cache, index) as
    compressor_emit takes them, with the same RoPE tables. The twin: compressor_emit_torch of
    each."""
    (afkv, afsc, anorm, acache, aidx), (bfkv, bfsc, bnorm, bcache, bidx) = a, b
    HDA, rot_a = _emit_args(afkv, afsc, anorm, cos, sin, pos, acache)
    HDB, _ = _emit_args(bfkv, bfsc, bnorm, cos, sin, pos, bcache)     # (the same n_rot)
    _comp_emit_pair_kernel[(2,)](afkv, afsc, anorm, acache, bfkv, bfsc, bnorm, bcache, cos, sin, pos,
                                 eps, HDA=HDA, INDEXA=bool(aidx), LOGHDA=HDA.bit_length() - 1,
                                 HDB=HDB, INDEXB=bool(bidx), LOGHDB=HDB.bit_length() - 1, NROT=rot_a,
                                 num_warps=EMIT_WARPS, **pdl.triton_args(afkv.device))


_emit_pair_switch = Switch()
set_emit_pair_enabled = _emit_pair_switch.set   # benchmarks time the two launches in the same run


def emit_pair_enabled() -> bool:
    return _emit_pair_switch.on


def compressor_pool(front_kv, front_sc, pos) -> torch.Tensor:
    """compressor_emit's pooling alone, for a rank that holds a share of the channels: the
    ratio-4 frontier [8, 2C] pooled into [1, C] (returned; finished by compressor_finish after
    the ranks' shares are gathered), then rows 4-7 moved to rows 0-3."""
    C = front_kv.shape[1] // 2
    if C & (C - 1) or C < 16:
        raise ValueError(f"compressor_pool: {C} channels must be a power of two >= 16")
    _check("compressor_pool: frontier kv", front_kv, (8, 2 * C))
    _check("compressor_pool: frontier gate", front_sc, (8, 2 * C))
    _check("position", pos, (1,), torch.long)
    out = torch.empty(1, C, dtype=torch.float32, device=front_kv.device)
    _comp_emit_kernel[(1,)](front_kv, front_sc, front_kv, front_kv, front_kv, pos, out, 0.0, HD=C,
                            NROT=0, INDEX=False, LOGHD=0, POOL_ONLY=True, num_warps=EMIT_WARPS,
                            **pdl.triton_args(front_kv.device))
    return out


def compressor_finish(x, norm, cos, sin, index: bool, eps, *, pos=None, cache=None,
                      ratio: int = 0) -> torch.Tensor | None:
    """Pooled rows x [n, HD] (the ranks' channels gathered) finished as the cache holds them:
    RMS norm with norm [HD], RoPE, then FP8 of the non-RoPE dims (kv rows) or Hadamard + FP4
    (index rows), F16. A prefill's rows (pos None): cos/sin [n, n_rot/2] row by row, returns
    [n, HD]. A decode token's row (pos [1] on the device, n = 1, cos/sin the tables over all
    positions): written into row (pos+1)/ratio - 1 of cache [cap, HD], rotated at position
    pos+1-ratio; returns None (the caller sizes cache for its positions, as compressor_emit)."""
    n, HD = x.shape
    n_rot = _rope_row_width("compressor_finish", "row width", HD, cos)
    _check("compressor_finish: rows", x, (n, HD))
    _check("compressor_finish: norm weight", norm, (HD,))
    decode = pos is not None
    if decode:
        if n != 1 or cache is None or ratio < 1:
            raise ValueError("compressor_finish: a decode row needs n = 1, the cache and the ratio")
        _check("compressor_finish: cache", cache, (cache.shape[0], HD))
        _check_rope(cos, sin, pos, n_rot)
        out = cache
    else:
        _check("compressor_finish: cos", cos, (n, n_rot // 2))
        _check("compressor_finish: sin", sin, (n, n_rot // 2))
        out = torch.empty(n, HD, dtype=torch.float32, device=x.device)
        pos = x                                  # unread
    if n:
        _comp_finish_kernel[(n,)](x, norm, cos, sin, pos, out, eps, RATIO=max(ratio, 1), HD=HD,
                                  NROT=n_rot, INDEX=bool(index), LOGHD=HD.bit_length() - 1,
                                  DECODE=decode, num_warps=EMIT_WARPS if decode else 4,
                                  **pdl.triton_args(x.device))
    return None if decode else out


def compressor_rows(kv, sc, base: int, c0: int, n: int, ratio: int, norm, cos, sin, index: bool,
                    eps, *, pool_only: bool = False) -> torch.Tensor:
    """A prefill's compressed rows c0 .. c0+n-1 in one launch: kv, sc [N, W] the compressor's
    projections (gates with their position bias) at positions base .., pooled per channel by the
    softmax of the gates over each row's window (ratio 4: the previous window through the first
    half of W and the current one through the second; else the RATIO positions c*RATIO..), then
    RMS-normed with norm [HD], rotated with cos/sin [n, n_rot/2] (row i: position c*ratio),
    FP8 of the non-RoPE dims (kv rows) or Hadamard + FP4 (index rows, `index`), F16-rounded:
    -> [n, HD] float32 (model.compress's twin). pool_only: the pooled channels [n, C] alone, for
    a rank holding C of them (W = 2C or C; norm, cos, sin unread; compressor_finish after the
    gather)."""
    if pool_only:
        HD = kv.shape[1] // (2 if ratio == 4 else 1)
        n_rot = 0
        if HD & (HD - 1) or HD < 16:
            raise ValueError(f"compressor_rows: {HD} channels must be a power of two >= 16")
    else:
        HD = norm.shape[0]
        n_rot = _rope_row_width("compressor_rows", "row width", HD, cos)
    W = 2 * HD if ratio == 4 else HD
    if ratio != 4 and (ratio & (ratio - 1) or ratio < 8 or index):
        raise ValueError(f"compressor_rows: ratio {ratio} must be 4, or a power of two >= 8 for kv rows")
    _check("compressor_rows: kv", kv, (kv.shape[0], W))
    _check("compressor_rows: gates", sc, (kv.shape[0], W))
    if not pool_only:
        _check("compressor_rows: norm weight", norm, (HD,))
        _check("compressor_rows: cos", cos, (n, n_rot // 2))
        _check("compressor_rows: sin", sin, (n, n_rot // 2))
    lo = max(0, (c0 - 1) * 4) if ratio == 4 else c0 * ratio        # first position read
    hi = (c0 + n) * ratio                                            # one past the last
    if n < 1 or c0 < 0 or lo < base or hi - base > kv.shape[0]:
        raise ValueError(f"compressor_rows: rows {c0}..{c0 + n - 1} need positions {lo}..{hi - 1}, "
                         f"the projections hold {base}..{base + kv.shape[0] - 1}")
    out = torch.empty(n, HD, dtype=torch.float32, device=kv.device)
    _comp_rows_kernel[(n,)](kv, sc, norm, cos, sin, out, c0, base, eps, W=W, HD=HD, NROT=n_rot,
                            RATIO=ratio, INDEX=bool(index), LOGHD=HD.bit_length() - 1,
                            BR=min(ratio, 8), POOL_ONLY=pool_only, num_warps=4)
    return out


_rows_switch = Switch()
set_rows_enabled = _rows_switch.set     # benchmarks time model.compress's torch twin in the same run


def rows_enabled() -> bool:
    return _rows_switch.on


_emit_switch = Switch()
set_emit_enabled = _emit_switch.set     # benchmarks time the torch twin in the same run


def emit_enabled() -> bool:
    return _emit_switch.on


def check_attention(qb, ring, ring_pos, comp, ratio, mask, sinks, cos, sin, pos, rows=None):
    """The decode attention's arguments checked (a ValueError naming the first that does not fit);
    returns n_swa, D, H, n_rot. Every decode attention kernel takes the same ones."""
    n_swa, D = ring.shape
    H = sinks.shape[0]
    n_rot = cos.shape[1] * 2
    if D & (D - 1) or n_rot > D or n_rot % 2:
        raise ValueError(f"attention: head_dim {D} must be a power of two >= n_rot {n_rot}")
    _check("attention: q", qb, (1, H * D))
    _check("attention: ring", ring, (n_swa, D))
    _check("attention: ring positions", ring_pos, (n_swa,), torch.long)
    _check("attention: sinks", sinks, (H,))
    _check_rope(cos, sin, pos, n_rot)
    if comp is not None:
        _check("attention: compressed rows", comp, (comp.shape[0], D))
        if ratio < 1:
            raise ValueError(f"attention: compression ratio {ratio} with compressed rows")
        if mask is not None:
            _check("attention: row mask", mask, (1, comp.shape[0]), torch.bool)
        if rows is not None:
            if rows.dim() != 1 or rows.dtype != torch.int32 or not rows.is_contiguous() or not rows.numel():
                raise ValueError(f"attention: the selected rows must be a contiguous non-empty int32 "
                                 f"list, got {rows.dtype} {tuple(rows.shape)}")
    elif mask is not None or rows is not None:
        raise ValueError("attention: a row mask or row list without compressed rows")
    if H > _TICKETS:
        raise ValueError(f"attention: {H} heads exceed the ticket buffer")
    return n_swa, D, H, n_rot


def attention(qb, ring, ring_pos, comp, ratio, mask, sinks, cos, sin, pos, eps, rows=None):
    """qb [1, H*D] (the attn_q_b projection) -> o [1, H, D]: per-head RMS norm and RoPE, attention
    with sinks over the ring rows in the window and the first (pos+1)//ratio rows of comp [cap, D]
    (those with mask [1, cap] set, if given), inverse RoPE. comp None: raw rows only. rows: the
    same selection as mask listed (int32, the visible rows mask sets, in any order, -1 past
    them; topk_mask(rows=)): the kernel then walks only those rows and does not read mask."""
    n_swa, D, H, n_rot = check_attention(qb, ring, ring_pos, comp, ratio, mask, sinks, cos, sin, pos,
                                         rows)
    out = torch.empty(1, H, D, dtype=torch.float32, device=qb.device)
    ws = torch.empty(H * ATTN_SPLIT * (D + 2), dtype=torch.float32, device=qb.device)
    sel = rows if rows is not None else ring_pos if mask is None else mask.view(torch.int8)
    _attn_kernel[(H, ATTN_SPLIT)](qb, ring, ring_pos, ring if comp is None else comp, sel, sinks,
                                  cos, sin, pos, out, ws, _tickets(qb.device), n_swa, max(ratio, 1),
                                  eps, 1.0 / D ** 0.5, D=D, NROT=n_rot, BK=ATTN_BK, S=ATTN_SPLIT,
                                  HAS_COMP=comp is not None,
                                  HAS_MASK=mask is not None and rows is None,
                                  HOIST=ATTN_HOIST, K_ROWS=0 if rows is None else rows.numel(),
                                  num_warps=attn_warps(H), **pdl.triton_args(qb.device))
    return out


# ---- the indexer of one decode token (ratio-4 layers, once more than top_k rows are visible) --
# Both launches read the visible row count on the device and touch only those rows, so their
# cost follows the sequence's depth, not the static decoder's capacity (max_ctx / 4 + 1 rows:
# torch's score GEMM and its stable sort of the whole row ran over all of them at every step).
@triton.jit
def _index_score_kernel(q_ptr, w_ptr, k_ptr, nvis_ptr, out_ptr, HI, cap, wscale,
                        BH: tl.constexpr, BR: tl.constexpr, HD: tl.constexpr,
                        PDL: tl.constexpr = False):
    """Program i: rows i*BR .. of the index cache. score[c] = sum_h relu(q_h . k_c) * w_h *
    wscale for c < n_visible, 0 past it (those rows are not read). The keys hold float16 values
    (FP4 rows, F16-rounded), so they go into the tensor cores as float16 exactly; the queries as
    a float16 head plus tail (~2^-22 relative), so each product is the float32 one and the sums
    run in float32 (against the twin: another summation order)."""
    pdl_start(PDL)
    nvis = tl.load(nvis_ptr)
    r0 = tl.program_id(0) * BR
    rows = r0 + tl.arange(0, BR)
    if r0 < nvis:
        h = tl.arange(0, BH)
        hm = h < HI
        d = tl.arange(0, HD)
        q = tl.load(q_ptr + h[:, None] * HD + d[None, :], mask=hm[:, None], other=0.0)
        qh, ql = _f16_head_tail(q)
        ok = rows < nvis
        k = tl.load(k_ptr + rows.to(tl.int64)[:, None] * HD + d[None, :], mask=ok[:, None],
                    other=0.0).to(tl.float16)                                   # [BR, HD]
        kt = tl.trans(k)
        s = tl.dot(qh, kt)
        s = tl.dot(ql, kt, s)                                                   # [BH, BR]
        w = tl.load(w_ptr + h, mask=hm, other=0.0) * wscale
        score = tl.sum(tl.maximum(s, 0.0) * w[:, None], axis=0)
        tl.store(out_ptr + rows, tl.where(ok, score, 0.0), mask=rows < cap)
    else:
        tl.store(out_ptr + rows, tl.zeros([BR], tl.float32), mask=rows < cap)


@triton.jit
def _sort_keys(v, ok):
    """float32 -> int64 keys in [0, 2**32) in the same order (-0.0 counts as +0.0, as torch.sort
    compares); -1 where not ok (below every key)."""
    b = tl.where(v == 0.0, 0, v.to(tl.int32, bitcast=True)).to(tl.int64) & 0xFFFFFFFF
    return tl.where(ok, tl.where(b >= 0x80000000, 0xFFFFFFFF - b, b + 0x80000000), -1)


@triton.jit
def _count3(key, thr, sh):
    """How many keys are >= thr | (j << sh) for j = 1, 2, 3 (thr int64): three counts below
    2**21 packed in one int64, so one block reduction gives the three."""
    bit = tl.full([], 1, tl.int64) << sh
    c = ((key >= (thr | bit)).to(tl.int64) + ((key >= (thr | (2 * bit))).to(tl.int64) << 21)
         + ((key >= (thr | (3 * bit))).to(tl.int64) << 42))
    return tl.sum(c, axis=0)


@triton.jit
def _next_thr(thr, packed, k, sh):
    """The largest of thr | (j << sh), j = 0..3, that at least k keys reach."""
    m = (1 << 21) - 1
    n1, n2, n3 = packed & m, (packed >> 21) & m, packed >> 42
    j = tl.where(n3 >= k, 3, tl.where(n2 >= k, 2, tl.where(n1 >= k, 1, 0))).to(tl.int64)
    return thr | (j << (tl.full([], 0, tl.int64) + sh))


@triton.jit
def _store_rows(rows_ptr, sel, i, listed, k):
    """The rows i of a block that sel takes, appended in index order to rows after the `listed`
    already there (at most k in all); returns the new count."""
    at = listed + tl.cumsum(sel.to(tl.int32), axis=0) - sel.to(tl.int32)
    tl.store(rows_ptr + at, i, mask=sel & (at < k))
    return listed + tl.sum(sel.to(tl.int32), axis=0)


@triton.jit
def _fill_rows(rows_ptr, listed, k, BLOCK: tl.constexpr):
    """-1 in rows[listed:k] (the entries past the selected rows' count)."""
    ii = tl.arange(0, BLOCK)
    for c0 in range(0, k, BLOCK):
        e = c0 + ii
        tl.store(rows_ptr + e, tl.full([BLOCK], -1, tl.int32), mask=(e >= listed) & (e < k))


@triton.jit
def _topk_in_registers(score_ptr, mask_ptr, rows_ptr, n, k, nvis, lim, BLOCK: tl.constexpr,
                       ROWS: tl.constexpr):
    """_topk_mask_kernel for at most BLOCK visible rows, held in registers across the passes."""
    ii = tl.arange(0, BLOCK)
    thr = tl.zeros([], tl.int64)
    key = _sort_keys(tl.load(score_ptr + ii, mask=ii < lim, other=0.0), ii < lim)
    for p in tl.static_range(16):
        sh = 30 - 2 * p
        thr = _next_thr(thr, _count3(key, thr, sh), k, sh)
    above = tl.sum((key > thr).to(tl.int32), axis=0)
    tie = key == thr
    rank = tl.cumsum(tie.to(tl.int32), axis=0) - tie.to(tl.int32)          # ties before i
    sel = (key > thr) | (tie & (rank < k - above))
    sel = tl.where(nvis <= k, ii < lim, sel)
    tl.store(mask_ptr + ii, sel.to(tl.int8), mask=ii < n)
    for c0 in range(BLOCK, n, BLOCK):                                     # rows past the block
        tl.store(mask_ptr + c0 + ii, tl.zeros([BLOCK], tl.int8), mask=c0 + ii < n)
    if ROWS:
        _fill_rows(rows_ptr, _store_rows(rows_ptr, sel, ii, 0, k), k, BLOCK)


@triton.jit
def _topk_in_blocks(score_ptr, mask_ptr, rows_ptr, n, k, nvis, lim, BLOCK: tl.constexpr,
                    ROWS: tl.constexpr):
    """_topk_mask_kernel for more visible rows than one block: each pass reloads them."""
    ii = tl.arange(0, BLOCK)
    thr = tl.zeros([], tl.int64)
    for p in tl.static_range(16):
        sh = 30 - 2 * p
        packed = tl.zeros([], tl.int64)
        for c0 in range(0, lim, BLOCK):
            i = c0 + ii
            key = _sort_keys(tl.load(score_ptr + i, mask=i < lim, other=0.0), i < lim)
            packed += _count3(key, thr, sh)
        thr = _next_thr(thr, packed, k, sh)
    above = tl.zeros([], tl.int32)
    for c0 in range(0, lim, BLOCK):
        i = c0 + ii
        key = _sort_keys(tl.load(score_ptr + i, mask=i < lim, other=0.0), i < lim)
        above += tl.sum((key > thr).to(tl.int32), axis=0)
    taken = tl.zeros([], tl.int32)
    listed = tl.zeros([], tl.int32)          # selected rows listed so far (ROWS)
    for c0 in range(0, n, BLOCK):
        i = c0 + ii
        key = _sort_keys(tl.load(score_ptr + i, mask=i < lim, other=0.0), i < lim)
        tie = key == thr
        rank = taken + tl.cumsum(tie.to(tl.int32), axis=0) - tie.to(tl.int32)
        sel = (key > thr) | (tie & (rank < k - above))
        sel = tl.where(nvis <= k, i < lim, sel)
        tl.store(mask_ptr + i, sel.to(tl.int8), mask=i < n)
        taken += tl.sum(tie.to(tl.int32), axis=0)
        if ROWS:
            listed = _store_rows(rows_ptr, sel, i, listed, k)
    if ROWS:
        _fill_rows(rows_ptr, listed, k, BLOCK)


@triton.jit
def _topk_mask_kernel(score_ptr, nvis_ptr, mask_ptr, rows_ptr, n, k, BLOCK: tl.constexpr,
                      ONE: tl.constexpr, PDL: tl.constexpr = False, ROWS: tl.constexpr = False):
    """One program: mask[i] = row i is among the k highest scores of the visible rows
    i < n_visible (ties to the lower row), or every visible row when n_visible <= k; 0 past the
    visible rows. The k-th largest key is found two bits at a time from the top (16 counting
    passes), then the rows above it are taken and the rows equal to it in index order until k.
    Up to BLOCK visible rows (the depth, read on the device) stay in registers across the
    passes; past that each pass reloads them block by block (not compiled where ONE: n <= BLOCK).
    ROWS: the selected rows also listed in rows [k] (int32, ascending, -1 past the count), the
    form the decode attention walks."""
    pdl_start(PDL)
    nvis = tl.load(nvis_ptr)
    lim = tl.minimum(nvis, n)
    if ONE:
        _topk_in_registers(score_ptr, mask_ptr, rows_ptr, n, k, nvis, lim, BLOCK, ROWS)
    else:
        if lim <= BLOCK:
            _topk_in_registers(score_ptr, mask_ptr, rows_ptr, n, k, nvis, lim, BLOCK, ROWS)
        else:
            _topk_in_blocks(score_ptr, mask_ptr, rows_ptr, n, k, nvis, lim, BLOCK, ROWS)


INDEX_BR = 64            # index-cache rows per score program
TOPK_BLOCK = 4096        # visible rows a selection holds in registers (depth up to 16384 tokens)


def index_scores(q, w, keys, n_visible, wscale: float) -> torch.Tensor:
    """One decode token's partial indexer scores over this rank's heads: q [1, HI, HD] (RoPE'd,
    Hadamard + FP4), w [1, HI] (the head weights, times wscale), keys [cap, HD] (the index cache),
    n_visible [1] int64 on the device -> [1, cap] float32, 0 at rows >= n_visible (not read).
    Twin: ds4tp.model.index_scores_torch (which scores every row)."""
    _, HI, HD = q.shape
    cap = keys.shape[0]
    if HD & (HD - 1) or HD < 16:
        raise ValueError(f"index_scores: head dim {HD} must be a power of two >= 16")
    _check("index_scores: queries", q, (1, HI, HD))
    _check("index_scores: head weights", w, (1, HI))
    _check("index_scores: keys", keys, (cap, HD))
    _check("index_scores: visible rows", n_visible, (1,), torch.long)
    out = torch.empty(1, cap, dtype=torch.float32, device=q.device)
    _index_score_kernel[(triton.cdiv(cap, INDEX_BR),)](
        q, w, keys, n_visible, out, HI, cap, float(wscale), BH=max(16, triton.next_power_of_2(HI)),
        BR=INDEX_BR, HD=HD, num_warps=4, **pdl.triton_args(q.device))
    return out


def topk_mask(score: torch.Tensor, n_visible: torch.Tensor, top_k: int,
              rows: torch.Tensor | None = None) -> torch.Tensor:
    """One decode token's indexer selection: score [1, n] float32, n_visible [1] int64 (device)
    -> mask [1, n] bool, the first output of model.select_rows (its twin), in one launch. rows
    (int32 [top_k]), if given, receives the selected rows too, in ascending order, -1 past
    their count (the list the decode attention walks: attention(rows=))."""
    n = score.shape[1]
    _check("topk_mask: scores", score, (1, n))
    _check("topk_mask: visible rows", n_visible, (1,), torch.long)
    if not 0 < top_k < n or n >= 1 << 21:
        raise ValueError(f"topk_mask: need 0 < top_k {top_k} < rows {n} < 2**21")
    if rows is not None:
        _check("topk_mask: row list", rows, (top_k,), torch.int32)
    mask = torch.empty(1, n, dtype=torch.int8, device=score.device)
    block = min(TOPK_BLOCK, triton.next_power_of_2(max(n, 16)))
    _topk_mask_kernel[(1,)](score, n_visible, mask, mask if rows is None else rows, n, top_k,
                            BLOCK=block, ONE=n <= block, ROWS=rows is not None,
                            num_warps=16 if block >= 2048 else 4, **pdl.triton_args(score.device))
    return mask.view(torch.bool)


_index_switch = Switch()
set_index_enabled = _index_switch.set   # benchmarks time the torch twins in the same run


def index_enabled() -> bool:
    return _index_switch.on


# ---- a prefill's attention: all T queries of a call in one launch ----------------------------
# The twin is ds4tp.model.attend_many's: rope_tail of the queries, model.attend per query chunk,
# rope_tail inverse of the heads (here: the rotations as the queries are read and before the
# heads are stored; the same arithmetic, possibly contracted into FMAs). The cache
# rows (raw and compressed) hold float16 values by construction (model.kv_cache_row, compress:
# FP8/F16 rounding, then F16), so they are read as float16 exactly. The queries and the softmax
# weights are float32: each goes into the tensor cores as a float16 head plus a float16 tail
# (x = hi + lo to ~2^-22 relative), so every product is the float32 one to that precision and
# sums run in float32 (against the twin: ~1e-6 relative, the order of the sums).
@triton.jit
def _rope_rows(x, cos_ptr, sin_ptr, t, d0, sign, W: tl.constexpr, D: tl.constexpr,
               NROT: tl.constexpr):
    """Columns d0 .. d0+W-1 of rows x [R, W] rotated as numerics.rope_tail does: adjacent pairs
    among the last NROT of D dims by token t's (cos, sign * sin), the others unchanged."""
    R: tl.constexpr = x.shape[0]
    x0, x1 = tl.split(tl.reshape(x, (R, W // 2, 2)))
    i = d0 // 2 + tl.arange(0, W // 2) - (D - NROT) // 2          # the pair's index in the tail
    tail = i >= 0
    c = tl.load(cos_ptr + t * (NROT // 2) + i, mask=tail, other=1.0)[None, :]
    s = sign * tl.load(sin_ptr + t * (NROT // 2) + i, mask=tail, other=0.0)[None, :]
    return tl.reshape(tl.join(x0 * c - x1 * s, x0 * s + x1 * c), (R, W))


@triton.jit
def _prefill_tile(acc, m, l, q_ptr, qrow, hmask, k_ptr, keys, ok, scale, cos_ptr, sin_ptr, t,
                  D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr,
                  NROT: tl.constexpr):
    """Keys k_ptr[keys] [BN, D] (float16, K = V) into the running max m [BH], denominator l
    [BH] and value sums acc [BH, D] of heads qrow (rotated for token t when NROT > 0); keys not
    ok score -inf."""
    dd = tl.arange(0, BD)
    krow = keys.to(tl.int64) * D
    s = tl.zeros([BH, BN], tl.float32)
    for d0 in tl.static_range(0, D, BD):
        qc = tl.load(q_ptr + qrow[:, None] + d0 + dd[None, :], mask=hmask[:, None], other=0.0)
        if NROT > 0 and d0 + BD > D - NROT:
            qc = _rope_rows(qc, cos_ptr, sin_ptr, t, d0, 1.0, BD, D, NROT)
        qh, ql = _f16_head_tail(qc)
        kt = tl.load(k_ptr + krow[None, :] + d0 + dd[:, None], mask=ok[None, :], other=0.0)   # [BD, BN]
        s = tl.dot(qh, kt, s)
        s = tl.dot(ql, kt, s)
    s = tl.where(ok[None, :], s * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    ph, pl = _f16_head_tail(p)
    v = tl.load(k_ptr + krow[:, None] + tl.arange(0, D)[None, :], mask=ok[:, None], other=0.0)  # [BN, D]
    acc = acc * alpha[:, None]
    acc = tl.dot(ph, v, acc)
    acc = tl.dot(pl, v, acc)
    return acc, m_new, l


@triton.jit(do_not_specialize=["C", "raw_prev", "p0", "cmask_stride"])   # see _comp_rows_kernel
def _prefill_attn_kernel(q_ptr, raw_ptr, comp_ptr, cmask_ptr, sink_ptr, o_ptr, cos_ptr, sin_ptr,
                         H, C, raw_prev, n_swa, p0, ratio, cmask_stride, scale,
                         D: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                         HAS_COMP: tl.constexpr, NROT: tl.constexpr):
    """Grid (T, cdiv(H, BH)): program (t, j) attends token t's heads j*BH.. over the raw rows
    its window reaches (rows raw_prev + t - n_swa + 1 .. raw_prev + t of the cache: this call's
    row t sits at raw_prev + t) and the compressed rows it sees (the first (p0+t+1)//ratio, those
    its mask row allows), the sink joining max and denominator. NROT > 0: the queries rotated by
    RoPE as they are read and the heads rotated back before they are stored."""
    t = tl.program_id(0)
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    hmask = heads < H
    qrow = (t * H + heads).to(tl.int64) * D
    m = tl.load(sink_ptr + heads, mask=hmask, other=0.0)     # the sink: exp(sink - m) = 1
    l = tl.full([BH], 1.0, tl.float32)
    acc = tl.zeros([BH, D], tl.float32)
    hi = raw_prev + t + 1
    for k0 in range(tl.maximum(hi - n_swa, 0), hi, BN):
        keys = k0 + tl.arange(0, BN)
        acc, m, l = _prefill_tile(acc, m, l, q_ptr, qrow, hmask, raw_ptr, keys, keys < hi, scale,
                                  cos_ptr, sin_ptr, t, D, BD, BN, BH, NROT)
    if HAS_COMP:
        nc = tl.minimum((p0 + t + 1) // ratio, C)
        for k0 in range(0, nc, BN):
            keys = k0 + tl.arange(0, BN)
            ok = keys < nc
            ok = ok & (tl.load(cmask_ptr + t.to(tl.int64) * cmask_stride + keys, mask=ok, other=0) != 0)
            acc, m, l = _prefill_tile(acc, m, l, q_ptr, qrow, hmask, comp_ptr, keys, ok, scale,
                                      cos_ptr, sin_ptr, t, D, BD, BN, BH, NROT)
    o = acc / l[:, None]
    if NROT > 0:
        o = _rope_rows(o, cos_ptr, sin_ptr, t, 0, -1.0, D, D, NROT)   # the inverse rotation
    tl.store(o_ptr + qrow[:, None] + tl.arange(0, D)[None, :], o, mask=hmask[:, None])


_prefill_switch = Switch()
set_prefill_enabled = _prefill_switch.set   # benchmarks time the query-chunk twin in the same run


def prefill_enabled() -> bool:
    return _prefill_switch.on


# Launch shape: on an H200, 2048 tokens from an empty cache at DS4's width, RoPE included, this
# one against the twin: 0.54 / 4.21 ms (ratio 0), 1.86 / 6.72 (ratio 4, 512 compressed rows),
# 0.79 / 4.90 (ratio 128); 8 warps, 16 heads per program, 128-wide score steps all slower; 64
# heads or 64 keys per tile do not fit in shared memory (bench/results/prefill_attn_h200_s10_*).
PREFILL_BH = 32   # heads per program
PREFILL_BN = 32   # keys per tile
PREFILL_BD = 64   # head dims per score step
PREFILL_WARPS = 4


def prefill_attention(q, raw, raw_prev: int, comp, comp_mask, p0: int, ratio: int, sinks, n_swa: int,
                      rope=None, bh: int = PREFILL_BH, bn: int = PREFILL_BN, bd: int = PREFILL_BD,
                      warps: int = PREFILL_WARPS):
    """q [T, H, D] at positions p0..p0+T-1; raw [raw_prev + T, D] the raw cache rows at positions
    p0 - raw_prev .. p0 + T - 1; comp [C, D] with comp_mask [T, C] (bool) or both None; sinks
    [H] -> o [T, H, D] (model.attend over every query, one launch). rope = (cos, sin) [T, n_rot/2]:
    q is rotated by them first and o rotated back (numerics.rope_tail, inverse). Cache rows must
    hold float16 values (they do: model.kv_cache_row, model.compress)."""
    T, H, D = q.shape
    if D & (D - 1) or D < 16 or D % bd:
        raise ValueError(f"prefill_attention: head_dim {D} must be a power of two >= 16")
    _check("prefill_attention: q", q, (T, H, D))
    _check("prefill_attention: raw rows", raw, (raw_prev + T, D))
    _check("prefill_attention: sinks", sinks, (H,))
    if (comp is None) != (comp_mask is None):
        raise ValueError("prefill_attention: compressed rows and their mask come together")
    C = 0
    if comp is not None:
        C = comp.shape[0]
        _check("prefill_attention: compressed rows", comp, (C, D))
        if comp_mask.shape != (T, C) or comp_mask.dtype != torch.bool or comp_mask.stride(1) != 1:
            raise ValueError(f"prefill_attention: comp_mask must be bool [T, C] = {(T, C)} with "
                             f"unit column stride, got {comp_mask.dtype} {tuple(comp_mask.shape)}")
        if ratio < 1:
            raise ValueError(f"prefill_attention: compression ratio {ratio} with compressed rows")
    n_rot = 0
    if rope is not None:
        cos, sin = rope
        n_rot = 2 * cos.shape[-1]
        if n_rot > D:
            raise ValueError(f"prefill_attention: n_rot {n_rot} exceeds head_dim {D}")
        _check("prefill_attention: RoPE cos", cos, (T, n_rot // 2))
        _check("prefill_attention: RoPE sin", sin, (T, n_rot // 2))
    o = torch.empty_like(q)
    if T == 0:
        return o
    raw16 = raw.to(torch.float16)
    has_comp = comp is not None and C > 0
    comp16 = comp.to(torch.float16) if has_comp else raw16
    cmask = comp_mask.view(torch.uint8) if has_comp else raw16
    _prefill_attn_kernel[(T, triton.cdiv(H, bh))](
        q, raw16, comp16, cmask, sinks, o, cos if n_rot else q, sin if n_rot else q, H, C,
        raw_prev, n_swa, p0, max(ratio, 1), comp_mask.stride(0) if has_comp else 0,
        1.0 / D ** 0.5, D=D, BH=bh, BN=bn, BD=bd, HAS_COMP=has_comp, NROT=n_rot, num_warps=warps)
    return o
