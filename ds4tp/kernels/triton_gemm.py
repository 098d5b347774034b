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
  * routed experts: the (token, slot) pairs are sorted by expert (one stable sort, one host sync
    for the group sizes) and cut into token tiles of one expert each; a tile's columns are pairs,
    so no activation or weight is gathered or copied, and each expert's rows are decoded once per
    tile of its tokens. Outputs land at their (token, slot) row directly.

F16 weights (mixer, router, compressors, indexer) take float32 activations as they are: dots in
3xTF32 (the activation split into a TF32 head and tail; the weight is exact in TF32), about
float32 accuracy at tensor-core speed.

Float16 path (h16): the quantised weight is first decoded to float16 by `dequant_h16` (each
value the exact float32 dequantisation rounded once to float16; routed experts H16_EXPERT_GROUP
at a time, so the scratch stays bounded), then multiplied with the activation rounded to float16
in plain float16 tensor-core dots with float32 accumulation: no per-block float32 rescaling.
Default for dense weights from H16_MIN_T tokens; routed experts only when forced (h16=True) or
from H16_MIN_PAIRS pairs if that is set. Not the twin's arithmetic: weights and activations are
rounded to 11 significant bits where the twin, like the reference engine, rounds the activation
to 8-bit Q8_0 / Q8_K integers; the float16 path is the closer of the two to the exact product
(tests compare it with the float64 product, tests/kernel_cases.exact_linear).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ds4tp.config import F16, IQ2_XXS, Q2_K, Q8_0
from ds4tp.kernels.triton_matvec import (_EPB, _check_swiglu, _expert_args, _iq2_tables,
                                         _iq2_xxs_wblock, _linear_args, _mv_tile, _pow2_at_least,
                                         _pow2_divisor, _prequant, _q2_k_wblock, _q8_0_wtile_f32,
                                         _raw, q8_0_split)

MODE_SLOTS, MODE_SWIGLU = 0, 2
H16_TYPES = (Q8_0, Q2_K, IQ2_XXS)
# Defaults (None: never by default). Measured once on an H200 with both on (2048-token prefill,
# TP=1: 1541 tok/s against 1436 earlier that day, inside the run-to-run spread;
# bench/results/bench_h200_tp1_s5_h16_20261129.json). Routed experts are off: at 2048 tokens each
# expert sees ~48 pairs, i.e. one token tile, so the exact path also decodes each expert once and
# the float16 path only adds the write and re-read of the decoded weights (2 bytes per value).
H16_MIN_T = 64           # dense: tokens from which the float16 path is the default
H16_MIN_PAIRS = None     # routed experts: (token, slot) pairs from which it is the default
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
        e = tl.load(tiles_ptr + 3 * pid_m)
        first = tl.load(tiles_ptr + 3 * pid_m + 1)
        live = j < tl.load(tiles_ptr + 3 * pid_m + 2)
        p = tl.load(pairs_ptr + first + j, mask=live, other=0)
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
    if MODE == 2:   # clamped SwiGLU times the router weight (numerics.swiglu_clamped)
        g = tl.minimum(acc, clamp)
        u = tl.minimum(tl.maximum(acc2, -clamp), clamp)
        rw = tl.load(rw_ptr + p, mask=live, other=0.0)
        acc = g * tl.sigmoid(g) * u * rw[None, :]
    ooff = p[None, :].to(tl.int64) * stride_op + rows[:, None]
    tl.store(out_ptr + ooff, acc, mask=rmask[:, None] & live[None, :])


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
    if h16_path(w, T, h16):
        c = cfg or H16_CFG
        _h16_launch(dequant_h16(w), None, x, y, None, None, None, n_out, n_in, T, 1, x.stride(0), 0,
                    y.stride(0), rows_per_group, n_in, MODE_SLOTS, 0.0, c)
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
    raw = _raw(w)
    raw2 = _raw(w2) if w2 is not None else raw
    if raw2.stride() != raw.stride():
        raise ValueError("gate and up raw bytes must have the same strides")
    out = torch.empty(T, K, n_out, dtype=torch.float32, device=x.device)
    if T * K == 0:
        return out
    pairs, table, skipped, tq, tile_expert = expert_tiles(ids, w.shape[0], cfg.tq if cfg else None)
    if skipped:
        out.masked_fill_((ids < 0)[:, :, None], 0.0)
    if table.shape[0] == 0:
        return out
    if h16_path(w, T * K, h16, w2):
        c = cfg or replace(H16_CFG, tq=tq)
        rwc = rw.contiguous() if rw is not None else None
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
    _gemm_kernel[(table.shape[0], triton.cdiv(n_out, c.bn))](
        raw, raw2, raw.stride(0), raw.stride(1), x, xq, xd, xbs, sxt, sxk, table, pairs,
        rw.contiguous() if rw is not None else out, out, n_out, grid_t, sign_t,
        n_out, T * K, K, n_in // _EPB[w.qtype], n_out, 0, float(clamp),
        QT=w.qtype, BN=c.bn, TQ=tq, NB=_pow2_divisor(n_in // _EPB[w.qtype], c.nb), TABLE=True,
        MODE=mode, QS=False, num_warps=c.warps, num_stages=c.stages)
    return out
