"""Hyper-connection mixing in one Triton launch (decode hot path).

`hc_combine` of ds4tp.model turns the 24 mixer logits of a token into pre [4], post [4] and the
4x4 mixing matrix M (sigmoids, a row softmax, then Sinkhorn: 20 alternating column / row
normalisations, spec 8.1) and forms the sublayer input x = sum_h pre[h] * H[h], RMS-normed with
the sublayer's norm weight (two programs per token: the serial Sinkhorn chain and the norm over
the four streams run side by side; the streams are read once for E <= 4096). In torch that
is a chain of ~40 dependent reductions over a 4x4 matrix; compiled by Inductor it still ran as
~40 tiny kernels per call, twice per layer (bench/results/profile: ~80 launches, ~0.1 ms of GPU
time per layer). Here one program per token keeps M in registers for all iterations.

Same math as the twin (ds4tp.model.hc_combine_torch): the same operations in the same order;
divisions are correctly rounded (div_rn) as torch's are; exp and the sigmoid may differ from
torch's by an ulp, and the sum over the 4 streams is taken in a different order.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ds4tp.kernels import pdl
from ds4tp.kernels.cuda_c import Switch
from ds4tp.kernels.triton_pdl import pdl_start
from ds4tp.kernels.triton_matvec import _split_buffers, _split_k
from ds4tp.kernels.triton_norm import rms_from_squares


@triton.jit
def _sigmoid_rn(v):
    return tl.math.div_rn(tl.full(v.shape, 1.0, tl.float32), 1.0 + tl.exp(-v))


@triton.jit
def _hc_mix(zrow, scale_ptr, base_ptr, post_ptr, m_ptr, t, eps, NH: tl.constexpr, ITERS: tl.constexpr):
    """post [NH] and the mixing matrix M [NH, NH] of token t from its logits at zrow: sigmoids,
    a row softmax, then Sinkhorn (the serial chain of the mixer)."""
    h = tl.arange(0, NH)
    r = h[:, None]
    c = h[None, :]
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    post = 2.0 * _sigmoid_rn(tl.load(zrow + NH + h) * s1 + tl.load(base_ptr + NH + h))
    m = tl.load(zrow + 2 * NH + r * NH + c) * s2 + tl.load(base_ptr + 2 * NH + r * NH + c)   # M[r][c]
    e = tl.exp(m - tl.max(m, axis=1)[:, None])
    m = tl.math.div_rn(e, tl.broadcast_to(tl.sum(e, axis=1)[:, None], (NH, NH))) + eps       # row softmax
    m = tl.math.div_rn(m, tl.broadcast_to(tl.sum(m, axis=0)[None, :] + eps, (NH, NH)))       # columns
    for _ in range(ITERS - 1):
        m = tl.math.div_rn(m, tl.broadcast_to(tl.sum(m, axis=1)[:, None] + eps, (NH, NH)))   # rows
        m = tl.math.div_rn(m, tl.broadcast_to(tl.sum(m, axis=0)[None, :] + eps, (NH, NH)))   # columns
    tl.store(post_ptr + t * NH + h, post)
    tl.store(m_ptr + t * NH * NH + r * NH + c, m)


@triton.jit
def _streams(ptrs, ok, CG: tl.constexpr):
    """Stream values at ptrs where ok (0 elsewhere); CG: past L1 (other programs of this launch
    wrote them)."""
    if CG:
        return tl.load(ptrs, mask=ok, other=0.0, cache_modifier=".cg")
    return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _hc_pre(zrow, scale_ptr, base_ptr, eps, NH: tl.constexpr):
    h = tl.arange(0, NH)
    return _sigmoid_rn(tl.load(zrow + h) * tl.load(scale_ptr) + tl.load(base_ptr + h)) + eps


@triton.jit
def _hc_pre_held(z, rows, scale_ptr, base_ptr, eps, NH: tl.constexpr):
    """_hc_pre of the logits z [BN] held in registers (rows: their indices): the first NH picked
    out exactly (one value plus zeros), so the same bits as reading them back."""
    h = tl.arange(0, NH)
    zh = tl.sum(tl.where(rows[:, None] == h[None, :], z[:, None], 0.0), axis=0)
    return _sigmoid_rn(zh * tl.load(scale_ptr) + tl.load(base_ptr + h)) + eps


@triton.jit
def _hc_x_store(hv, pre, nw, x_row, ee, ok, E, rms_eps):
    """x = sum_h pre[h] H[h] of all E columns held in hv [NH, BE], RMS-normed (squares summed in
    float64, as numerics.rms_scale) and times the norm weight nw [BE], stored at x_row."""
    x = tl.sum(pre[:, None] * hv, axis=0)
    xd = x.to(tl.float64)
    sc = rms_from_squares(xd * xd, E, rms_eps)
    tl.store(x_row + ee, (x * sc) * nw, mask=ok)


@triton.jit
def _hc_input(zrow, scale_ptr, base_ptr, hc_ptr, norm_ptr, x_ptr, t, E, eps, rms_eps,
              NH: tl.constexpr, BE: tl.constexpr, ONE_PASS: tl.constexpr, CG: tl.constexpr):
    """The sublayer input of token t: x = sum_h pre[h] H[h], RMS-normed and times the norm
    weight. ONE_PASS (E <= BE): x stays in registers; else pass 1 sums x^2 and pass 2 recomputes
    x (same operations, same values) and stores x*s*w. CG: read the streams past L1."""
    r = tl.arange(0, NH)[:, None]
    pre = _hc_pre(zrow, scale_ptr, base_ptr, eps, NH)
    ee = tl.arange(0, BE)
    rows = hc_ptr + t * NH * E + r * E
    if ONE_PASS:
        ok = ee < E
        _hc_x_store(_streams(rows + ee[None, :], ok[None, :], CG), pre,
                    tl.load(norm_ptr + ee, mask=ok, other=0.0), x_ptr + t * E, ee, ok, E, rms_eps)
    else:
        ss = tl.zeros([BE], tl.float64)
        for e0 in range(0, E, BE):
            ok = (e0 + ee) < E
            x = tl.sum(pre[:, None] * _streams(rows + e0 + ee[None, :], ok[None, :], CG), axis=0)
            xd = x.to(tl.float64)
            ss += xd * xd
        sc = rms_from_squares(ss, E, rms_eps)
        for e0 in range(0, E, BE):
            ok = (e0 + ee) < E
            x = tl.sum(pre[:, None] * _streams(rows + e0 + ee[None, :], ok[None, :], CG), axis=0)
            w = tl.load(norm_ptr + e0 + ee, mask=ok, other=0.0)
            tl.store(x_ptr + t * E + e0 + ee, (x * sc) * w, mask=ok)


@triton.jit
def _hc_combine_kernel(z_ptr, stride_z, scale_ptr, base_ptr, hc_ptr, norm_ptr, x_ptr, post_ptr, m_ptr,
                       E, eps, rms_eps,
                       NH: tl.constexpr, ITERS: tl.constexpr, BE: tl.constexpr, ONE_PASS: tl.constexpr,
                       PDL: tl.constexpr = False):
    """Grid (T, 2): program (t, 0) mixes (post, M: the serial Sinkhorn chain), program (t, 1)
    forms and norms x; the two run side by side."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    zrow = z_ptr + t * stride_z
    if tl.program_id(1) == 0:
        _hc_mix(zrow, scale_ptr, base_ptr, post_ptr, m_ptr, t, eps, NH, ITERS)
    else:
        _hc_input(zrow, scale_ptr, base_ptr, hc_ptr, norm_ptr, x_ptr, t, E, eps, rms_eps, NH, BE,
                  ONE_PASS, False)


HC_ONE_PASS_MAX = 4096     # widths up to this keep x in registers (one read of the streams)


def hc_combine(z: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: torch.Tensor,
               norm: torch.Tensor, n_hc: int, iters: int, eps: float, rms_eps: float):
    """z [T, 2n+n^2], scale [3], base [2n+n^2], hc [T, n, E], norm [E] (float32) -> the
    RMS-normed sublayer input xn [T, E], post [T, n], M [T, n, n]. n must be a power of two."""
    T, n, E = hc.shape
    if n != n_hc or n & (n - 1) or z.shape != (T, 2 * n + n * n):
        raise ValueError(f"hc_combine: z {tuple(z.shape)} and hc {tuple(hc.shape)} do not match n_hc={n_hc}")
    if norm.shape != (E,):
        raise ValueError(f"hc_combine: norm weight {tuple(norm.shape)} does not match width {E}")
    for name, v in (("z", z), ("scale", scale), ("base", base), ("hc", hc), ("norm", norm)):
        if v.dtype != torch.float32 or not v.is_cuda and not _interpreting():
            raise ValueError(f"hc_combine: {name} must be float32 on the GPU")
    z = z if z.stride(-1) == 1 else z.contiguous()
    hc = hc.contiguous()
    x = torch.empty(T, E, dtype=torch.float32, device=hc.device)
    post = torch.empty(T, n, dtype=torch.float32, device=hc.device)
    m = torch.empty(T, n, n, dtype=torch.float32, device=hc.device)
    if T:
        be = min(HC_ONE_PASS_MAX, triton.next_power_of_2(E))
        _hc_combine_kernel[(T, 2)](z, z.stride(0), scale.contiguous(), base.contiguous(), hc,
                                   norm.contiguous(), x, post, m, E, eps, rms_eps, NH=n, ITERS=iters,
                                   BE=be, ONE_PASS=E <= be, num_warps=8,
                                   **pdl.triton_args(hc.device))
    return x, post, m


@triton.jit
def _hc_post_kernel(f_ptr, h_ptr, post_ptr, m_ptr, out_ptr, E, NH: tl.constexpr, BE: tl.constexpr,
                    PDL: tl.constexpr = False):
    """out[t, i, :] = post[t, i] * f[t, :] + sum_r M[t, r, i] * H[t, r, :] for one (t, E tile)."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BE + tl.arange(0, BE)
    ok = e < E
    i = tl.arange(0, NH)
    fv = tl.load(f_ptr + t * E + e, mask=ok, other=0.0)
    acc = tl.load(post_ptr + t * NH + i)[:, None] * fv[None, :]
    for r in tl.static_range(NH):
        h = tl.load(h_ptr + (t * NH + r) * E + e, mask=ok, other=0.0)
        acc += tl.load(m_ptr + (t * NH + r) * NH + i)[:, None] * h[None, :]
    tl.store(out_ptr + t * NH * E + i[:, None] * E + e[None, :], acc, mask=ok[None, :])


def hc_post(f: torch.Tensor, hc: torch.Tensor, post: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """f [T, E], hc [T, n, E], post [T, n], M [T, n, n] (float32) -> the new streams [T, n, E];
    the twin is ds4tp.model.hc_post_torch. n must be a power of two."""
    T, n, E = hc.shape
    if n & (n - 1) or f.shape != (T, E) or post.shape != (T, n) or m.shape != (T, n, n):
        raise ValueError(f"hc_post: f {tuple(f.shape)}, hc {tuple(hc.shape)}, post {tuple(post.shape)}, "
                         f"M {tuple(m.shape)} do not match")
    for name, v in (("f", f), ("hc", hc), ("post", post), ("M", m)):
        if v.dtype != torch.float32:
            raise ValueError(f"hc_post: {name} must be float32")
    out = torch.empty(T, n, E, dtype=torch.float32, device=hc.device)
    if T and E:
        be = min(1024, triton.next_power_of_2(E))
        _hc_post_kernel[(T, triton.cdiv(E, be))](f.contiguous(), hc.contiguous(), post.contiguous(),
                                                 m.contiguous(), out, E, NH=n, BE=be, num_warps=4,
                                                 **pdl.triton_args(hc.device))
    return out


@triton.jit
def _hc_logits_kernel(x_ptr, w_ptr, z_ptr, ws_ptr, ss_ptr, cnt_ptr, N, K, k_per, eps,
                      BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, SP2: tl.constexpr,
                      PDL: tl.constexpr = False):
    """Program k: over its K chunk, rows 0..N-1 of the F16 weight [N, K] against the raw x, and
    the float64 squares of x. The RMS scale s is a common factor, z = s * (x @ W^T): the last of
    the SPLIT programs to arrive (atomic ticket) adds the partial dots and the partial square
    sums in the fixed order 0..SPLIT-1, then scales. No program reads the whole row."""
    pdl_start(PDL)
    pid_k = tl.program_id(0)
    kk = tl.arange(0, BK)
    rows = tl.arange(0, BN)
    rmask = rows < N
    acc = tl.zeros([BN, BK], tl.float32)
    sq = tl.zeros([BK], tl.float64)
    k0 = pid_k * k_per
    for k in range(k0, tl.minimum(k0 + k_per, K), BK):
        km = (k + kk) < K
        xv = tl.load(x_ptr + k + kk, mask=km, other=0.0)
        xd = xv.to(tl.float64)
        sq += xd * xd
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * K + k + kk[None, :],
                    mask=rmask[:, None] & km[None, :], other=0.0).to(tl.float32)
        acc += w * xv[None, :]
    y = tl.sum(acc, axis=1)
    if SPLIT == 1:
        tl.store(z_ptr + rows, y * rms_from_squares(sq, K, eps), mask=rmask)
    else:
        tl.store(ws_ptr + pid_k * BN + rows, y)
        tl.store(ss_ptr + pid_k, tl.sum(sq, axis=0))
        tl.debug_barrier()                                   # partial stores before the ticket
        ticket = tl.atomic_add(cnt_ptr, 1)                   # acq_rel, gpu scope
        if ticket == SPLIT - 1:
            tot = tl.zeros([BN], tl.float32)
            for j in range(SPLIT):
                tot += tl.load(ws_ptr + j * BN + rows, cache_modifier=".cg")
            jj = tl.arange(0, SP2)
            ssv = tl.load(ss_ptr + jj, mask=jj < SPLIT, other=0.0, cache_modifier=".cg")
            tl.store(z_ptr + rows, tot * rms_from_squares(ssv, K, eps), mask=rmask)
            tl.atomic_xchg(cnt_ptr, 0)


HC_LOGITS_SPLIT = 32   # K chunks (programs)


def hc_logits(hc: torch.Tensor, fn_raw: torch.Tensor, eps: float, split: int = HC_LOGITS_SPLIT):
    """One token's mixer logits z [1, N] = (flat * rms_scale(flat)) @ fn^T, flat = hc [1, n, E]
    flattened, fn the F16 weight's raw bytes [N, 2*n*E]; computed as rms_scale(flat) * (flat @
    fn^T) (the float32 rounding of the product moves; ~1e-7 relative). The twin is
    ds4tp.model.hc_logits_torch."""
    if hc.dim() != 3 or hc.shape[0] != 1 or hc.dtype != torch.float32:
        raise ValueError(f"hc_logits: expects one token's float32 streams [1, n, E], got "
                         f"{hc.dtype} {tuple(hc.shape)}")
    K = hc.shape[1] * hc.shape[2]
    if fn_raw.dtype != torch.uint8 or fn_raw.dim() != 2 or fn_raw.shape[1] != 2 * K or not fn_raw.is_contiguous():
        raise ValueError(f"hc_logits: F16 weight bytes {tuple(fn_raw.shape)} do not match {K} inputs")
    N = fn_raw.shape[0]
    bn = triton.next_power_of_2(N)
    bk = min(512, triton.next_power_of_2(K))
    x = hc.reshape(1, K).contiguous()
    z = torch.empty(1, N, dtype=torch.float32, device=hc.device)
    per, split = _split_k(K, bk, split)
    ws, cnt = _split_buffers(split, 1, bn, 1, hc.device, z)
    ss = torch.empty(split, dtype=torch.float64, device=hc.device) if split > 1 else z
    _hc_logits_kernel[(split,)](x, fn_raw.view(torch.float16), z, ws, ss, cnt, N, K, per, eps,
                                BN=bn, BK=bk, SPLIT=split, SP2=triton.next_power_of_2(split),
                                num_warps=4, **pdl.triton_args(hc.device))
    return z


@triton.jit
def _global_ns(x):
    """The GPU's global timer in ns (x: any int64 scalar, only to give the result its shape)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,l", [x], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _trap(x):
    tl.inline_asm_elementwise("trap;", "=l,l", [x], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _peer_wait(flag_ptr, nr, timeout_ns):
    """Wait until the flag word reads the all-reduce number nr (acquire at system scope: the
    peer's stores before its release are then visible); trap after timeout_ns (a lost peer
    becomes an error, never a hang). The timer is read only if the first look fails."""
    seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    if seen != nr:
        t0 = _global_ns(nr)
        while seen != nr:
            if _global_ns(nr) - t0 > timeout_ns:
                _trap(nr)
            seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")


@triton.jit
def _mixer_rows(w_ptr, rows, i, e, ok, N, E, NH: tl.constexpr):
    """The F16 mixer weight [N, NH*E] at rows x streams i x columns e, as float32 [BN, NH, BE]."""
    return tl.load(w_ptr + rows.to(tl.int64)[:, None, None] * (NH * E) + i[None, :, None] * E + e[None, None, :],
                   mask=(rows < N)[:, None, None] & ok[None, None, :], other=0.0).to(tl.float32)


@triton.jit
def _hc_step_kernel(f_ptr, h_ptr, post_ptr, m_ptr, out_ptr, w_ptr, z_ptr, ws_ptr, ss_ptr, cnt_ptr,
                    scale_ptr, base_ptr, norm_ptr, x_ptr, post2_ptr, m2_ptr, E, N, eps, rms_eps,
                    ps_ptr, ms_ptr, pf_ptr, mf_ptr, ctr_ptr, cap, timeout_ns, row_ptr,
                    NH: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
                    SP2: tl.constexpr, ITERS: tl.constexpr, XB: tl.constexpr, ONE_PASS: tl.constexpr,
                    MIX: tl.constexpr = True, PEER: tl.constexpr = False, NFLAG: tl.constexpr = 64,
                    PDL: tl.constexpr = False, ROW: tl.constexpr = False):
    """One decode token: the stream update of the sublayer just run (hc_post), then the next
    sublayer's mixer on the new streams (hc_logits and hc_combine). Program p owns columns
    [p*BE, p*BE + BE) of every stream: it forms the new streams there (the operations of
    _hc_post_kernel; the compiler may contract them into FMAs differently, so the bits can
    differ in the last place), stores them, and leaves in the workspace the partial
    logits of its columns (rows of the F16 mixer weight [N, NH*E] against the raw new streams)
    and its float64 sum of squares. The last program to arrive (atomic ticket) adds the partials
    in the order 0..SPLIT-1, scales them (z = s * (x @ W^T), as _hc_logits_kernel), stores z and
    runs the mixer: post', M' (Sinkhorn) and the normed input x, reading the new streams back
    past L1. Without MIX it leaves post' and M' to _hc_mix_kernel (z is stored either way).
    PEER: f is this rank's part of the sublayer's output, and the two ranks' sum is formed here
    (cuda_allreduce.fused: the protocol of allreduce.cu, program by program). Program p pushes
    its columns of f into the peer's slot, releases its flag word there, loads what it can
    (streams, mixer rows) and waits for its own flag word; then f = own + peer's (the bits of
    NCCL's sum of two). The last program stores the all-reduce number into ctr.
    ROW: f is a float16 table [V, E] and f the row of it at the index row_ptr holds (an earlier
    kernel's output), converted exactly: the embedding before layer 0, without a gather launch."""
    pdl_start(PDL)
    p = tl.program_id(0)
    i = tl.arange(0, NH)
    e = p * BE + tl.arange(0, BE)
    ok = e < E
    rows = tl.arange(0, BN)
    if PEER:
        nr = tl.load(ctr_ptr, cache_modifier=".cg") + 1        # this rank's all-reduce number
        fv = tl.load(f_ptr + e, mask=ok, other=0.0)
        slot = (nr & 1) * cap
        tl.store(ps_ptr + slot + e, fv, mask=ok)                # into the peer's slot
        tl.debug_barrier()                                      # the program's stores, then
        tl.atomic_xchg(pf_ptr + (nr & 1) * NFLAG + p, nr, sem="release", scope="sys")  # its flag
        tl.static_assert(NH == 4)
        h0 = tl.load(h_ptr + 0 * E + e, mask=ok, other=0.0)     # loads that need no peer,
        h1 = tl.load(h_ptr + 1 * E + e, mask=ok, other=0.0)     # issued before the wait
        h2 = tl.load(h_ptr + 2 * E + e, mask=ok, other=0.0)
        h3 = tl.load(h_ptr + 3 * E + e, mask=ok, other=0.0)
        w = _mixer_rows(w_ptr, rows, i, e, ok, N, E, NH)
        _peer_wait(mf_ptr + (nr & 1) * NFLAG + p, nr, timeout_ns)
        fv = fv + tl.load(ms_ptr + slot + e, mask=ok, other=0.0, cache_modifier=".cg")
        acc = tl.load(post_ptr + i)[:, None] * fv[None, :]      # as below, the same order
        acc += tl.load(m_ptr + 0 * NH + i)[:, None] * h0[None, :]
        acc += tl.load(m_ptr + 1 * NH + i)[:, None] * h1[None, :]
        acc += tl.load(m_ptr + 2 * NH + i)[:, None] * h2[None, :]
        acc += tl.load(m_ptr + 3 * NH + i)[:, None] * h3[None, :]
    else:
        if ROW:
            fv = tl.load(f_ptr + tl.load(row_ptr) * E + e, mask=ok, other=0.0).to(tl.float32)
        else:
            fv = tl.load(f_ptr + e, mask=ok, other=0.0)
        acc = tl.load(post_ptr + i)[:, None] * fv[None, :]
        for r in tl.static_range(NH):
            h = tl.load(h_ptr + r * E + e, mask=ok, other=0.0)
            acc += tl.load(m_ptr + r * NH + i)[:, None] * h[None, :]
        w = _mixer_rows(w_ptr, rows, i, e, ok, N, E, NH)
    tl.store(out_ptr + i[:, None] * E + e[None, :], acc, mask=ok[None, :])
    ad = acc.to(tl.float64)
    sq = tl.sum(ad * ad, axis=0)                                       # [BE] float64
    y = tl.sum(tl.sum(w * acc[None, :, :], axis=2), axis=1)           # [BN] partial logits
    last = True
    if SPLIT > 1:
        tl.store(ws_ptr + p * BN + rows, y)
        tl.store(ss_ptr + p, tl.sum(sq, axis=0))
        tl.debug_barrier()                                   # partial stores before the ticket
        last = tl.atomic_add(cnt_ptr, 1) == SPLIT - 1        # acq_rel, gpu scope
    if last:
        if ONE_PASS:   # the tail's loads go out together: the new streams and the norm weight
            ee = tl.arange(0, XB)   # with the partials (one round trip, not three in a row)
            xok = ee < E
            hv = _streams(out_ptr + i[:, None] * E + ee[None, :], xok[None, :], True)
            nw = tl.load(norm_ptr + ee, mask=xok, other=0.0)
        if SPLIT > 1:      # (new names: a value changed inside this branch keeps its type)
            tot = tl.zeros([BN], tl.float32)
            for j in range(SPLIT):
                tot += tl.load(ws_ptr + j * BN + rows, cache_modifier=".cg")
            jj = tl.arange(0, SP2)
            sqs = tl.load(ss_ptr + jj, mask=jj < SPLIT, other=0.0, cache_modifier=".cg")
            z = tot * rms_from_squares(sqs, NH * E, rms_eps)
        else:
            z = y * rms_from_squares(sq, NH * E, rms_eps)
        tl.store(z_ptr + rows, z, mask=rows < N)
        if ONE_PASS:   # x from z in registers (0.5-0.9% of a step, s19d); Sinkhorn (MIX) reads z back
            if MIX:
                tl.debug_barrier()
                _hc_mix(z_ptr, scale_ptr, base_ptr, post2_ptr, m2_ptr, 0, eps, NH, ITERS)
            _hc_x_store(hv, _hc_pre_held(z, rows, scale_ptr, base_ptr, eps, NH), nw, x_ptr, ee, xok,
                        E, rms_eps)
        else:
            tl.debug_barrier()                               # z, then the mixer reads it back
            if MIX:
                _hc_mix(z_ptr, scale_ptr, base_ptr, post2_ptr, m2_ptr, 0, eps, NH, ITERS)
            _hc_input(z_ptr, scale_ptr, base_ptr, out_ptr, norm_ptr, x_ptr, 0, E, eps, rms_eps, NH,
                      XB, ONE_PASS, True)
        if SPLIT > 1:
            tl.atomic_xchg(cnt_ptr, 0)
        if PEER:
            tl.store(ctr_ptr, nr)          # every program read it before its ticket


@triton.jit
def _hc_mix_kernel(z_ptr, scale_ptr, base_ptr, post_ptr, m_ptr, eps, NH: tl.constexpr,
                   ITERS: tl.constexpr, PDL: tl.constexpr = False):
    """post and M (the Sinkhorn chain) of token t from its mixer logits z [T, 2n+n^2]."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    _hc_mix(z_ptr + t * (2 * NH + NH * NH), scale_ptr, base_ptr, post_ptr, m_ptr, t, eps, NH, ITERS)


MIX_WARPS = 8       # warps of hc_mix's one program per token (others timed, none faster: s19c)


def hc_mix(z: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n_hc: int, iters: int,
           eps: float):
    """post [T, n] and M [T, n, n] from mixer logits z [T, 2n+n^2] (the part of hc_combine a
    sublayer's input does not need: hc_step(mix=False) leaves it to this launch, which the
    static decoder runs beside the sublayer). The twin is ds4tp.model.hc_split."""
    T, N = z.shape
    n = n_hc
    if n & (n - 1) or N != 2 * n + n * n or scale.shape != (3,) or base.shape != (N,):
        raise ValueError(f"hc_mix: z {tuple(z.shape)}, scale {tuple(scale.shape)}, base "
                         f"{tuple(base.shape)} do not match n_hc={n_hc}")
    for name, v in (("z", z), ("scale", scale), ("base", base)):
        if v.dtype != torch.float32:
            raise ValueError(f"hc_mix: {name} must be float32")
    post = torch.empty(T, n, dtype=torch.float32, device=z.device)
    m = torch.empty(T, n, n, dtype=torch.float32, device=z.device)
    if T:
        _hc_mix_kernel[(T,)](z.contiguous(), scale.contiguous(), base.contiguous(), post, m, eps,
                             NH=n, ITERS=iters, num_warps=MIX_WARPS, **pdl.triton_args(z.device))
    return post, m


HC_STEP_BE = 128   # stream columns per program of hc_step (4096 wide: 32 programs)
HC_STEP_WARPS = 4  # warps per program (s31b's sweep: 5.15 against 5.96 us at 8 without the
                   # mixer, 7.77 against 8.62 with it)
_step_switch = Switch()
set_step_enabled = _step_switch.set    # benchmarks time the three launches in the same run


def step_enabled() -> bool:
    return _step_switch.on


_head_switch = Switch()
set_head_enabled = _head_switch.set    # benchmarks time the output head's own launches (the last
                                       # update's hc_post, hc_logits and torch's mix) in one run


def head_enabled() -> bool:
    """The decode graphs' last stream update also forms the output head's input (hc_step with
    Weights.head_mixer)."""
    return _head_switch.on


def hc_step(f: torch.Tensor, hc: torch.Tensor, post: torch.Tensor, m: torch.Tensor,
            fn_raw: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm: torch.Tensor,
            n_hc: int, iters: int, eps: float, rms_eps: float, be: int | None = None,
            warps: int | None = None, mix: bool = True, peer=None, f_row: torch.Tensor | None = None):
    """One token: hc_post(f, hc, post, M) and then the next sublayer's mixer on the new streams
    (hc_logits with the F16 weight bytes fn_raw [N, 2*n*E], hc_combine with scale, base, norm)
    in one launch. f [1, E], hc [1, n, E], post [1, n], M [1, n, n] float32 -> the new streams
    [1, n, E], the normed sublayer input x [1, E], post' [1, n], M' [1, n, n]. mix=False: the
    mixer logits z [1, N] in place of post' and M' (-> the new streams, x, z), for hc_mix to
    finish beside the sublayer: Sinkhorn is ~2.2 of the launch's ~8.5 us on an H200
    (bench/hc_step_sweep.py) and only the update after the sublayer reads its result.
    peer (cuda_allreduce.PeerSum, two ranks of one host): f is this rank's part of the
    sublayer's output, summed with the peer's inside the launch (its all-reduce); both ranks
    must make the same calls. fn_raw of n rows (scale [1], base [n], mix=False): the output
    head's mix (model.Weights.head_mixer), x its normed input. f_row (int64 [1] on the device;
    no peer): f is a float16 table [V, E] and the update's f its row f_row, as f[f_row].float()
    (the embedding before layer 0: its gather and conversion need no launches of their own).
    The twins: ds4tp.model.hc_post_torch, hc_logits_torch, hc_combine_torch (output_head's mix
    for n rows; for peer, NCCL's all-reduce before them)."""
    if hc.dim() != 3 or hc.shape[0] != 1:
        raise ValueError(f"hc_step: expects one token's streams [1, n, E], got {tuple(hc.shape)}")
    _, n, E = hc.shape
    N = fn_raw.shape[0] if fn_raw.dim() == 2 else -1
    if N not in (2 * n + n * n, n) or (N == n and mix):
        raise ValueError(f"hc_step: a mixer of {N} logits; expected {2 * n + n * n} (a sublayer's) "
                         f"or {n} (the output head's: x only, mix=False) for n_hc={n_hc}")
    if f_row is not None:
        if peer is not None:
            raise ValueError("hc_step: f_row (a table's row as f) takes no all-reduce inside")
        if (f.dtype != torch.float16 or f.dim() != 2 or f.shape[1] != E or not f.is_contiguous()
                or f_row.dtype != torch.int64 or f_row.numel() != 1 or f_row.device != f.device):
            raise ValueError(f"hc_step: with f_row, f is a contiguous float16 table [V, {E}] and f_row "
                             f"an int64 index [1] beside it; got f {f.dtype} {tuple(f.shape)}, "
                             f"f_row {f_row.dtype} {tuple(f_row.shape)}")
    if (n != n_hc or n & (n - 1) or (f_row is None and f.shape != (1, E)) or post.shape != (1, n)
            or m.shape != (1, n, n)):
        raise ValueError(f"hc_step: f {tuple(f.shape)}, hc {tuple(hc.shape)}, post {tuple(post.shape)}, "
                         f"M {tuple(m.shape)} do not match n_hc={n_hc}")
    if fn_raw.dtype != torch.uint8 or fn_raw.shape != (N, 2 * n * E) or not fn_raw.is_contiguous():
        raise ValueError(f"hc_step: F16 mixer weight bytes {tuple(fn_raw.shape)} do not match "
                         f"{N} logits of {n * E} inputs")
    if norm.shape != (E,) or scale.shape != ((3,) if N > n else (1,)) or base.shape != (N,):
        raise ValueError(f"hc_step: norm {tuple(norm.shape)}, scale {tuple(scale.shape)}, base "
                         f"{tuple(base.shape)} do not match width {E}, {N} logits")
    for name, v in ((("f", f),) if f_row is None else ()) + (("hc", hc), ("post", post), ("M", m),
                                                           ("scale", scale), ("base", base), ("norm", norm)):
        if v.dtype != torch.float32:
            raise ValueError(f"hc_step: {name} must be float32")
    dev = hc.device
    out = torch.empty(1, n, E, dtype=torch.float32, device=dev)
    x = torch.empty(1, E, dtype=torch.float32, device=dev)
    z = torch.empty(1, N, dtype=torch.float32, device=dev)
    post2 = torch.empty(1, n, dtype=torch.float32, device=dev) if mix else z     # (unwritten
    m2 = torch.empty(1, n, n, dtype=torch.float32, device=dev) if mix else z     #  without mix)
    be = min(be or HC_STEP_BE, triton.next_power_of_2(E))
    split = triton.cdiv(E, be)
    bn = triton.next_power_of_2(N)
    ws, cnt = _split_buffers(split, 1, bn, 1, dev, z)
    ss = torch.empty(split, dtype=torch.float64, device=dev) if split > 1 else z
    xb = min(HC_ONE_PASS_MAX, triton.next_power_of_2(E))
    if peer is not None:
        from ds4tp.kernels.cuda_allreduce import FUSED_FLAGS
        if n != 4 or E > peer.cap or split > FUSED_FLAGS:
            raise ValueError(f"hc_step: the all-reduce inside takes 4 streams of at most {peer.cap} "
                             f"columns in at most {FUSED_FLAGS} programs, got {n} x {E} in {split}")
        ex = (peer.peer_slots, peer.my_slots, peer.peer_flags, peer.my_flags, peer.ctr, peer.cap,
              peer.timeout_ns)
    else:
        ex = (z, z, cnt, cnt, cnt, 0, 0)
    _hc_step_kernel[(split,)](f.contiguous(), hc.contiguous(), post.contiguous(), m.contiguous(), out,
                              fn_raw.view(torch.float16), z, ws, ss, cnt, scale.contiguous(),
                              base.contiguous(), norm.contiguous(), x, post2, m2, E, N, eps, rms_eps,
                              *ex, f_row if f_row is not None else cnt, NH=n, BE=be, BN=bn, SPLIT=split,
                              SP2=triton.next_power_of_2(split), ITERS=iters, XB=xb, ONE_PASS=E <= xb,
                              MIX=mix, PEER=peer is not None, ROW=f_row is not None,
                              num_warps=warps or HC_STEP_WARPS, **pdl.triton_args(dev))
    return (out, x, post2, m2) if mix else (out, x, z)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
