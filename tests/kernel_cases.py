"""Cases comparing the Triton kernels (ds4tp.kernels.triton_matvec) with their torch twins.

Shared by tests/test_kernels.py (on CUDA) and by the Triton CPU interpreter run, which executes
this file as a script with TRITON_INTERPRET=1 set before triton is imported:
    TRITON_INTERPRET=1 python tests/kernel_cases.py
Every case draws fresh random weight blocks (all byte patterns are valid for the K/IQ quants;
scales are finite f16) and activations with zero blocks, ties and exact .5 roundings.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds4tp import numerics, ops  # noqa: E402
from ds4tp.config import BLOCK, F16, IQ2_XXS, Q2_K, Q4_K, Q8_0, RMS_EPS, type_name  # noqa: E402
from ds4tp.qtensor import QTensor  # noqa: E402

TYPES = (F16, Q8_0, Q2_K, Q4_K, IQ2_XXS)
_F16_FIELDS = {Q8_0: (0,), Q2_K: (80, 82), Q4_K: (0, 2), IQ2_XXS: (0,)}


def rand_raw(qtype: int, shape, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """Random valid encoded rows uint8 [*shape[:-1], row_bytes]."""
    *lead, n_in = shape
    epb, bpb = BLOCK[qtype]
    nb = n_in // epb
    nrows = int(np.prod(lead)) if lead else 1
    if qtype == F16:
        w = (torch.randn(nrows, n_in, generator=gen) * 0.5).half()
        return w.view(torch.uint8).reshape(*lead, nb * bpb).to(device)
    raw = torch.randint(0, 256, (nrows, nb, bpb), generator=gen, dtype=torch.uint8)
    for at in _F16_FIELDS[qtype]:
        scale = torch.randn(nrows, nb, 1, generator=gen) * 0.01
        scale[torch.rand(nrows, nb, 1, generator=gen) < 0.02] = 0.0     # some all-zero blocks
        raw[..., at:at + 2] = scale.half().view(torch.uint8)
    return raw.reshape(*lead, nb * bpb).to(device)


def rand_weight(qtype, shape, gen, device="cpu") -> QTensor:
    return QTensor(qtype, tuple(shape), rand_raw(qtype, shape, gen, device))


def column_shard(w: QTensor, part: int, parts: int) -> QTensor:
    """A block-aligned column slice of every row, as TP shards it: a strided view of raw."""
    epb, bpb = BLOCK[w.qtype]
    n_in = w.shape[-1] // parts
    b0 = part * (n_in // epb) * bpb
    raw = w.raw[..., b0:b0 + n_in // epb * bpb]
    return QTensor(w.qtype, (*w.shape[:-1], n_in), raw)


def rand_act(shape, gen, device="cpu") -> torch.Tensor:
    """Activations with the awkward cases of the quantisers: an all-zero 256 block, a ±max tie
    (negative first), exact .5 roundings under d = 1 (Q8_0) and iscale = 1 (Q8_K)."""
    x = torch.randn(*shape, generator=gen) * 2.0
    flat = x.reshape(-1, shape[-1])
    n = shape[-1]
    if n >= 512:
        flat[0, 256:512] = 0.0                               # an all-zero Q8_K block
    flat[0, 32:64] = 0.0                                     # an all-zero Q8_0 block
    if flat.shape[0] > 1 and n >= 64:
        flat[1, 3], flat[1, 9] = -9.0, 9.0                   # tie on |x|: the first (-9) wins
    if flat.shape[0] > 2 and n >= 256:
        flat[2, :256] = torch.tensor([0.5, 1.5, 2.5, -2.5, -0.5, 3.5] * 42 + [0.5] * 4)
        flat[2, 7] = -127.0                                  # Q8_K: m = -127 -> iscale = 1
        flat[2, 32:64] = torch.linspace(-126.5, 127.0, 32)   # Q8_0 block with amax 127 -> d = 1
    return x.to(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


TOL = 3e-6      # relative to the largest output: float32 summation order only


def check(name, got, want, tol=TOL):
    e = rel_err(got.float().cpu(), want.float().cpu())
    if not (e <= tol) or got.shape != want.shape:
        raise AssertionError(f"{name}: relative error {e:.3g} > {tol:g} "
                             f"(shapes {tuple(got.shape)} vs {tuple(want.shape)})")
    return e


# ---- the cases ----------------------------------------------------------------------------------
def case_quantizers(device, gen):
    from ds4tp.kernels import triton_matvec as tm
    x = rand_act((6, 1024), gen, device)
    q, d = tm.quantize_q8_0(x)
    rt = (q.float().view(6, -1, 32) * d[..., None]).view(6, -1)
    assert torch.equal(rt, numerics.q8_0_act(x)), "Q8_0 activation round trip differs"
    q, d, bs = tm.quantize_q8_k(x)
    rt = (q.float().view(6, -1, 256) * d[..., None]).view(6, -1)
    assert torch.equal(rt, numerics.q8_k_act(x)), "Q8_K activation round trip differs"
    assert torch.equal(bs, q.int().view(6, -1, 16).sum(-1)), "Q8_K block sums differ"
    return "bit-identical"


def case_linear(device, gen, qtype, n_out, n_in, T, cfg=None):
    from ds4tp.kernels import triton_matvec as tm
    w = rand_weight(qtype, (n_out, n_in), gen, device)
    x = rand_act((T, n_in), gen, device)
    return check(f"linear {type_name(qtype)} {n_out}x{n_in} T={T} {cfg}",
                 tm.linear(w, x, cfg=_cfg(cfg)), ops.linear_torch(w, x))


def case_linear_shard(device, gen, qtype, n_out, n_in, T, cfg=None):
    """TP column shard (strided raw view) of a wider matrix."""
    from ds4tp.kernels import triton_matvec as tm
    full = rand_weight(qtype, (n_out, 2 * n_in), gen, device)
    w = column_shard(full, 1, 2)
    assert not w.raw.is_contiguous()
    x = rand_act((T, n_in), gen, device)
    return check(f"linear shard {type_name(qtype)} {n_out}x{n_in} T={T}",
                 tm.linear(w, x, cfg=_cfg(cfg)), ops.linear_torch(w, x))


def case_grouped(device, gen, qtype, groups, rows, n_in, T, cfg=None):
    from ds4tp.kernels import triton_matvec as tm
    w = rand_weight(qtype, (groups * rows, n_in), gen, device)
    x = rand_act((T, groups, n_in), gen, device)
    got = tm.linear(w, x.reshape(T, -1), groups=groups, cfg=_cfg(cfg)).view(T, groups, rows)
    return check(f"grouped {type_name(qtype)} {groups}x{rows}x{n_in} T={T}", got,
                 ops.grouped_linear_torch(w, x))


def rand_ids(T, K, E, gen, device, skip=0.15, dup=False):
    """Distinct experts per token (as routing gives), some -1 (not on this rank), experts shared
    by several tokens; with dup, token 0 also lists one expert twice (the twin allows it)."""
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if T > 1:
        e = int(ids[0, 0])
        ids[1] = torch.where(ids[1] == e, ids[1, 0], ids[1])  # keep token 1's ids distinct
        ids[1, 0] = e                                          # and share token 0's first expert
    ids[torch.rand(T, K, generator=gen) < skip] = -1
    if dup:
        ids[0, K - 1] = ids[0, 0] = max(int(ids[0, 0]), 0)
    return ids.to(device)


def expert_weight(qtype, E, n_out, n_in, gen, device, shard=""):
    """Expert weights as a rank holds them: whole, "cols" (TP column half of every row: a strided
    view) or "rows" (the second half of each expert's rows: a view with a larger expert stride)."""
    if shard == "cols":
        w = column_shard(rand_weight(qtype, (E, n_out, 2 * n_in), gen, device), 1, 2)
    elif shard == "rows":
        full = rand_weight(qtype, (E, 2 * n_out, n_in), gen, device)
        w = QTensor(qtype, (E, n_out, n_in), full.raw[:, n_out:])
    else:
        return rand_weight(qtype, (E, n_out, n_in), gen, device)
    assert not w.raw.is_contiguous()
    return w


def case_experts(device, gen, qtype, E, n_out, n_in, T, K, per_slot, cfg=None, dup=False, shard=""):
    from ds4tp.kernels import triton_matvec as tm
    w = expert_weight(qtype, E, n_out, n_in, gen, device, shard)
    ids = rand_ids(T, K, E, gen, device, dup=dup)
    x = rand_act((T, K, n_in) if per_slot else (T, n_in), gen, device)
    want = ops.expert_linear_torch(w, x, ids)
    tag = f"experts {type_name(qtype)} E={E} {n_out}x{n_in} T={T} K={K} per_slot={per_slot} cfg={cfg} {shard}"
    got = tm.expert_linear(w, x, ids, cfg=_cfg(cfg))
    e1 = check(tag + " slots", got, want)
    assert torch.all(got[ids < 0] == 0), tag + ": skipped slots are not zero"
    e2 = check(tag + " sum", tm.expert_linear(w, x, ids, sum_slots=True, cfg=_cfg(cfg)), want.sum(1))
    return max(e1, e2)


def _swiglu_case(device, gen, qtype, E, n_out, n_in, T, K, dup, shard, run, tag):
    """Random gate/up experts, ids, x and router weights; run(wg, wu, x, ids, rw) against the
    twin. swiglu is 11-Lipschitz in g and u (|u|, |g sigmoid(g)| <= 10), so the summation-order
    error of g and u (relative to their own size, which the clamps do not bound) carries over."""
    wg = expert_weight(qtype, E, n_out, n_in, gen, device, shard)
    wu = expert_weight(qtype, E, n_out, n_in, gen, device, shard)
    ids = rand_ids(T, K, E, gen, device, dup=dup)
    x = rand_act((T, n_in), gen, device) * 20.0            # so that the clamps act
    rw = torch.rand(T, K, generator=gen).to(device)
    g, u = ops.expert_linear_torch(wg, x, ids), ops.expert_linear_torch(wu, x, ids)
    want = numerics.swiglu_clamped(g, u, 10.0) * rw[..., None]
    got = run(wg, wu, x, ids, rw)
    assert got is not None, f"{tag}: the kernel did not take the case"
    lim = TOL * 11 * (g.abs().max() + u.abs().max()).item()
    err = (got - want).abs().max().item()
    if not err <= lim:
        raise AssertionError(f"{tag}: abs error {err:.3g} > {lim:.3g}")
    assert torch.all(got[ids < 0] == 0), f"{tag}: skipped slots are not zero"
    return err / max(want.abs().max().item(), 1e-30)


def case_swiglu(device, gen, qtype, E, n_out, n_in, T, K, cfg=None, dup=False, shard=""):
    from ds4tp.kernels import triton_matvec as tm
    return _swiglu_case(device, gen, qtype, E, n_out, n_in, T, K, dup, shard,
                        lambda wg, wu, x, ids, rw: tm.expert_swiglu(wg, wu, x, ids, rw, 10.0, cfg=_cfg(cfg)),
                        f"swiglu {type_name(qtype)} {n_out}x{n_in} T={T}")


def case_cuda_swiglu(device, gen, E, n_out, n_in, T, K, rpc=None, dup=False, shard="", warps=None):
    """The CUDA C gate/up kernel (cuda_experts.swiglu, IQ2_XXS) against the twin; asserts that
    it took the case."""
    from ds4tp.kernels import cuda_experts as ce
    kw = {"warps": warps} if warps else {}
    return _swiglu_case(device, gen, IQ2_XXS, E, n_out, n_in, T, K, dup, shard,
                        lambda wg, wu, x, ids, rw: ce.swiglu(wg, wu, x, ids, rw, 10.0, rpc=rpc, **kw),
                        f"cuda swiglu {n_out}x{n_in} T={T} K={K} rpc={rpc} {shard}")


def case_cuda_down_sum(device, gen, E, n_out, n_in, T, K, rpc=None, dup=False, shard="", warps=None):
    """The CUDA C routed down kernel (cuda_experts.down_sum, Q2_K, summed over the slots)
    against the twin; asserts that it took the case."""
    from ds4tp.kernels import cuda_experts as ce
    w = expert_weight(Q2_K, E, n_out, n_in, gen, device, shard)
    ids = rand_ids(T, K, E, gen, device, dup=dup)
    x = rand_act((T, K, n_in), gen, device)
    want = ops.expert_linear_torch(w, x, ids).sum(1)
    got = ce.down_sum(w, x, ids, rpc=rpc, **({"warps": warps} if warps else {}))
    assert got is not None, f"cuda_experts.down_sum did not take {n_out}x{n_in} T={T} K={K} {shard}"
    return check(f"cuda down_sum {n_out}x{n_in} T={T} K={K} rpc={rpc} {shard}", got, want)


def case_cuda_shared_rides(device, gen, E, F, n_in, K, rows_sh=None, shard="", rpc=None):
    """The shared expert's rows riding in the routed launches (cuda_experts.swiglu / down_sum
    with `shared`, one token): bit-identical to the launches they replace (the routed kernels
    without it, the Q8_0 matvec of the gate|up, the Q8_0 SwiGLU-prologue matvec of the down,
    then the sum), and against the torch twins. rows_sh: the shared gate|up rows (default 2F);
    rpc: the down kernel's rows per block (several rows per warp)."""
    from ds4tp.kernels import cuda_experts as ce
    from ds4tp.kernels import cuda_matvec as cm
    rows_sh = rows_sh or 2 * F
    wg = expert_weight(IQ2_XXS, E, F, n_in, gen, device, shard)
    wu = expert_weight(IQ2_XXS, E, F, n_in, gen, device, shard)
    wd = expert_weight(Q2_K, E, n_in, F, gen, device)
    w_gu = rand_weight(Q8_0, (rows_sh, n_in), gen, device)
    w_sd = rand_weight(Q8_0, (n_in, rows_sh // 2), gen, device)
    ids = rand_ids(1, K, E, gen, device)
    x = rand_act((1, n_in), gen, device) * 20.0            # so that the clamps act
    rw = torch.rand(1, K, generator=gen).to(device)
    tag = f"cuda shared rides E={E} F={F} in={n_in} K={K} sh={rows_sh} rpc={rpc} {shard}"
    got = ce.swiglu(wg, wu, x, ids, rw, 10.0, shared=w_gu)
    assert got is not None, f"{tag}: swiglu did not take the shared rows"
    mid, gu = got
    out = ce.down_sum(wd, mid, ids, shared=w_sd, gu=gu, clamp=10.0, rpc=rpc)
    assert out is not None, f"{tag}: down_sum did not take the shared rows"
    mid0 = ce.swiglu(wg, wu, x, ids, rw, 10.0)
    gu0 = cm.q8_0(w_gu, x)
    out0 = ce.down_sum(wd, mid0, ids, rpc=rpc) + cm.q8_0(w_sd, gu0, swiglu_clamp=10.0)
    for name, a, b in (("mid", mid, mid0), ("gate|up", gu, gu0), ("out", out, out0)):
        assert torch.equal(a, b), f"{tag}: {name} differs from the separate launches by {(a - b).abs().max()}"
    want = ops.expert_linear_torch(wd, mid, ids).sum(1) + ops.swiglu_linear_torch(w_sd, gu, 10.0)
    check(f"{tag} gate|up", gu, ops.linear_torch(w_gu, x))
    return check(tag, out, want)


def case_cuda_mix_ride(device, gen, E, F, n_in, K, spread=1.0):
    """The next HC update's Sinkhorn riding as one more block of the Q8_0 matvec (attn_output_b)
    and of the routed down with the shared rows (cuda_c.MixJob, common.cuh hc_sinkhorn_warp):
    each launch's output bit for bit as without it; post and M the same bits as the Triton
    launch they replace (triton_hc.hc_mix), and within 1e-5 of its twin (model.hc_split, as
    case_hc_step checks hc_mix); the Sinkhorn as the grid's last block and as its first
    (cuda_c.MIX_FIRST).
    spread: the logits' scale (large: Sinkhorn's steps all matter)."""
    from ds4tp.config import HC_EPS
    from ds4tp.kernels import cuda_c, triton_hc
    from ds4tp.kernels import cuda_experts as ce
    from ds4tp.kernels import cuda_matvec as cm
    from ds4tp.model import hc_split
    z = (torch.randn(1, 24, generator=gen) * spread).to(device)
    scale = (torch.rand(3, generator=gen) + 0.2).to(device)
    base = torch.randn(24, generator=gen).to(device)
    want_post, want_m = triton_hc.hc_mix(z, scale, base, 4, 20, HC_EPS)
    _, t_post, t_m = hc_split(z, scale, base, 4, 20)
    w = rand_weight(Q8_0, (n_in, 2 * n_in), gen, device)
    x = rand_act((1, 2 * n_in), gen, device)
    wd = expert_weight(Q2_K, E, n_in, F, gen, device)
    w_sd = rand_weight(Q8_0, (n_in, F), gen, device)
    ids = rand_ids(1, K, E, gen, device)
    mid = rand_act((1, K, F), gen, device)
    gu = rand_act((1, 2 * F), gen, device) * 20.0
    runs = {"matvec": (lambda mix: cm.q8_0(w, x, mix=mix)),
            "down": (lambda mix: ce.down_sum(wd, mid, ids, shared=w_sd, gu=gu, clamp=10.0, mix=mix))}
    for (name, launch), first in ((r, f) for r in runs.items() for f in (0, 1)):
        tag = f"mix ride {name} (Sinkhorn as the {'first' if first else 'last'} block)"
        plain = launch(None)
        job = cuda_c.MixJob(z, scale, base, HC_EPS, 20)
        keep, cuda_c.MIX_FIRST = cuda_c.MIX_FIRST, first
        try:
            got = launch(job)
        finally:
            cuda_c.MIX_FIRST = keep
        assert plain is not None and got is not None and job.done, f"{tag}: not taken"
        assert torch.equal(got, plain), f"{tag}: output differs by {(got - plain).abs().max()}"
        for what, a, b in (("post", job.post, want_post), ("M", job.m, want_m)):
            assert torch.equal(a, b), f"{tag}: {what} differs from hc_mix's by {(a - b).abs().max()}"
        check(f"{tag} post", job.post, t_post, 1e-5)
        check(f"{tag} M", job.m, t_m, 1e-5)
    job = cuda_c.MixJob(z, scale, base, HC_EPS, 20)         # more than one token: not taken
    assert ce.down_sum(wd, mid.expand(2, K, F).contiguous(), ids.expand(2, K).contiguous(), mix=job) is not None
    assert not job.done, "mix ride: a launch of two tokens took the Sinkhorn"
    return 0.0


def decode_order(w: QTensor) -> QTensor:
    """A copy of an IQ2_XXS weight with its rows in the decode order (qtensor.IQ2_DECODE)."""
    from ds4tp.qtensor import IQ2_DECODE
    d = QTensor(w.qtype, w.shape, w.raw.clone())
    d.set_layout(IQ2_DECODE)
    return d


def case_cuda_decode_order(device, gen, E, F, T, K):
    """Routed gate/up weights with their rows in the decode order (kernels.prepare_weights) give
    the bits of GGUF's order in every launch that reads them (the decode kernel, plain and
    choosing its experts with the shared rows riding; the Triton kernels, through
    QTensor.gguf_raw; the twin, f32), but the prefill's tensor-core kernels, which sum over k in
    the row's byte order: those within the float16 path's tolerance of GGUF's order (their
    float32 accumulation on tensor cores differed by ~5e-4 of the largest output, s29f)."""
    from ds4tp.config import EXPERT_WEIGHT_SCALE, ROUTER_WEIGHT_FLOOR
    from ds4tp.kernels import cuda_experts as ce, triton_gemm as tg, triton_matvec as tm
    wg, wu = (expert_weight(IQ2_XXS, E, F, 4096, gen, device) for _ in range(2))
    dg, du = decode_order(wg), decode_order(wu)
    assert not torch.equal(dg.raw, wg.raw)
    ids = rand_ids(T, K, E, gen, device)
    x = rand_act((T, 4096), gen, device) * 20.0
    rw = torch.rand(T, K, generator=gen).to(device)
    tag = f"cuda decode order E={E} F={F} T={T} K={K}"
    pairs = []
    got = ce.swiglu(dg, du, x, ids, rw, 10.0)
    assert got is not None, f"{tag}: the decode kernel did not take the decode order"
    pairs.append(("decode kernel", got, ce.swiglu(wg, wu, x, ids, rw, 10.0)))
    ce.set_tables_enabled(False)      # (the decode order through one grid table, masks computed)
    try:
        pairs.append(("decode kernel without the tables", ce.swiglu(dg, du, x, ids, rw, 10.0), got))
    finally:
        ce.set_tables_enabled(True)
    if T == 1:
        w_gu = rand_weight(Q8_0, (2 * F, 4096), gen, device)
        logits = (torch.randn(1, E, generator=gen) * 2).to(device)
        tok = torch.tensor([3], dtype=torch.int64, device=device)
        a, b = (ce.swiglu_routed(g_, u_, x, logits, None, None, tok, K, ROUTER_WEIGHT_FLOOR,
                                 EXPERT_WEIGHT_SCALE, 10.0, shared=w_gu) for g_, u_ in ((dg, du), (wg, wu)))
        pairs += [(f"routed kernel {n}", p, q) for n, p, q in zip(("mid", "gate|up", "ids", "weights"), a, b)]
    ptab, table, _, _, _ = tg.expert_tiles(ids, E, 64)
    x16 = x.half()
    for swiglu in (True, False):      # (its sum over k runs in the row's byte order: not the bits)
        outs = []
        for g_, u_ in ((dg, du), (wg, wu)):
            o = torch.zeros(T, K, F, device=device)
            assert ce.many(g_, u_ if swiglu else None, x16, False, ptab, table, rw if swiglu else None,
                           o, swiglu, 10.0), f"{tag}: the tensor-core kernel did not take it"
            outs.append(o)
        check(f"{tag} tensor-core kernel swiglu={swiglu}", *outs, H16_TOL)
    pairs.append(("Triton kernel", tm.expert_swiglu(dg, du, x, ids, rw, 10.0),
                  tm.expert_swiglu(wg, wu, x, ids, rw, 10.0)))
    want = ops.expert_swiglu_torch(wg, wu, x, ids, rw, 10.0)
    pairs.append(("twin", ops.expert_swiglu_torch(dg, du, x, ids, rw, 10.0), want))
    for name, a, b in pairs:
        assert torch.equal(a, b), f"{tag}: {name} differs from GGUF's order"
    # against the twin as _swiglu_case bounds it (the SwiGLU is 11-Lipschitz in g and u)
    g, u = ops.expert_linear_torch(wg, x, ids), ops.expert_linear_torch(wu, x, ids)
    lim = TOL * 11 * (g.abs().max() + u.abs().max()).item()
    err = (got - want).abs().max().item()
    assert err <= lim, f"{tag}: abs error {err:.3g} > {lim:.3g}"
    return err / max(want.abs().max().item(), 1e-30)


def case_cuda_swiglu_routed(device, gen, E, F, n_in, K, bias=True, hashed=False, ties=False,
                            spread=2.0):
    """The gate/up launch that also chooses the experts (cuda_experts.swiglu_routed, one token,
    the shared rows riding) against model.route_select: the same ids, weights to float32
    rounding; against the choice's own launch (triton_route): the same ids, bit-identical
    weights; and mid, gate|up bit-identical to the plain launch given those ids and weights.
    ties: 8 equal largest logits, so that the lower ids must win; hashed: a hash layer's table
    (distinct ids per token, contiguous as model.Weights.bind makes it; a column slice, not
    contiguous, is declined); spread: the logits' standard deviation (12: softplus's outer
    branches, |z| > 20, taken too)."""
    from ds4tp.config import EXPERT_WEIGHT_SCALE, ROUTER_WEIGHT_FLOOR
    from ds4tp.kernels import cuda_experts as ce
    from ds4tp.model import route_select
    wg = expert_weight(IQ2_XXS, E, F, n_in, gen, device)
    wu = expert_weight(IQ2_XXS, E, F, n_in, gen, device)
    w_gu = rand_weight(Q8_0, (2 * F, n_in), gen, device)
    x = rand_act((1, n_in), gen, device) * 20.0
    logits = torch.randn(1, E, generator=gen) * spread
    group = []
    if ties:
        m = int(logits[0].argmax())
        group = list(range(m, m + 8)) if m + 8 <= E else list(range(m - 7, m + 1))
        logits[0, group] = logits[0, m].item()
    logits = logits.to(device)
    b = (torch.rand(E, generator=gen) * 0.1).to(device) if bias else None
    tid = torch.rand(50, E, generator=gen).argsort(-1).to(device)[:, :K] if hashed else None
    tok = torch.tensor([17], dtype=torch.int64, device=device)
    tag = f"cuda swiglu routed E={E} F={F} in={n_in} K={K} bias={bias} hashed={hashed} ties={ties}"
    if hashed:      # read in place: a contiguous copy would be freed before the kernel reads it
        assert ce.swiglu_routed(wg, wu, x, logits, b, tid, tok, K, ROUTER_WEIGHT_FLOOR,
                                EXPERT_WEIGHT_SCALE, 10.0, shared=w_gu) is None, f"{tag}: took a strided table"
        tid = tid.contiguous()
    got = ce.swiglu_routed(wg, wu, x, logits, b, tid, tok, K, ROUTER_WEIGHT_FLOOR,
                           EXPERT_WEIGHT_SCALE, 10.0, shared=w_gu)
    assert got is not None, f"{tag}: the kernel did not take the case"
    mid, gu, ids, wt = got
    ids_t, wt_t = route_select(logits, b, tid[tok] if hashed else None, K)
    if ties:
        assert ids_t[0].tolist() == group[:K], f"{tag}: the twin chose {ids_t.tolist()}"
    assert torch.equal(ids, ids_t), f"{tag}: ids {ids.tolist()} against {ids_t.tolist()}"
    err = check(f"{tag} weights", wt, wt_t)
    # the choice's own launch: the same ids, bit-identical weights (the same arithmetic)
    from ds4tp.kernels import triton_route
    ids_o, wt_o = triton_route.route(logits, b, tid, tok, K, ROUTER_WEIGHT_FLOOR, EXPERT_WEIGHT_SCALE)
    assert torch.equal(ids, ids_o), f"{tag}: ids {ids.tolist()} against the own launch's {ids_o.tolist()}"
    assert torch.equal(wt, wt_o), f"{tag}: weights differ from the own launch's by {(wt - wt_o).abs().max()}"
    mid0, gu0 = ce.swiglu(wg, wu, x, ids, wt, 10.0, shared=w_gu)
    for name, a, b0 in (("mid", mid, mid0), ("gate|up", gu, gu0)):
        assert torch.equal(a, b0), f"{tag}: {name} differs from the plain launch by {(a - b0).abs().max()}"
    return err


def case_cuda_not_covered(device, gen):
    """What the CUDA C path leaves to the Triton kernels: it returns None, it does not fail."""
    from ds4tp.kernels import cuda_experts as ce
    ids = rand_ids(1, 6, 8, gen, device)
    rw = torch.rand(1, 6, generator=gen).to(device)
    w512 = expert_weight(IQ2_XXS, 8, 16, 512, gen, device)         # not a multiple of 2048 inputs
    assert ce.swiglu(w512, w512, rand_act((1, 512), gen, device), ids, rw, 10.0) is None
    wq8 = expert_weight(Q8_0, 8, 16, 2048, gen, device)            # other weight types
    assert ce.swiglu(wq8, wq8, rand_act((1, 2048), gen, device), ids, rw, 10.0) is None
    assert ce.down_sum(wq8, rand_act((1, 6, 2048), gen, device), ids) is None
    w4096 = expert_weight(Q2_K, 8, 16, 4096, gen, device)          # rows of more than 2048 inputs
    assert ce.down_sum(w4096, rand_act((1, 6, 4096), gen, device), ids) is None
    ids5 = rand_ids(5, 6, 8, gen, device)                          # more than MAX_T tokens
    assert ce.down_sum(expert_weight(Q2_K, 8, 16, 512, gen, device),
                       rand_act((5, 6, 512), gen, device), ids5) is None
    return "None for each"


def case_cuda_q8_0(device, gen, n_out, n_in, groups=1, normed=False, shard=False, rpb=None, warps=None,
                   loads=None, swiglu=False):
    """The CUDA C Q8_0 one-token matvec (cuda_matvec.q8_0) against the twin of its entry point
    (linear, grouped_linear, linear_normed, swiglu_linear); asserts that it took the case."""
    from ds4tp.kernels import cuda_matvec as cm
    kw = {"rpb": rpb, **({"warps": warps} if warps else {}), **({"loads": loads} if loads else {})}
    if shard:
        w = column_shard(rand_weight(Q8_0, (n_out, 2 * n_in), gen, device), 1, 2)
        assert not w.raw.is_contiguous()
    else:
        w = rand_weight(Q8_0, (n_out, n_in), gen, device)
    x = rand_act((1, groups * n_in), gen, device)
    tag = f"cuda q8_0 {n_out}x{n_in} groups={groups} normed={normed} shard={shard} rpb={rpb} swiglu={swiglu}"
    if swiglu:   # gate | up, spread past the clamp (10) on both sides
        gu = rand_act((1, 2 * n_in), gen, device) * 6
        got, want = cm.q8_0(w, gu, swiglu_clamp=10.0, **kw), ops.swiglu_linear_torch(w, gu, 10.0)
    elif normed:
        norm = (torch.rand(n_in, generator=gen) + 0.5).to(device)
        got, want = cm.q8_0(w, x, norm=norm, eps=RMS_EPS, **kw), ops.linear_normed_torch(w, x, norm)
    elif groups > 1:
        got = cm.q8_0(w, x, groups, **kw)
        want = ops.grouped_linear_torch(w, x.view(1, groups, n_in)).reshape(1, -1)
    else:
        got, want = cm.q8_0(w, x, **kw), ops.linear_torch(w, x)
    assert got is not None, f"{tag}: the kernel did not take the case"
    return check(tag, got, want)


def case_cuda_f16(device, gen, n_out, n_in, shard=False):
    """The CUDA C F16 one-token matvec (cuda_matvec.f16, through the dispatch's linear) against
    the twin; asserts that it took the case. shard: a column shard (rows not contiguous)."""
    from ds4tp import kernels
    from ds4tp.kernels import cuda_matvec as cm
    if shard:
        w = column_shard(rand_weight(F16, (n_out, 2 * n_in), gen, device), 1, 2)
    else:
        w = rand_weight(F16, (n_out, n_in), gen, device)
    x = rand_act((1, n_in), gen, device)
    got = cm.f16(w, x)
    tag = f"cuda f16 {n_out}x{n_in} shard={shard}"
    assert got is not None, f"{tag}: the kernel did not take the case"
    assert torch.equal(kernels.linear(w, x), got), f"{tag}: the dispatch took another path"
    return check(tag, got, ops.linear_torch(w, x))


def case_cuda_q8_0_not_covered(device, gen):
    """What the CUDA C Q8_0 matvec leaves to the Triton kernels: None, no failure."""
    from ds4tp.kernels import cuda_matvec as cm
    w = rand_weight(Q8_0, (16, 1536), gen, device)                 # not 512 * 2^i inputs
    assert cm.q8_0(w, rand_act((1, 1536), gen, device)) is None
    w = rand_weight(Q8_0, (16, 256), gen, device)                  # fewer than 512 inputs
    assert cm.q8_0(w, rand_act((1, 256), gen, device)) is None
    w = rand_weight(Q8_0, (16, 512), gen, device)
    assert cm.q8_0(w, rand_act((2, 512), gen, device)) is None    # two tokens
    assert cm.q8_0(w, rand_act((1, 512), gen, device).double()) is None
    assert cm.q8_0(w, rand_act((1, 512), gen, device), norm=torch.ones(256, device=device)) is None
    wf = rand_weight(F16, (16, 512), gen, device)                  # other weight types
    assert cm.q8_0(wf, rand_act((1, 512), gen, device)) is None
    assert cm.f16(wf, rand_act((1, 512), gen, device)) is None     # F16 narrower than 1024
    assert cm.f16(w, rand_act((1, 512), gen, device)) is None      # not F16
    wf = rand_weight(F16, (16, 1024), gen, device)
    assert cm.f16(wf, rand_act((2, 1024), gen, device)) is None    # two tokens
    return "None for each"


def cuda_c_cases():
    """The CUDA C kernels (need CUDA and CuPy): DS4's K = 6 and K = 8, T = 1..4, -1 and duplicate
    ids, TP shards (rows of gate/up, columns of down), row counts that leave a partial block."""
    yield "cuda swiglu 2048 in T=1", case_cuda_swiglu, (8, 48, 2048, 1, 6)
    yield "cuda swiglu 4096 in T=3 rows dup", case_cuda_swiglu, (8, 40, 4096, 3, 6, 5, True, "rows")
    yield "cuda swiglu 4096 in T=4 rpc 32", case_cuda_swiglu, (8, 32, 4096, 4, 6, 32)
    yield "cuda swiglu K=8 T=2", case_cuda_swiglu, (12, 16, 2048, 2, 8, 3)
    yield "cuda down 2048 in T=1", case_cuda_down_sum, (8, 40, 2048, 1, 6)
    yield "cuda down 1024 in T=3 cols", case_cuda_down_sum, (8, 48, 1024, 3, 6, 5, False, "cols")
    yield "cuda down 512 in K=8 dup", case_cuda_down_sum, (12, 24, 512, 2, 8, 7, True)
    yield "cuda down 256 in T=4", case_cuda_down_sum, (8, 16, 256, 4, 6)
    yield "cuda down 2048 in T=4 rpc 32 dup", case_cuda_down_sum, (8, 36, 2048, 4, 6, 32, True)
    # several rows per warp (each pass's registers take the next row's pass once summed)
    yield "cuda down 1024 in rpc 50", case_cuda_down_sum, (8, 100, 1024, 1, 6, 50)
    yield "cuda down 1024 in T=2 rpc 50 dup", case_cuda_down_sum, (8, 100, 1024, 2, 6, 50, True)
    yield "cuda down 512 in K=8 rpc 70", case_cuda_down_sum, (12, 90, 512, 1, 8, 70)
    # the shared expert's rows in the routed launches: DS4 at TP=1 (F 2048) and TP=2 (1024, the
    # routed gate/up a row shard), and a shared expert narrower than the routed ones
    yield "cuda shared rides TP=1", case_cuda_shared_rides, (16, 2048, 4096, 6)
    yield "cuda shared rides TP=2 rows", case_cuda_shared_rides, (16, 1024, 4096, 6, None, "rows")
    yield "cuda shared rides 2048 in, F 512", case_cuda_shared_rides, (8, 1024, 2048, 8, 1024)
    yield "cuda shared rides TP=2 rpc 80", case_cuda_shared_rides, (16, 1024, 4096, 6, None, "rows", 80)
    yield "cuda shared rides TP=1 rpc 80", case_cuda_shared_rides, (16, 2048, 4096, 6, None, "", 80)
    yield "cuda not covered", case_cuda_not_covered, ()
    # other block sizes (a compile-time constant) that benchmarks time
    yield "cuda swiglu 8 warps rows", case_cuda_swiglu, (8, 40, 4096, 3, 6, 5, True, "rows", 8)
    yield "cuda down 8 warps cols K=8", case_cuda_down_sum, (12, 48, 1024, 1, 8, None, False, "cols", 8)
    # the Q8_0 one-token matvec: every input width, rows that leave warps and blocks partial
    for n_in in (512, 1024, 2048, 4096, 8192, 16384):
        yield f"cuda q8_0 {n_in} in", case_cuda_q8_0, (72, n_in)
    yield "cuda q8_0 q_b normed", case_cuda_q8_0, (300, 1024, 1, True)
    yield "cuda q8_0 normed 4096 rpb 8", case_cuda_q8_0, (40, 4096, 1, True, False, 8)
    yield "cuda q8_0 grouped 8", case_cuda_q8_0, (8 * 40, 4096, 8)
    yield "cuda q8_0 grouped 4 rpb 16", case_cuda_q8_0, (4 * 24, 1024, 4, False, False, 16)
    yield "cuda q8_0 column shard", case_cuda_q8_0, (48, 2048, 1, False, True)
    yield "cuda q8_0 many rows per warp", case_cuda_q8_0, (4099, 1024, 1, False, False, 512)
    yield "cuda q8_0 4 warps", case_cuda_q8_0, (100, 8192, 1, False, False, None, 4)
    yield "cuda q8_0 16 warps normed", case_cuda_q8_0, (100, 2048, 1, True, False, None, 16)
    yield "cuda q8_0 4 loads", case_cuda_q8_0, (70, 1024, 1, False, False, 16, 8, 4)
    yield "cuda q8_0 16 loads grouped", case_cuda_q8_0, (4 * 20, 512, 4, False, False, None, 8, 16)
    yield "cuda q8_0 16 loads 8192", case_cuda_q8_0, (30, 8192, 1, True, False, None, 8, 16)
    yield "cuda q8_0 swiglu shared down", case_cuda_q8_0, (512, 2048, 1, False, False, None, None, None, True)
    yield "cuda q8_0 swiglu TP=2 shard", case_cuda_q8_0, (64, 1024, 1, False, True, None, None, None, True)
    yield "cuda q8_0 not covered", case_cuda_q8_0_not_covered, ()
    # the F16 one-token matvec: the router (4096 -> 256), 1 to 16 warps per row, partial blocks
    yield "cuda f16 router", case_cuda_f16, (256, 4096)
    yield "cuda f16 1024 in", case_cuda_f16, (37, 1024)
    yield "cuda f16 16384 in", case_cuda_f16, (19, 16384)
    yield "cuda f16 3072 in many rows", case_cuda_f16, (1000, 3072)
    yield "cuda f16 column shard", case_cuda_f16, (64, 2048, True)
    # the routed gate/up rows in the decode order: TP=2's and TP=1's rows, a token and a few
    yield "cuda decode order TP=2 T=1", case_cuda_decode_order, (16, 1024, 1, 6)
    yield "cuda decode order TP=1 T=3", case_cuda_decode_order, (12, 2048, 3, 6)
    # the gate/up launch that chooses its experts: DS4 (256 experts, 6 chosen, bias, hash
    # layers, TP=2's rows), fewer experts, ties
    yield "cuda swiglu routed", case_cuda_swiglu_routed, (256, 64, 4096, 6)
    yield "cuda swiglu routed hash layer", case_cuda_swiglu_routed, (256, 64, 4096, 6, False, True)
    yield "cuda swiglu routed 40 experts K=8 no bias", case_cuda_swiglu_routed, (40, 48, 2048, 8, False)
    yield "cuda swiglu routed ties", case_cuda_swiglu_routed, (256, 32, 2048, 6, False, False, True)
    yield "cuda swiglu routed wide logits", case_cuda_swiglu_routed, (256, 32, 2048, 6, True, False, False, 12.0)
    yield "cuda swiglu routed hash layer wide logits", case_cuda_swiglu_routed, (256, 32, 2048, 6, True, True, False, 12.0)
    # the tensor-core float16 routed experts of a prefill (tiles of up to 64 pairs)
    yield "cuda mma swiglu 4096 in", case_cuda_experts_mma, (IQ2_XXS, 16, 96, 4096, 300, 6, False, True)
    yield "cuda mma swiglu rows tq 16", case_cuda_experts_mma, (IQ2_XXS, 8, 40, 512, 45, 6, False, True, "rows", 0.1, 16)
    yield "cuda mma iq2 slots 256 in", case_cuda_experts_mma, (IQ2_XXS, 4, 136, 256, 50, 3, False, False)
    yield "cuda mma down cols", case_cuda_experts_mma, (Q2_K, 8, 200, 1024, 120, 6, True, False, "cols")
    yield "cuda mma down 2048 in", case_cuda_experts_mma, (Q2_K, 16, 256, 2048, 400, 6, True, False)
    yield "cuda mma down shared x", case_cuda_experts_mma, (Q2_K, 4, 64, 512, 33, 2, False, False)


H16_TOL = 2e-3   # the float16 path rounds weights and activations to 11 bits (triton_gemm)
# F16 weights on cuBLAS (triton_gemm.f16_split_mm): the split is exact to 2^-22, but the tensor
# cores' float32 accumulation does not round each addition (8.5e-6 measured on an H200 at K=4096)
F16_SPLIT_TOL = 2e-5


def exact_linear(w, x, ids=None):
    """The float16 path's twin: the product with the exactly dequantised weight in float64 (no
    activation quantisation). Dense x [T, in]; grouped x [T, G, in]; experts (ids [T, K])
    x [T, in] or [T, K, in] -> [T, K, out], zeros where ids is -1."""
    from ds4tp.dequant import dequantize
    xd = x.double()
    if ids is None:
        wd = dequantize(w.raw, w.qtype, w.shape[-1]).double()
        if x.dim() == 2:
            return (xd @ wd.T).float()
        G = x.shape[1]
        return torch.einsum("tgi,goi->tgo", xd, wd.reshape(G, -1, wd.shape[-1])).float()
    T, K = ids.shape
    xs = xd if x.dim() == 3 else xd[:, None, :].expand(T, K, x.shape[-1])
    out = torch.zeros(T, K, w.shape[-2], dtype=torch.float64, device=x.device)
    for e in torch.unique(ids[ids >= 0]).tolist():          # one expert's weight at a time
        sel = ids == e
        out[sel] = xs[sel] @ dequantize(w.raw[e], w.qtype, w.shape[-1]).double().T
    return out.float()


def case_dequant_h16(device, gen, qtype, shape, first=0, count=None, shard=""):
    """triton_gemm.dequant_h16 against the exact torch dequantisation rounded to float16."""
    from ds4tp.kernels import triton_gemm as tg
    from ds4tp.dequant import dequantize
    if len(shape) == 3:
        w = expert_weight(qtype, *shape, gen, device, shard)
        n = shape[0] - first if count is None else count
        got = tg.dequant_h16(w, first, count)
        want = dequantize(w.raw[first:first + n], qtype, shape[-1]).half()
    else:
        w = rand_weight(qtype, shape, gen, device)
        got = tg.dequant_h16(w)
        want = dequantize(w.raw, qtype, shape[-1]).half()
    assert got.shape == want.shape and got.dtype == torch.float16, (got.shape, want.shape)
    # one float32 rounding apart at most, so equal after the float16 rounding but for rare ties
    err = (got.float() - want.float()).abs()
    ulp = want.float().abs().clamp_min(2.0 ** -14) * 2.0 ** -10
    if not bool((err <= ulp).all()):
        raise AssertionError(f"dequant_h16 {type_name(qtype)} {shape}: {int((err > ulp).sum())} "
                             f"values off by more than one float16 ulp")
    return float((err > 0).float().mean())


def case_gemm_experts_h16_groups(device, gen, qtype, E, group, swiglu):
    """The float16 expert path decoding `group` experts at a time (several groups, some with
    no tiles): same results as one group."""
    from ds4tp.kernels import triton_gemm as tg
    keep = tg.H16_EXPERT_GROUP
    tg.H16_EXPERT_GROUP = group
    try:
        return case_gemm_experts(device, gen, qtype, E, 16, 256, 13, 2, False, swiglu,
                                 dict(bn=16, tq=16, nb=32), "", 0.3, True)
    finally:
        tg.H16_EXPERT_GROUP = keep


def case_cuda_experts_mma(device, gen, qtype, E, n_out, n_in, T, K, per_slot, swiglu, shard="",
                          skip=0.1, tq=64):
    """The tensor-core float16 routed experts (cuda_experts.many, experts_mma.cu) against the
    exact product in float64 (H16_TOL); asserts that the CUDA C kernel took the launch."""
    from ds4tp.kernels import cuda_experts, triton_gemm as tg
    w = expert_weight(qtype, E, n_out, n_in, gen, device, shard)
    ids = rand_ids(T, K, E, gen, device, skip=skip)
    x = rand_act((T, K, n_in) if per_slot else (T, n_in), gen, device) * (20.0 if swiglu else 1.0)
    wu = expert_weight(qtype, E, n_out, n_in, gen, device, shard) if swiglu else None
    rw = torch.rand(T, K, generator=gen).to(device) if swiglu else None
    pairs, table, _, _, _ = tg.expert_tiles(ids, E, tq)
    got = torch.zeros(T, K, n_out, device=device)
    tag = f"cuda mma {type_name(qtype)} E={E} {n_out}x{n_in} T={T} K={K} swiglu={swiglu} {shard} tq={tq}"
    assert cuda_experts.many(w, wu, x.half(), per_slot, pairs, table, rw, got, swiglu, 10.0), \
        tag + ": not taken by the CUDA C kernel"
    g = exact_linear(w, x, ids)
    if not swiglu:
        return check(tag, got, g, H16_TOL)
    u = exact_linear(wu, x, ids)
    want = numerics.swiglu_clamped(g, u, 10.0) * rw[..., None]
    want[ids < 0] = 0.0
    lim = H16_TOL * 11 * (g.abs().max() + u.abs().max()).item()
    err = (got - want).abs().max().item()
    if not err <= lim:
        raise AssertionError(f"{tag}: abs error {err:.3g} > {lim:.3g}")
    return err / max(want.abs().max().item(), 1e-30)


def case_gemm_linear(device, gen, qtype, n_out, n_in, T, groups=1, cfg=None, shard=False, h16=None):
    """The many-token launch (triton_gemm.linear), dense or grouped, whole or a column shard.
    h16 (None: the default rule): the float16 path, checked against exact_linear with H16_TOL
    instead of the quantised twin with TOL."""
    from ds4tp.kernels import triton_gemm as tg
    if shard:
        w = column_shard(rand_weight(qtype, (n_out, 2 * n_in), gen, device), 0, 2)
    else:
        w = rand_weight(qtype, (n_out, n_in), gen, device)
    c = tg.GemmCfg(**cfg) if cfg is not None else None
    f16 = tg.h16_path(w, T, h16)
    split = tg.f16_split_path(w, groups, c, h16, torch.device(device))
    tol = H16_TOL if f16 else F16_SPLIT_TOL if split else TOL
    tag = f"gemm {type_name(qtype)} {n_out}x{n_in} groups={groups} T={T} {cfg} h16={f16}"
    if groups == 1:
        x = rand_act((T, n_in), gen, device)
        want = exact_linear(w, x) if f16 else ops.linear_torch(w, x)
        return check(tag, tg.linear(w, x, cfg=c, h16=h16), want, tol)
    rows = n_out // groups
    x = rand_act((T, groups, n_in), gen, device)
    got = tg.linear(w, x.reshape(T, -1), groups=groups, cfg=c, h16=h16).view(T, groups, rows)
    want = exact_linear(w, x) if f16 else ops.grouped_linear_torch(w, x)
    return check(tag, got, want, tol)


def case_gemm_experts(device, gen, qtype, E, n_out, n_in, T, K, per_slot, swiglu=False, cfg=None,
                      shard="", skip=0.15, h16=None):
    """Routed experts through the many-token launch: pairs sorted by expert, tiles of one expert
    (h16 as in case_gemm_linear)."""
    from ds4tp.kernels import triton_gemm as tg
    c = tg.GemmCfg(**cfg) if cfg is not None else None
    w = expert_weight(qtype, E, n_out, n_in, gen, device, shard)
    ids = rand_ids(T, K, E, gen, device, skip=skip)
    f16 = tg.h16_path(w, T * K, h16)
    tol = H16_TOL if f16 else TOL
    tag = (f"gemm experts {type_name(qtype)} E={E} {n_out}x{n_in} T={T} K={K} swiglu={swiglu} "
           f"{cfg} {shard} h16={f16}")
    if not swiglu:
        x = rand_act((T, K, n_in) if per_slot else (T, n_in), gen, device)
        got = tg.experts(w, None, x, ids, None, tg.MODE_SLOTS, cfg=c, h16=h16)
        assert torch.all(got[ids < 0] == 0), tag + ": skipped slots are not zero"
        want = exact_linear(w, x, ids) if f16 else ops.expert_linear_torch(w, x, ids)
        return check(tag, got, want, tol)
    wu = expert_weight(qtype, E, n_out, n_in, gen, device, shard)
    x = rand_act((T, n_in), gen, device) * 20.0
    rw = torch.rand(T, K, generator=gen).to(device)
    if f16:
        g, u = exact_linear(w, x, ids), exact_linear(wu, x, ids)
    else:
        g, u = ops.expert_linear_torch(w, x, ids), ops.expert_linear_torch(wu, x, ids)
    want = numerics.swiglu_clamped(g, u, 10.0) * rw[..., None]
    got = tg.experts(w, wu, x, ids, rw, tg.MODE_SWIGLU, 10.0, cfg=c, h16=h16)
    lim = tol * 11 * (g.abs().max() + u.abs().max()).item()
    err = (got - want).abs().max().item()
    if not err <= lim:
        raise AssertionError(f"{tag}: abs error {err:.3g} > {lim:.3g}")
    assert torch.all(got[ids < 0] == 0), tag + ": skipped slots are not zero"
    return err / max(want.abs().max().item(), 1e-30)


def case_hc_post(device, gen, T, E):
    """The one-launch stream update (prefill) against model.hc_post_torch."""
    from ds4tp.kernels import triton_hc
    from ds4tp.model import hc_post_torch
    r = lambda *sh: torch.randn(*sh, generator=gen).to(device)   # noqa: E731
    args = (r(T, E), r(T, 4, E), r(T, 4), r(T, 4, 4))
    return check(f"hc_post T={T} E={E}", triton_hc.hc_post(*args), hc_post_torch.eager(*args), 1e-6)


def case_rms_scale(device, gen, shape):
    """The one-launch RMS scale (prefill) against numerics.rms_scale_torch."""
    from ds4tp.kernels import triton_norm
    x = torch.randn(*shape, generator=gen).to(device) * 3.0
    x.view(-1, shape[-1])[0] = 0.0                          # an all-zero row: 1/sqrt(eps)
    return check(f"rms_scale {shape}", triton_norm.rms_scale(x, 1e-6), numerics.rms_scale_torch(x), 2e-7)


def case_rms_norm(device, gen, shape, weighted, lead=0):
    """The one-launch RMS norm (prefill) against numerics.rms_norm's twin: the same float32
    products, the scale's float64 sum in another order. lead: rows sliced out of wider ones."""
    from ds4tp.config import RMS_EPS
    from ds4tp.kernels import triton_norm
    n = shape[-1]
    x = torch.randn(*shape[:-1], lead + n, generator=gen) * 3.0
    x.view(-1, lead + n)[0] = 0.0                            # an all-zero row
    x = x.to(device)[..., lead:]
    w = (torch.rand(n, generator=gen) + 0.5).to(device) if weighted else None
    got = triton_norm.rms_norm(x, w, RMS_EPS)
    want = numerics.rms_norm.eager(x, w)
    assert got.shape == want.shape and got.is_contiguous()
    return check(f"rms_norm {shape} w={weighted} lead={lead}", got, want, 2e-7)


def C(**kw):
    """A launch config (ds4tp.kernels.triton_matvec.Cfg fields), kept as a dict until used."""
    return kw


def case_hc_combine(device, gen, T, E, iters=20):
    """The one-launch hyper-connection mixer (Sinkhorn) against ds4tp.model.hc_combine_torch,
    with mixer logits spread wide enough that the softmax and the normalisations all matter."""
    from ds4tp.config import HC_EPS, RMS_EPS
    from ds4tp.kernels import triton_hc
    from ds4tp.model import hc_combine_torch
    z = (torch.randn(T, 24, generator=gen) * 3).to(device)
    scale = (torch.rand(3, generator=gen) + 0.2).to(device)
    base = torch.randn(24, generator=gen).to(device)
    hc = torch.randn(T, 4, E, generator=gen).to(device)
    norm = (torch.rand(E, generator=gen) + 0.5).to(device)
    got = triton_hc.hc_combine(z, scale, base, hc, norm, 4, iters, HC_EPS, RMS_EPS)
    want = hc_combine_torch.eager(z, scale, base, hc, norm, 4, iters)
    return max(check(f"hc_combine {n} T={T} E={E}", a, b, 1e-5)
               for n, a, b in zip(("x", "post", "M"), got, want))


def case_hc_logits(device, gen, n, E, N, split=None):
    """The one-launch mixer logits (RMS scale of the flat streams, F16 matvec) against
    model.hc_logits_torch."""
    from ds4tp.config import F16, RMS_EPS
    from ds4tp.kernels import triton_hc
    from ds4tp.model import hc_logits_torch
    hc = (torch.randn(1, n, E, generator=gen) * 3).to(device)
    fn = rand_weight(F16, (N, n * E), gen, device)
    got = triton_hc.hc_logits(hc, fn.raw, RMS_EPS, **({} if split is None else {"split": split}))
    return check(f"hc_logits n={n} E={E} N={N}", got, hc_logits_torch(hc, fn), 1e-5)


def _hc_mixer(gen, E, device):
    """A sublayer's HC mixer at width E (fn F16 [24, 4E], scale [3], base [24], norm [E]), the
    weight scaled so that the logits (and so Sinkhorn) stay in a range where every step matters."""
    from ds4tp.config import F16
    fn = QTensor(F16, (24, 4 * E), (torch.randn(24, 4 * E, generator=gen) * 3 / (4 * E) ** 0.5)
                 .half().view(torch.uint8).reshape(24, 8 * E).to(device))
    scale = (torch.rand(3, generator=gen) + 0.2).to(device)
    base = torch.randn(24, generator=gen).to(device)
    norm = (torch.rand(E, generator=gen) + 0.5).to(device)
    return fn, scale, base, norm


def case_hc_step(device, gen, E, be=None, mix=True):
    """One decode token's stream update and next mixer in one launch (triton_hc.hc_step) against
    its twins in sequence: model.hc_post_torch, hc_logits_torch, hc_combine_torch. The mixer
    weight is scaled so that the logits (and so Sinkhorn) stay in a range where every step
    matters. mix=False: the launch leaves post and M to triton_hc.hc_mix (checked against
    model.hc_split) and returns the logits z (against hc_logits_torch)."""
    from ds4tp.config import HC_EPS, RMS_EPS
    from ds4tp.kernels import triton_hc
    from ds4tp.model import hc_combine_torch, hc_logits_torch, hc_post_torch
    r = lambda *sh: torch.randn(*sh, generator=gen).to(device)   # noqa: E731
    f, hc, post, m = r(1, E), r(1, 4, E), r(1, 4), torch.rand(1, 4, 4, generator=gen).to(device)
    fn, scale, base, norm = _hc_mixer(gen, E, device)
    got = triton_hc.hc_step(f, hc, post, m, fn.raw, scale, base, norm, 4, 20, HC_EPS, RMS_EPS,
                            mix=mix, **({} if be is None else {"be": be}))
    h2 = hc_post_torch.eager(f, hc, post, m)
    z = hc_logits_torch(h2, fn)
    want = (h2, *hc_combine_torch.eager(z, scale, base, h2, norm, 4, 20))
    if not mix:     # (streams, x, z), then post and M from z in their own launch
        from ds4tp.model import hc_split
        got = (*got[:2], *triton_hc.hc_mix(got[2], scale, base, 4, 20, HC_EPS))
        _, post2, m2 = hc_split(z, scale, base, 4, 20)
        check(f"hc_mix post E={E}", got[2], post2, 1e-5)
        check(f"hc_mix M E={E}", got[3], m2, 1e-5)
    return max(check(f"hc_step {n} E={E}", a, b, 1e-5)
               for n, a, b in zip(("streams", "x", "post", "M"), got, want))


def case_hc_step_row(device, gen, E, be=None):
    """hc_step with f read from a float16 table's row (f_row: the embedding before layer 0, on
    empty streams as the decode graphs' first update; mix=False as they run it) against the same
    launch on that row converted by torch, bit for bit (the conversion is exact), and
    case_hc_step's twins on it. A bad row index is refused, naming what it must be."""
    from ds4tp.config import HC_EPS, RMS_EPS
    from ds4tp.kernels import triton_hc
    from ds4tp.model import hc_combine_torch, hc_logits_torch, hc_post_torch
    table = (torch.randn(37, E, generator=gen) * 2).half().to(device)
    tok = torch.tensor([29], dtype=torch.long).to(device)
    hc, post, m = (torch.zeros(1, 4, E).to(device), torch.ones(1, 4).to(device),
                   torch.zeros(1, 4, 4).to(device))
    fn, scale, base, norm = _hc_mixer(gen, E, device)
    args = (hc, post, m, fn.raw, scale, base, norm, 4, 20, HC_EPS, RMS_EPS)
    kw = dict(mix=False, **({} if be is None else {"be": be}))
    got = triton_hc.hc_step(table, *args, f_row=tok, **kw)
    ref = triton_hc.hc_step(table[tok].float(), *args, **kw)
    for a, b in zip(got, ref):
        assert torch.equal(a, b), "hc_step from a table's row differs from it on the row itself"
    for bad in (tok.int(), torch.tensor([1, 2]).to(device)):
        try:
            triton_hc.hc_step(table, *args, f_row=bad, **kw)
            raise AssertionError(f"hc_step took a bad row index {bad}")
        except ValueError as e:
            assert "int64 index [1]" in str(e), e
    h2 = hc_post_torch.eager(table[tok].float(), hc, post, m)
    z = hc_logits_torch(h2, fn)
    want = (h2, hc_combine_torch.eager(z, scale, base, h2, norm, 4, 20)[0], z)
    return max(check(f"hc_step row {n} E={E}", a, b, 1e-5)
               for n, a, b in zip(("streams", "x", "z"), got, want))


def case_hc_step_head(device, gen, E, be=None, peer=False):
    """The last stream update with the output head's mix (hc_step of Weights.head_mixer: n
    logits, x only) against its twins in sequence: model.hc_post_torch, then output_head's mix
    (hc_logits_torch, the sigmoid pre weights, the RMS norm of their sum). peer: with the
    all-reduce inside, on a rank paired with itself (f + f), against the twins on 2f. Also that
    the launch refuses Sinkhorn (mix) for n logits."""
    from ds4tp.config import F16, HC_EPS, RMS_EPS
    from ds4tp.kernels import triton_hc
    from ds4tp.model import hc_logits_torch, hc_post_torch
    from ds4tp.numerics import rms_norm
    r = lambda *sh: torch.randn(*sh, generator=gen).to(device)   # noqa: E731
    f, hc, post, m = r(1, E), r(1, 4, E), r(1, 4), torch.rand(1, 4, 4, generator=gen).to(device)
    fn = QTensor(F16, (4, 4 * E), (torch.randn(4, 4 * E, generator=gen) * 3 / (4 * E) ** 0.5)
                 .half().view(torch.uint8).reshape(4, 8 * E).to(device))
    scale = (torch.rand(1, generator=gen) + 0.2).to(device)
    base, norm = r(4), (torch.rand(E, generator=gen) + 0.5).to(device)
    kw = {} if be is None else {"be": be}
    if peer:
        from ds4tp.kernels.cuda_allreduce import PeerAllReduce
        kw["peer"] = PeerAllReduce.loopback(torch.device(device)).fused(f)
    got = triton_hc.hc_step(f, hc, post, m, fn.raw, scale, base, norm, 4, 20, HC_EPS, RMS_EPS,
                            mix=False, **kw)
    h2 = hc_post_torch.eager(2 * f if peer else f, hc, post, m)
    z = hc_logits_torch(h2, fn)
    hw = torch.sigmoid(z * scale[0] + base) + HC_EPS
    want = (h2, rms_norm((hw[:, :, None] * h2).sum(1), norm), z)
    try:
        triton_hc.hc_step(f, hc, post, m, fn.raw, scale, base, norm, 4, 20, HC_EPS, RMS_EPS)
        raise AssertionError("hc_step ran Sinkhorn on the head's 4 logits")
    except ValueError as e:
        assert "x only" in str(e), e
    return max(check(f"hc_step head {n} E={E}", a, b, 1e-5)
               for n, a, b in zip(("streams", "x", "z"), got, want))


def case_hc_step_peer(device, gen, E, be=None, mix=False):
    """The HC step with the all-reduce inside (hc_step's peer) on a rank paired with itself
    (cuda_allreduce.PeerAllReduce.loopback: the sum is f + f = 2f exactly), three calls in a row
    (both slots, the counter): against the plain launch on 2f, whose own twins case_hc_step
    checks, and the counter at 3. The two ranks' case is tests/test_tp.py (two GPUs)."""
    from ds4tp.config import F16, HC_EPS, RMS_EPS
    from ds4tp.kernels import triton_hc
    from ds4tp.kernels.cuda_allreduce import PeerAllReduce
    lb = PeerAllReduce.loopback(torch.device(device))
    r = lambda *sh: torch.randn(*sh, generator=gen).to(device)   # noqa: E731
    fn = QTensor(F16, (24, 4 * E), (torch.randn(24, 4 * E, generator=gen) * 3 / (4 * E) ** 0.5)
                 .half().view(torch.uint8).reshape(24, 8 * E).to(device))
    scale = (torch.rand(3, generator=gen) + 0.2).to(device)
    base, norm = r(24), (torch.rand(E, generator=gen) + 0.5).to(device)
    kw = dict(mix=mix, **({} if be is None else {"be": be}))
    worst, same = 0.0, True
    for k in range(3):
        f, hc, post, m = r(1, E), r(1, 4, E), r(1, 4), torch.rand(1, 4, 4, generator=gen).to(device)
        got = triton_hc.hc_step(f, hc, post, m, fn.raw, scale, base, norm, 4, 20, HC_EPS, RMS_EPS,
                                peer=lb.fused(f), **kw)
        want = triton_hc.hc_step(2 * f, hc, post, m, fn.raw, scale, base, norm, 4, 20, HC_EPS,
                                 RMS_EPS, **kw)
        for n, a, b in zip(("streams", "x", "post/z", "M"), got, want):
            worst = max(worst, check(f"hc_step peer loopback {n} E={E} call {k}", a, b, 1e-6))
            same = same and torch.equal(a, b)
    assert int(lb.ctr.item()) == 3, f"the all-reduce counter reads {int(lb.ctr.item())} after 3 calls"
    return f"{'bit-identical' if same else f'rel err {worst:.2e}'} to the plain launch on 2f"


def case_linear_normed(device, gen, n_out, n_in, cfg=None):
    """One token's Q8_0 matvec of rms_norm(x, w) with the norm in the kernel's prologue, against
    ops.linear_normed_torch."""
    from ds4tp.kernels import triton_matvec as tm
    w = rand_weight(Q8_0, (n_out, n_in), gen, device)
    x = rand_act((1, n_in), gen, device)
    norm = (torch.rand(n_in, generator=gen) + 0.5).to(device)
    got = tm.linear_normed(w, x, norm, RMS_EPS, _cfg(cfg))
    return check(f"linear_normed {n_out}x{n_in}", got, ops.linear_normed_torch(w, x, norm))


def case_route(device, gen, ne, k, hashed, bias, T=1):
    """T tokens' expert selection in one launch against model.route_select (with the hash
    table lookup): equal ids (ties go to the lower id), weights to float rounding. The logits
    hold exact ties and values beyond both softplus branches (+-20)."""
    from ds4tp.config import EXPERT_WEIGHT_SCALE, ROUTER_WEIGHT_FLOOR
    from ds4tp.kernels import triton_route
    from ds4tp.model import route_select
    z = torch.randn(T, ne, generator=gen) * 4
    z[:, 5] = z[:, 3] = z[:, 9] = z.max() + 1.0              # a three-way tie at the top
    z[:, 1], z[:, 2] = 25.0, -30.0
    b = (torch.randn(ne, generator=gen) * 0.1).to(device) if bias else None
    tid = torch.randint(0, ne, (50, k), generator=gen).to(device) if hashed else None
    tok = torch.tensor([37] + [int(v) for v in torch.randint(0, 50, (T - 1,), generator=gen)],
                       device=device)
    if hashed:
        tid[37, 0] = 2                                          # a chosen expert below -20
    z = z.to(device)
    want_ids, want_w = route_select.eager(z, b, tid[tok] if hashed else None, k)
    ids, w = triton_route.route(z, b, tid, tok, k, ROUTER_WEIGHT_FLOOR, EXPERT_WEIGHT_SCALE)
    assert torch.equal(ids.cpu(), want_ids.cpu()), f"route ids {ids.tolist()} != {want_ids.tolist()}"
    return check(f"route T={T} ne={ne} k={k} hash={hashed} bias={bias}", w, want_w, 1e-6)


def case_pick(device, gen, V, bv, kind="", nb=8):
    """The greedy pick in one launch (triton_pick.pick) against sampling.greedy_pick_torch: the
    same token (a max, then the lowest id: exact), the logprob and the log-norm to float64
    rounding; both again without a bias table. kind "ties": the maximum held by several ids
    across programs; "banned": a bias of -inf on the best ids, and one on every id."""
    from ds4tp.kernels import triton_pick
    from ds4tp.worker.sampling import greedy_pick_torch
    x = torch.randn(V, generator=gen) * 3
    ids = torch.randint(0, V, (nb,), generator=gen)
    vals = torch.randn(nb, generator=gen).double() * 2
    if nb:
        ids[-1], vals[-1] = 0, 0.0                         # sampling.bias_table's padding
    if kind == "ties":
        x = torch.round(x)
        x[[V - 1, min(bv + 1, V - 2), 3]] = x.max() + 1.0    # the lower id wins
        vals.zero_()
    if kind == "banned":
        best = torch.argsort(-x)[:nb]
        ids, vals = best, torch.full((nb,), float("-inf"), dtype=torch.float64)
    cases = [(ids, vals), (ids[:0], vals[:0])]
    if kind == "banned":                                   # every id banned: the first one
        cases.append((torch.arange(V), torch.full((V,), float("-inf"), dtype=torch.float64)))
    for bi, bvals in cases:
        raw = x.double()
        want = greedy_pick_torch(raw, raw.index_add(0, bi, bvals))
        got, tok, norm = triton_pick.pick(x.to(device), bi.to(device), bvals.to(device), bv=bv)
        assert int(got[0]) == int(want[0]) == int(tok[0]), f"pick V={V} {kind}: token {got.tolist()} != {want.tolist()}"
        for what, a, b in (("logprob", got[1].cpu(), want[1]), ("norm", norm[0].cpu(), torch.logsumexp(raw, 0))):
            assert abs(float(a) - float(b)) <= 1e-13 * max(1.0, abs(float(b))), \
                f"pick V={V} {kind}: {what} {float(a)!r} != {float(b)!r}"
    return 0.0


def _rope_tables(n_rot, P, device, compressed=False):
    cos, sin = numerics.rope_cos_sin(torch.arange(P), n_rot, compressed)
    return cos.contiguous().to(device), sin.contiguous().to(device)


def case_kv_store(device, gen, D, n_rot, n_swa, p):
    """The decode KV-row kernel (norm, RoPE, FP8/F16, ring write) against
    decode_graph.store_kv_row_torch: the non-RoPE dims bit-identical (same operations), the
    RoPE dims within one F16 step (the rotation may contract into FMAs)."""
    from ds4tp.config import RMS_EPS, Shape
    from ds4tp.decode_graph import store_kv_row_torch
    from ds4tp.kernels import triton_attn
    s = Shape(n_swa=n_swa, head_dim=D, n_rot=n_rot)
    x = torch.randn(1, D, generator=gen) * 3
    x[0, :64] *= 1e-6                                        # an FP8 block under the amax floor
    x[0, 64:128] = torch.randn(64, generator=gen) * 1e3      # and one with a large scale
    w = torch.rand(D, generator=gen) + 0.5
    cos, sin = _rope_tables(n_rot, p + 1, device)
    pos = torch.tensor([p], device=device)
    ring0 = torch.randn(n_swa, D, generator=gen)
    rpos0 = torch.arange(n_swa, dtype=torch.long) - 5
    want_ring, want_pos = ring0.clone().to(device), rpos0.clone().to(device)
    store_kv_row_torch(x.to(device), w.to(device), cos, sin, pos, want_ring, want_pos, s)
    ring, rp = ring0.clone().to(device), rpos0.clone().to(device)
    triton_attn.kv_store(x.to(device), w.to(device), cos, sin, pos, ring, rp, RMS_EPS)
    assert torch.equal(rp, want_pos), "ring positions differ"
    nope = D - n_rot
    assert torch.equal(ring[:, :nope], want_ring[:, :nope]), \
        f"kv_store: FP8 dims differ at {torch.nonzero(ring[:, :nope] != want_ring[:, :nope])[:4].tolist()}"
    return check(f"kv_store D={D} pos={p}", ring, want_ring, 1e-3)


def case_kv_rows(device, gen, T, D, n_rot, p0, lead=0):
    """A prefill's raw KV rows in one launch (norm, RoPE, FP8/F16) against model.kv_rows'
    twin (kv_cache_row of rms_norm): the non-RoPE dims bit-identical, the RoPE dims within one
    F16 step. lead: the rows are a column slice of a wider projection (as after q_a_kv)."""
    from ds4tp.config import Shape
    from ds4tp.kernels import triton_attn
    from ds4tp.model import kv_rows
    s = Shape(head_dim=D, n_rot=n_rot)
    x = torch.randn(T, lead + D, generator=gen) * 3
    x[0, lead:lead + 64] *= 1e-6                             # an FP8 block under the amax floor
    x[-1, lead + 64:lead + 128] = torch.randn(64, generator=gen) * 1e3   # one with a large scale
    x = x.to(device)[:, lead:]
    w = (torch.rand(D, generator=gen) + 0.5).to(device)
    cos, sin = numerics.rope_cos_sin(torch.arange(p0, p0 + T, device=device), n_rot, compressed=False)
    want = kv_rows(x, w, cos, sin, s, trace={})                 # traced: the twin
    got = triton_attn.kv_rows(x, w, cos.contiguous(), sin.contiguous(), RMS_EPS)
    nope = D - n_rot
    assert torch.equal(got[:, :nope].cpu(), want[:, :nope].cpu()), \
        f"kv_rows: FP8 dims differ at {torch.nonzero(got[:, :nope] != want[:, :nope])[:4].tolist()}"
    return check(f"kv_rows T={T} D={D} p0={p0}", got, want, 1e-3)


def case_compressor_step(device, gen, ratio, W, E, p):
    """The decode compressor step (two F16 projections, bias, frontier write) against
    decode_graph.compressor_step_torch."""
    from ds4tp.config import F16
    from ds4tp.decode_graph import compressor_step_torch
    from ds4tp.kernels import triton_attn
    from ds4tp.model import CompressorWeights
    cw = CompressorWeights(ratio, torch.randn(ratio, W, generator=gen).to(device),
                           rand_weight(F16, (W, E), gen, device), rand_weight(F16, (W, E), gen, device),
                           torch.ones(W // 2, device=device))
    x = (torch.randn(1, E, generator=gen) * 2).to(device)
    rows = 8 if ratio == 4 else ratio
    pos = torch.tensor([p], device=device)
    f0 = (torch.randn(rows, W, generator=gen).to(device), torch.randn(rows, W, generator=gen).to(device))
    want = (f0[0].clone(), f0[1].clone())
    compressor_step_torch(cw, x, pos, *want)
    got = (f0[0].clone(), f0[1].clone())
    triton_attn.compressor_step(x, cw.kv.raw, cw.gate.raw, cw.ape, pos, *got)
    return max(check(f"compressor_step r={ratio} W={W} E={E} pos={p} {n}", a, b)
               for n, a, b in zip(("kv", "gate"), got, want))


def case_compressor_pair(device, gen, WA, WB, E, p, launch=None):
    """A ratio-4 layer's two compressor steps in one launch (triton_attn.compressor_pair) against
    decode_graph.compressor_step_torch of each; both frontiers start random (rows other than
    the position's slot must keep their values)."""
    from ds4tp.config import F16
    from ds4tp.decode_graph import compressor_step_torch
    from ds4tp.kernels import triton_attn
    from ds4tp.model import CompressorWeights
    cws = [CompressorWeights(4, torch.randn(4, W, generator=gen).to(device),
                             rand_weight(F16, (W, E), gen, device), rand_weight(F16, (W, E), gen, device),
                             torch.ones(W // 2, device=device)) for W in (WA, WB)]
    x = (torch.randn(1, E, generator=gen) * 2).to(device)
    pos = torch.tensor([p], device=device)
    f0 = [(torch.randn(8, W, generator=gen).to(device), torch.randn(8, W, generator=gen).to(device))
          for W in (WA, WB)]
    want = [(a.clone(), b.clone()) for a, b in f0]
    for cw, w in zip(cws, want):
        compressor_step_torch(cw, x, pos, *w)
    got = [(a.clone(), b.clone()) for a, b in f0]
    a, b = ((cw.kv.raw, cw.gate.raw, cw.ape, *g) for cw, g in zip(cws, got))
    triton_attn.compressor_pair(x, a, b, pos, launch=launch)
    return max(check(f"compressor_pair WA={WA} WB={WB} E={E} pos={p} launch={launch} {j}{n}", u, v)
               for j, (gg, ww) in enumerate(zip(got, want))
               for n, u, v in zip(("kv", "gate"), gg, ww))


def _emit_inputs(gen, device, HD, p, first):
    """A ratio-4 frontier pair [8, 2HD] (one channel far below the others; first: the previous
    window empty, gates at NEG_INF, as at position 3), a cache and a norm weight."""
    from ds4tp.config import NEG_INF
    fkv = torch.randn(8, 2 * HD, generator=gen) * 2
    fsc = torch.randn(8, 2 * HD, generator=gen) * 3
    fkv[:, 5] *= 1e-7
    if first:
        fkv[:4], fsc[:4] = 0.0, NEG_INF
    cache0 = torch.randn((p + 1) // 4 + 3, HD, generator=gen)
    norm = (torch.rand(HD, generator=gen) + 0.5).to(device)
    return [t.to(device) for t in (fkv, fsc, cache0)], norm


def _emit_check(tag, got, want, p, index):
    """An emission against its twin: the frontier shift and the other cache rows exact; in the
    emitted row at most two elements across an FP8/FP4 rounding boundary (within one grid step:
    1/7 of the row's largest for FP8, 2/3 for FP4), every other within one F16 step."""
    got, want = [t.cpu() for t in got], [t.cpu() for t in want]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"{tag}: frontier shift differs"
    row = (p + 1) // 4 - 1
    others = torch.arange(got[2].shape[0]) != row
    assert torch.equal(got[2][others], want[2][others]), f"{tag}: cache rows other than the emitted one changed"
    g, w = got[2][row], want[2][row]
    off = (g - w).abs() > 1e-3 * w.abs() + 1e-30
    big = (g - w).abs().max().item()
    assert int(off.sum()) <= 2 and big <= (0.67 if index else 0.143) * w.abs().max().item(), \
        f"{tag}: {int(off.sum())} elements off (largest {big:.3g}) at {torch.nonzero(off)[:4].tolist()}"
    return int(off.sum())


def case_compressor_emit(device, gen, HD, n_rot, index, p, first=False):
    """A ratio-4 compressor's emission (pooling, norm, RoPE, FP8 or Hadamard + FP4, F16, cache
    write, window shift) against decode_graph.compressor_emit_torch (_emit_check: the softmax's
    exp and sums run in another order, which can move a value across an FP8/FP4 rounding
    boundary)."""
    from ds4tp.config import Shape
    from ds4tp.decode_graph import compressor_emit_torch
    from ds4tp.kernels import triton_attn
    from ds4tp.model import CompressorWeights
    assert p % 4 == 3
    s = Shape(head_dim=HD if not index else 512, indexer_head_dim=HD if index else 128, n_rot=n_rot)
    t0, norm = _emit_inputs(gen, device, HD, p, first)
    cw = CompressorWeights(4, None, None, None, norm)
    cos, sin = _rope_tables(n_rot, p + 1, device, compressed=True)
    pos = torch.tensor([p], device=device)
    want = [t.clone() for t in t0]
    compressor_emit_torch(cw, *want[:2], want[2], pos, cos, sin, index, s)
    got = [t.clone() for t in t0]
    triton_attn.compressor_emit(*got[:2], cw.norm, cos, sin, pos, got[2], index, RMS_EPS)
    return f"{_emit_check('compressor_emit', got, want, p, index)} grid flips"


def case_compressor_emit_pair(device, gen, HDA, HDB, n_rot, p, first=False):
    """A ratio-4 layer's two emissions in one launch (triton_attn.compressor_emit_pair: a kv row
    of HDA, an index row of HDB) against decode_graph.compressor_emit_torch of each
    (_emit_check), and whether they are the bits of two compressor_emit launches."""
    from ds4tp.config import Shape
    from ds4tp.decode_graph import compressor_emit_torch
    from ds4tp.kernels import triton_attn
    from ds4tp.model import CompressorWeights
    assert p % 4 == 3
    s = Shape(head_dim=HDA, indexer_head_dim=HDB, n_rot=n_rot)
    jobs = [(*_emit_inputs(gen, device, hd, p, first), idx) for hd, idx in ((HDA, False), (HDB, True))]
    cos, sin = _rope_tables(n_rot, p + 1, device, compressed=True)
    pos = torch.tensor([p], device=device)
    got = [[t.clone() for t in t0] for t0, _, _ in jobs]
    a, b = ((g[0], g[1], norm, g[2], idx) for g, (_, norm, idx) in zip(got, jobs))
    triton_attn.compressor_emit_pair(a, b, cos, sin, pos, RMS_EPS)
    flips, same = 0, True
    for g, (t0, norm, idx) in zip(got, jobs):
        want = [t.clone() for t in t0]
        compressor_emit_torch(CompressorWeights(4, None, None, None, norm), *want[:2], want[2], pos,
                              cos, sin, idx, s)
        flips += _emit_check(f"compressor_emit_pair index={idx}", g, want, p, idx)
        one = [t.clone() for t in t0]
        triton_attn.compressor_emit(*one[:2], norm, cos, sin, pos, one[2], idx, RMS_EPS)
        same = same and all(torch.equal(u, v) for u, v in zip(g, one))
    return f"{flips} grid flips, {'the bits' if same else 'not the bits'} of two launches"


def case_compressor_rows(device, gen, ratio, HD, n_rot, index, base, N, c0, n):
    """A prefill's compressed rows c0.. in one launch (pooling, norm, RoPE, FP8 or Hadamard +
    FP4, F16) against model.compressed_rows' twin, from projections at positions base..base+N-1.
    The softmax's sums run in another order: per row, at most two elements may cross an FP8/FP4
    rounding boundary (within one grid step), every other element within one F16 step."""
    from ds4tp.config import Shape
    from ds4tp.kernels import triton_attn
    from ds4tp.model import CompressorWeights, compressed_rows
    s = Shape(head_dim=HD if not index else 512, indexer_head_dim=HD if index else 128, n_rot=n_rot)
    W = 2 * HD if ratio == 4 else HD
    cw = CompressorWeights(ratio, None, None, None, (torch.rand(HD, generator=gen) + 0.5).to(device))
    kv = torch.randn(N, W, generator=gen) * 2
    sc = torch.randn(N, W, generator=gen) * 3
    kv[:, 5] *= 1e-7                                         # one channel far below the others
    kv, sc = kv.to(device), sc.to(device)
    cs = range(c0, c0 + n)
    want, _ = compressed_rows(cw, kv, sc, base, cs, HD, index, s, trace={})      # traced: the twin
    c = torch.arange(c0, c0 + n, device=device)
    cos, sin = numerics.rope_cos_sin(c * ratio, n_rot, compressed=True)
    got = triton_attn.compressor_rows(kv, sc, base, c0, n, ratio, cw.norm, cos.contiguous(),
                                      sin.contiguous(), index, RMS_EPS)
    got, want = got.cpu(), want.cpu()
    off = (got - want).abs() > 1e-3 * want.abs() + 1e-30
    step = (0.67 if index else 0.143) * want.abs().amax(1, keepdim=True)
    assert int(off.sum(1).max()) <= 2 and bool(((got - want).abs() <= step).all()), \
        f"compressor_rows: {int(off.sum())} elements off at {torch.nonzero(off)[:4].tolist()}"
    return f"{int(off.sum())} grid flips in {n} rows"


def _share(t, world, r, halves):
    """Rank r's channels of a compressor tensor [..., halves * C]: the same range of each half
    (shard.plan's split by channel)."""
    v = t.reshape(*t.shape[:-1], halves, -1)
    c = v.shape[-1] // world
    return v[..., r * c:(r + 1) * c].reshape(*t.shape[:-1], -1).contiguous()


def _grid_close(name, got, want, index):
    """Rows as compressor_emit/compressor_rows' cases allow: per row at most two elements across
    an FP8/FP4 rounding boundary (within one grid step), the rest within one F16 step."""
    off = (got - want).abs() > 1e-3 * want.abs() + 1e-30
    step = (0.67 if index else 0.143) * want.abs().amax(-1, keepdim=True)
    assert int(off.sum(-1).max()) <= 2 and bool(((got - want).abs() <= step).all()), \
        f"{name}: {int(off.sum())} elements off at {torch.nonzero(off)[:4].tolist()}"
    return int(off.sum())


def case_compressor_split(device, gen, ratio, HD, n_rot, index, p, world=2):
    """A compressor split by channel over `world` ranks (shard.plan): every rank pools its
    channels (decode: triton_attn.compressor_pool from its frontier share; prefill:
    compressor_rows with pool_only), the shares are concatenated as the all-gather does, and
    compressor_finish makes the rows, against the unsplit torch twins (compressor_emit_torch,
    model.compressed_rows). The pooled channels match the twins' pooling to float rounding;
    the finished rows within compressor_emit's allowance. Decode ratio 4 only (ratio 128 decodes
    through the twin); prefill any ratio."""
    from ds4tp.config import Shape
    from ds4tp.decode_graph import compressor_emit_torch, compressor_pool_torch
    from ds4tp.kernels import triton_attn
    from ds4tp.model import CompressorWeights, compressed_rows, pool_rows_torch
    s = Shape(head_dim=HD if not index else 512, indexer_head_dim=HD if index else 128, n_rot=n_rot)
    halves = 2 if ratio == 4 else 1
    cw = CompressorWeights(ratio, None, None, None, (torch.rand(HD, generator=gen) + 0.5).to(device))
    flips = 0
    if ratio == 4:      # decode: one emission at p
        assert p % 4 == 3
        fkv = (torch.randn(8, 2 * HD, generator=gen) * 2).to(device)
        fsc = (torch.randn(8, 2 * HD, generator=gen) * 3).to(device)
        cap = (p + 1) // 4 + 3
        cache0 = torch.randn(cap, HD, generator=gen).to(device)
        cos, sin = _rope_tables(n_rot, p + 1, device, compressed=True)
        pos = torch.tensor([p], device=device)
        want = [t.clone() for t in (fkv, fsc, cache0)]
        compressor_emit_torch(cw, *want[:2], want[2], pos, cos, sin, index, s)
        shares = [[_share(t, world, r, 2) for t in (fkv, fsc)] for r in range(world)]
        pooled = [triton_attn.compressor_pool(kv, sc, pos) for kv, sc in shares]
        for r, (kv, sc) in enumerate(shares):   # the pooling alone, and the window shifted
            want_kv, want_sc = _share(fkv, world, r, 2), _share(fsc, world, r, 2)
            twin = compressor_pool_torch(cw, want_kv, want_sc, pos)
            check(f"compressor_pool rank {r}", pooled[r], twin, 1e-5)
            assert torch.equal(kv, want_kv) and torch.equal(sc, want_sc), "frontier shift differs"
        got = cache0.clone()
        triton_attn.compressor_finish(torch.cat(pooled, -1), cw.norm, cos, sin, index, RMS_EPS,
                                      pos=pos, cache=got, ratio=4)
        row = (p + 1) // 4 - 1
        others = torch.arange(cap, device=device) != row
        assert torch.equal(got[others], want[2][others]), "cache rows other than the emitted one changed"
        flips += _grid_close("split emission", got[row].cpu(), want[2][row].cpu(), index)
    # prefill: rows c0.. from projections at positions base..
    n = 3
    c0 = max(1, p // ratio - n + 1)
    base = (c0 - 1) * ratio
    N = (c0 + n) * ratio - base
    kv = (torch.randn(N, halves * HD, generator=gen) * 2).to(device)
    sc = (torch.randn(N, halves * HD, generator=gen) * 3).to(device)
    cs = range(c0, c0 + n)
    want, _ = compressed_rows(cw, kv, sc, base, cs, HD, index, s, trace={})      # traced: the twin
    c = torch.arange(c0, c0 + n, device=device)
    cos, sin = numerics.rope_cos_sin(c * ratio, n_rot, compressed=True)
    parts = []
    for r in range(world):
        kv_r, sc_r = _share(kv, world, r, halves), _share(sc, world, r, halves)
        part = triton_attn.compressor_rows(kv_r, sc_r, base, c0, n, ratio, cw.norm, cos, sin, index,
                                           RMS_EPS, pool_only=True)
        check(f"compressor_rows pool_only rank {r}", part,
              pool_rows_torch(kv_r, sc_r, base, c, ratio, HD // world), 1e-5)
        parts.append(part)
    got = triton_attn.compressor_finish(torch.cat(parts, -1), cw.norm, cos.contiguous(),
                                        sin.contiguous(), index, RMS_EPS)
    flips += _grid_close("split rows", got.cpu(), want.cpu(), index)
    return f"{flips} grid flips"


def case_decode_attention(device, gen, H, D, n_rot, n_swa, ratio, cap, p, masked, poison=True,
                          rows=False):
    """The decode attention kernel (q norm, RoPE, sinks, raw ring + compressed rows, inverse
    RoPE) against decode_graph.decode_attention_torch, with empty and stale ring slots. Cache
    rows hold float16 values, as model.kv_cache_row and model.compress make them. poison: the
    kernel's copy holds NaN in the ring slots out of the window, in the compressed rows past
    the visible ones and in the visible ones the mask leaves out, which it must never let into
    the result. rows: the mask's rows also given as a list (ascending, then -1 entries, as
    topk_mask(rows=) makes it), which the kernel walks instead of the mask."""
    from ds4tp.config import RMS_EPS, Shape
    from ds4tp.decode_graph import decode_attention_torch
    from ds4tp.kernels import triton_attn
    s = Shape(n_swa=n_swa, head_dim=D, n_rot=n_rot, n_head=H)
    qb = (torch.randn(1, H * D, generator=gen) * 2).to(device)
    # keys near q's direction for some rows, so the softmax is peaked as well as flat
    ring = numerics.f16_round(torch.randn(n_swa, D, generator=gen) * 3).to(device)
    slots = torch.arange(n_swa)
    rpos = torch.where(slots % 7 == 3, torch.full_like(slots, -(1 << 40)), p - (slots * 5) % (n_swa + 9))
    rpos = rpos.to(device)
    comp = mask = sel = None
    if ratio:
        comp = numerics.f16_round(torch.randn(cap, D, generator=gen) * 3).to(device)
        if masked:
            n_vis = (p + 1) // ratio
            m = torch.rand(1, cap, generator=gen) < 0.5
            m[:, n_vis:] = False
            mask = m.to(device)
            if rows:
                listed = torch.nonzero(m[0]).flatten()
                sel = torch.cat([listed, torch.full((7,), -1)]).to(torch.int32).to(device)
    sinks = (torch.randn(H, generator=gen) * 2).to(device)
    cos, sin = _rope_tables(n_rot, p + 1, device, compressed=ratio > 0)
    pos = torch.tensor([p], device=device)
    want = decode_attention_torch(qb, ring, rpos, comp, ratio, mask, sinks, cos, sin, pos, s)
    if poison:
        out_of_window = ~((rpos <= p) & (rpos > p - n_swa))
        ring = ring.masked_fill(out_of_window[:, None], float("nan"))
        if comp is not None:
            comp = comp.clone()
            comp[(p + 1) // ratio:] = float("nan")
            if mask is not None:
                comp[~mask[0]] = float("nan")
    got = triton_attn.attention(qb, ring, rpos, comp, ratio, mask, sinks, cos, sin, pos, RMS_EPS,
                                rows=sel)
    return check(f"decode attention H={H} D={D} ratio={ratio} pos={p} mask={masked} rows={rows}",
                 got, want, 1e-5)


def case_decode_attention_nohoist(device, gen, *args):
    """case_decode_attention with the kernel's first ring block loaded after q's norm
    (triton_attn.ATTN_HOIST off: the layout benchmarks time against the default)."""
    from unittest import mock
    from ds4tp.kernels import triton_attn
    with mock.patch.object(triton_attn, "ATTN_HOIST", False):
        return case_decode_attention(device, gen, *args)


def case_index_scores(device, gen, HI, HD, cap, nvis):
    """One decode token's indexer scores in one launch against model.index_scores_torch, on the
    visible rows (the kernel writes 0 past them and does not read them: NaN there must not
    leak). Queries and keys as the model makes them: Hadamard + FP4 rows, F16-rounded keys."""
    from ds4tp.kernels import triton_attn
    from ds4tp.model import index_scores_torch
    q = numerics.hadamard_fp4(torch.randn(1, HI, HD, generator=gen) * 3)
    w = torch.randn(1, HI, generator=gen)
    keys = numerics.f16_round(numerics.hadamard_fp4(torch.randn(cap, HD, generator=gen)))
    keys[nvis:] = float("nan")                               # stale rows past the visible ones
    wscale = 1.0 / (HD * HI) ** 0.5
    want = index_scores_torch(q, w, keys[:nvis], wscale)
    nv = torch.tensor([nvis], device=device)
    got = triton_attn.index_scores(q.to(device), w.to(device), keys.to(device), nv, wscale)
    assert got.shape == (1, cap) and got.dtype == torch.float32
    if nvis < cap and not torch.equal(got[0, nvis:].cpu(), torch.zeros(cap - nvis)):
        raise AssertionError("index_scores: rows past the visible ones are not 0")
    return check(f"index_scores HI={HI} HD={HD} cap={cap} nvis={nvis}", got[:, :nvis], want, 1e-5)


def case_topk_mask(device, gen, n, nvis, k, levels=0, rows=True):
    """The indexer's row selection in one launch against model.select_rows, bit for bit: scores
    with repeated values (ties go to the lower row), +0.0 and -0.0 (equal), negative and large
    values, NaN past the visible rows (never read); with `levels`, only that many distinct
    values (the k-th largest sits inside a run of ties). rows: the selected rows' list too
    (ascending, -1 past them; its entries start as junk)."""
    from ds4tp.kernels import triton_attn
    from ds4tp.model import select_rows
    score = torch.randn(1, n, generator=gen) * 10
    score[0, ::7] = torch.round(score[0, ::7] * 2) / 2                # many exact ties
    if levels:
        score = torch.randint(-levels // 2, levels - levels // 2, (1, n), generator=gen).float() * 0.25
    score[0, 3::11] = 0.0
    score[0, 5::13] = -0.0
    score[0, 9::17] = -3e38
    want, _ = select_rows.eager(score, torch.tensor([nvis]), k)
    score[0, nvis:] = float("nan")
    listed = torch.full((k,), 12345, dtype=torch.int32, device=device) if rows else None
    got = triton_attn.topk_mask(score.to(device), torch.tensor([nvis], device=device), k, rows=listed)
    assert got.dtype == torch.bool and got.shape == want.shape
    if not torch.equal(got.cpu(), want):
        diff = torch.nonzero(got.cpu() != want)[:5, 1].tolist()
        raise AssertionError(f"topk_mask n={n} nvis={nvis} k={k}: rows {diff} differ")
    if rows:
        ids = torch.nonzero(want[0]).flatten()
        expect = torch.cat([ids, torch.full((k - ids.numel(),), -1)]).to(torch.int32)
        if not torch.equal(listed.cpu(), expect):
            bad = torch.nonzero(listed.cpu() != expect).flatten()[:5].tolist()
            raise AssertionError(f"topk_mask n={n} nvis={nvis} k={k}: row list entries {bad} differ")
    return f"{int(got.sum())} rows selected"


def case_prefill_attention(device, gen, T, H, D, n_swa, raw_prev, ratio, C_rows, p0, masked,
                           cfg=None, n_rot=64):
    """A prefill's attention in one launch (triton_attn.prefill_attention, RoPE on the queries
    and inverse RoPE on the heads inside) against the twin of model.attend_many (rope_tail,
    query chunks, rope_tail inverse): sinks, the raw window across the cache's older rows, the
    compressed rows each token sees (optionally an indexer-like random mask), float16 cache
    rows with a peaked as well as a flat softmax."""
    from types import SimpleNamespace

    from ds4tp.kernels import triton_attn
    from ds4tp.model import attend_many
    from ds4tp.numerics import f16_round
    s = SimpleNamespace(head_dim=D, n_swa=n_swa)
    q = torch.randn(T, H, D, generator=gen)
    raw = f16_round(torch.randn(raw_prev + T, D, generator=gen) * 3)
    raw[raw_prev + 1] = f16_round(q[1, 0] * 4)               # a key near a query: a peaked row
    comp = cmask = None
    pos = torch.arange(p0, p0 + T)
    if ratio:
        comp = f16_round(torch.randn(C_rows, D, generator=gen) * 3)
        vis = torch.arange(C_rows)[None, :] < ((pos + 1) // ratio)[:, None]
        cmask = vis & (torch.rand(T, C_rows, generator=gen) < 0.6) if masked else vis
    sinks = torch.randn(H, generator=gen) * 2
    raw_pos = torch.arange(p0 - raw_prev, p0 + T)
    cos, sin = numerics.rope_cos_sin(pos, n_rot, ratio > 0)
    want = attend_many(q, cos, sin, raw, raw_prev, raw_pos, comp, cmask, p0, pos, ratio, sinks, s)
    dev = lambda t: None if t is None else t.to(device)     # noqa: E731
    got = triton_attn.prefill_attention(dev(q), dev(raw), raw_prev, dev(comp), dev(cmask), p0, ratio,
                                        dev(sinks), n_swa, rope=(dev(cos), dev(sin)), **(cfg or {}))
    return check(f"prefill attention T={T} H={H} D={D} ratio={ratio} masked={masked}", got, want, 1e-5)


def _mixed_rows(T, K, gen):
    """Activation rows [T, K] over float32's range: ordinary, 1e30, 1e-30, subnormal, zero, and
    rows holding values 2^20 apart (their small entries fall into float16's subnormals)."""
    x = torch.randn(T, K, generator=gen)
    x[1] *= 1e30
    x[2] *= 1e-30
    x[3] = x[3] * 1e-41                                      # subnormal float32
    x[4] = 0.0
    x[5, ::2] *= 2.0 ** -20
    return x


def case_split_h16(device, gen, T, K):
    """triton_gemm.split_h16: x = (head + tail) * scale to 2^-22 of each value plus 2^-25 of
    its row's scale (float16's subnormal step after scaling), heads exactly x * 2^-e rounded to
    float16, scales powers of two."""
    from ds4tp.kernels import triton_gemm as tg
    x = _mixed_rows(T, K, gen)
    hl, scale = tg.split_h16(x.to(device))
    hl, scale = hl.cpu().double(), scale.cpu().double()
    assert torch.all(torch.frexp(scale).mantissa == 0.5), "scales are not powers of two"
    assert torch.equal(hl[:T], (x.double() / scale[:, None]).float().half().double()), "heads"
    back = (hl[:T] + hl[T:]) * scale[:, None]
    err = (back - x.double()).abs()
    bound = 2.0 ** -22 * x.double().abs() + 2.0 ** -25 * scale[:, None]
    assert torch.all(err <= bound), f"split error {float((err / bound).max()):.2f} x the bound"
    return f"max err / bound {float((err / bound).max()):.3f}"


def case_f16_split_rows(device, gen, n_out, n_in, T):
    """An F16 weight's many-token product on the split cuBLAS path (triton_gemm.f16_split_mm)
    against the torch twin row by row (rows over float32's range: each row's tolerance is
    relative to its own largest output)."""
    from ds4tp.kernels import triton_gemm as tg
    w = rand_weight(F16, (n_out, n_in), gen, device)
    x = _mixed_rows(T, n_in, gen).to(device)
    got, want = tg.f16_split_mm(w, x), ops.linear_torch(w, x)
    return max(check(f"f16 split {n_out}x{n_in} T={T} row {t}", got[t], want[t], F16_SPLIT_TOL)
               for t in range(T) if want[t].abs().max() > 0)


def _cfg(cfg):
    from ds4tp.kernels.triton_matvec import Cfg
    return Cfg(**cfg) if cfg is not None else None


def interpreter_cases():
    """Small shapes for the CPU interpreter (the whole run takes ~35 s on 2 cores)."""
    yield "quantizers", case_quantizers, ()
    yield "greedy pick, 5 programs", case_pick, (9000, 2048)
    yield "greedy pick, one program, ties", case_pick, (700, 1024, "ties")
    yield "greedy pick, ties across programs", case_pick, (5000, 512, "ties")
    yield "greedy pick, banned", case_pick, (300, 64, "banned")
    yield "hc_combine T=1", case_hc_combine, (1, 512)
    yield "hc_combine T=3 tail", case_hc_combine, (3, 1000)
    yield "hc_combine two passes (E > 4096)", case_hc_combine, (2, 5000)
    yield "rms_scale rows", case_rms_scale, ((5, 3, 300),)
    yield "rms_norm weighted, strided rows", case_rms_norm, ((6, 300), True, 40)
    yield "rms_norm per head", case_rms_norm, ((4, 3, 256), False)
    yield "rms_norm long rows", case_rms_norm, ((3, 5000), True)
    yield "rms_norm rows past one block", case_rms_norm, ((2, 16500), True)
    yield "hc_post E tail", case_hc_post, (3, 1100)
    yield "decode kv_store", case_kv_store, (256, 64, 16, 37)
    yield "prefill kv_rows, strided rows", case_kv_rows, (7, 256, 64, 30, 48)
    yield "prefill kv_rows from 0", case_kv_rows, (5, 128, 64, 0)
    yield "decode route top-k with bias", case_route, (16, 6, False, True)
    yield "decode route top-k no bias", case_route, (40, 6, False, False)
    yield "decode route hash layer", case_route, (16, 6, True, False)
    yield "prefill route T=5 with bias", case_route, (16, 6, False, True, 5)
    yield "prefill route T=4 hash layer", case_route, (16, 6, True, False, 4)
    yield "decode linear_normed split K", case_linear_normed, (40, 512, C(bn=8, nb=4, split=2))
    yield "decode linear_normed default", case_linear_normed, (64, 256)
    yield "decode hc_step one program", case_hc_step, (96,)
    yield "decode hc_step split, column tail", case_hc_step, (300, 64)
    yield "decode hc_step without the mixer, then hc_mix", case_hc_step, (300, 64, False)
    yield "decode hc_step from a table's row", case_hc_step_row, (300, 64)
    yield "decode hc_step with the output head's mix", case_hc_step_head, (300, 64)
    yield "decode hc_step with the output head's mix, one program", case_hc_step_head, (96,)
    yield "decode hc_step, all-reduce inside (loopback)", case_hc_step_peer, (300, 64)
    yield "decode hc_step, all-reduce inside, one program", case_hc_step_peer, (96, None, True)
    yield "decode hc_logits split", case_hc_logits, (4, 300, 24, 3)
    yield "decode hc_logits one program", case_hc_logits, (4, 64, 4, 1)
    yield "decode hc_logits default split, head rows", case_hc_logits, (4, 1024, 4)
    yield "decode compressor_step ratio 4", case_compressor_step, (4, 64, 384, 10)
    yield "decode compressor_step ratio 128", case_compressor_step, (128, 48, 256, 300)
    yield "decode compressor_pair", case_compressor_pair, (64, 32, 384, 10)
    yield "decode compressor_pair, rows per program, split input", case_compressor_pair, \
        (48, 24, 256, 7, (4, 2, 128, 4))
    yield "decode compressor_emit kv row", case_compressor_emit, (512, 64, False, 39)
    yield "decode compressor_emit index row", case_compressor_emit, (128, 64, True, 1003)
    yield "decode compressor_emit first window", case_compressor_emit, (128, 64, True, 3, True)
    yield "decode compressor_emit_pair", case_compressor_emit_pair, (512, 128, 64, 39)
    yield "decode compressor_emit_pair first window", case_compressor_emit_pair, (128, 64, 64, 3, True)
    yield "prefill compressor_rows ratio 4 kv, from 0", case_compressor_rows, (4, 256, 64, False, 0, 40, 0, 10)
    yield "prefill compressor_rows ratio 4 index, later chunk", case_compressor_rows, (4, 128, 64, True, 996, 28, 250, 6)
    yield "prefill compressor_rows ratio 128", case_compressor_rows, (128, 128, 64, False, 128, 300, 1, 2)
    yield "compressor split by channel, kv rows", case_compressor_split, (4, 256, 64, False, 39)
    yield "compressor split by channel, index rows", case_compressor_split, (4, 128, 64, True, 1003)
    yield "compressor split by channel, ratio 128 rows", case_compressor_split, (128, 128, 64, False, 600)
    yield "decode index_scores 8 heads", case_index_scores, (8, 128, 300, 211)
    yield "decode index_scores 20 heads, all visible", case_index_scores, (20, 64, 130, 130)
    yield "decode topk_mask one block", case_topk_mask, (300, 250, 64)
    yield "decode topk_mask blocks", case_topk_mask, (20000, 17000, 512)
    yield "decode topk_mask registers, rows past the block", case_topk_mask, (9000, 3000, 512)
    yield "decode topk_mask few visible", case_topk_mask, (700, 40, 64)
    yield "decode topk_mask visible = k", case_topk_mask, (600, 512, 512)
    yield "decode topk_mask threshold in a tie run", case_topk_mask, (3000, 2900, 512, 7)
    yield "decode topk_mask blocks, tie run", case_topk_mask, (17000, 16999, 300, 5)
    yield "decode topk_mask, mask only", case_topk_mask, (300, 250, 64, 0, False)
    yield "decode topk_mask blocks, mask only", case_topk_mask, (20000, 17000, 512, 0, False)
    yield "decode attention raw only", case_decode_attention, (3, 128, 64, 32, 0, 0, 20, False)
    yield "decode attention compressed", case_decode_attention, (2, 128, 64, 32, 4, 40, 150, False)
    yield "decode attention indexer mask", case_decode_attention, (2, 128, 64, 32, 4, 40, 150, True)
    yield "decode attention, no hoist", case_decode_attention_nohoist, (2, 128, 64, 32, 4, 40, 150, True)
    yield "decode attention 20 heads", case_decode_attention, (20, 128, 64, 32, 4, 60, 230, True)
    yield "decode attention indexer rows", case_decode_attention, (2, 128, 64, 32, 4, 40, 150, True, True, True)
    yield "decode attention 20 heads, rows", case_decode_attention, (20, 128, 64, 32, 4, 60, 230, True, True, True)
    pa = dict(bh=16, bn=16, bd=32, warps=4)
    yield "prefill attention raw only", case_prefill_attention, (21, 3, 64, 8, 5, 0, 0, 5, False, pa)
    yield "prefill attention ratio 4", case_prefill_attention, (19, 2, 64, 8, 0, 4, 5, 0, False, pa, 16)
    yield "prefill attention ratio 4 masked, p0 > 0", case_prefill_attention, (13, 17, 64, 8, 7, 4, 9, 23, True, pa, 48)
    for qt in TYPES:
        nb = 64 if qt == F16 else 4
        yield f"linear {type_name(qt)} T=1", case_linear, (qt, 48, 512, 1, C(bn=16, nb=nb))
        yield f"linear {type_name(qt)} T=5 split", case_linear, (qt, 40, 512, 5, C(bn=16, nb=nb, split=2))
        if qt != F16:
            yield f"linear {type_name(qt)} T=3 pre", case_linear, (qt, 32, 512, 3, C(bn=32, nb=nb, pre=True))
    yield "linear Q8_0 T=4 mma", case_linear, (Q8_0, 32, 256, 4, C(bn=16, nb=4, mma=True))
    yield "linear Q8_0 T=2 mma pre split", case_linear, (Q8_0, 32, 256, 2, C(bn=16, nb=2, mma=True, pre=True, split=2))
    yield "linear Q8_0 T=18 chunks", case_linear, (Q8_0, 16, 128, 18, C(bn=16, nb=4))
    yield "linear Q8_0 default cfg", case_linear, (Q8_0, 64, 256, 1, None)
    yield "linear Q8_0 T=1 tile kernel", case_linear, (Q8_0, 48, 512, 1, C(bn=16, nb=4, q8s=False))
    yield "linear Q8_0 T=1 split layout, split K, row tail", case_linear, (Q8_0, 40, 512, 1, C(bn=8, nb=2, split=3))
    yield "shard Q8_0 T=1", case_linear_shard, (Q8_0, 32, 256, 1, None)
    yield "grouped Q8_0 T=1", case_grouped, (Q8_0, 4, 32, 128, 1, C(bn=16, nb=2, split=2))
    yield "linear IQ2_XXS default cfg", case_linear, (IQ2_XXS, 64, 512, 2, None)
    yield "shard Q8_0", case_linear_shard, (Q8_0, 32, 256, 2, C(bn=16, nb=4))
    yield "shard Q2_K", case_linear_shard, (Q2_K, 32, 512, 1, C(bn=16))
    yield "grouped Q8_0", case_grouped, (Q8_0, 4, 32, 128, 3, C(bn=16, nb=4, split=2))
    # tensor-core expert kernel (small=False keeps the few-token path out at these T*K)
    yield "experts IQ2_XXS shared x", case_experts, (IQ2_XXS, 8, 32, 512, 3, 4, False, C(bn=16, split=3, small=False))
    yield "experts Q2_K per-slot x", case_experts, (Q2_K, 8, 32, 512, 3, 4, True, C(bn=16, split=2, pre=True, small=False))
    yield "experts Q8_0", case_experts, (Q8_0, 6, 16, 256, 2, 3, True, C(bn=16, nb=4))
    yield "experts Q2_K duplicate id", case_experts, (Q2_K, 6, 16, 256, 3, 3, True, C(bn=16, split=2, small=False), True)
    yield "experts Q4_K", case_experts, (Q4_K, 6, 16, 256, 2, 3, False, C(bn=16))
    yield "experts F16", case_experts, (F16, 4, 16, 128, 2, 2, False, C(bn=16, nb=64))
    yield "swiglu IQ2_XXS", case_swiglu, (IQ2_XXS, 8, 32, 512, 3, 4, C(bn=16, small=False))
    yield "swiglu Q2_K pre", case_swiglu, (Q2_K, 8, 16, 256, 2, 3, C(bn=16, pre=True, small=False))
    # few-token packed-integer path (T*K <= 24): K = 6 as DS4, several super-blocks per row,
    # -1 ids, duplicate ids, T = 1..4, TP shards, default and explicit launch shapes
    yield "small swiglu IQ2_XXS T=1", case_swiglu, (IQ2_XXS, 8, 32, 768, 1, 6)
    yield "small swiglu IQ2_XXS T=3 dup rows", case_swiglu, (IQ2_XXS, 8, 16, 512, 3, 6, C(bn=8, nb=1, split=4), True, "rows")
    yield "small experts IQ2_XXS T=2 dup", case_experts, (IQ2_XXS, 8, 24, 1024, 2, 6, False, C(bn=16, nb=4, split=2), True)
    yield "small experts IQ2_XXS T=4 per-slot", case_experts, (IQ2_XXS, 8, 16, 512, 4, 6, True)
    yield "q2k sum default launch (<= 1024 inputs)", case_experts, (Q2_K, 8, 36, 1024, 1, 6, True, None, True)
    yield "q2k sum T=1", case_experts, (Q2_K, 8, 32, 512, 1, 6, True, C(bn=16, q2s=True), True)
    yield "q2k sum T=3 cols rows tail", case_experts, (Q2_K, 8, 40, 512, 3, 6, True, C(bn=32, q2s=True), False, "cols")
    yield "q2k sum T=2 shared x", case_experts, (Q2_K, 8, 16, 768, 2, 6, False, C(bn=16, warps=2, q2s=True))
    yield "small down Q2_K T=1", case_experts, (Q2_K, 8, 32, 512, 1, 6, True, C(bn=16, nb=2, small=True))
    yield "small down Q2_K T=4 dup", case_experts, (Q2_K, 8, 16, 768, 4, 6, True, C(bn=8, nb=1, split=2, small=True), True)
    yield "small down Q2_K T=2 cols", case_experts, (Q2_K, 8, 32, 512, 2, 6, True, C(bn=16, nb=2, small=True), False, "cols")
    yield "small swiglu Q2_K T=2", case_swiglu, (Q2_K, 8, 16, 512, 2, 6, C(bn=16, nb=2, split=8, small=True))
    # many-token launch (prefill): token tiles with a tail, groups, shards, experts in tiles
    g16 = C(bn=16, tq=16, nb=2)
    yield "gemm Q8_0 T=37", case_gemm_linear, (Q8_0, 40, 256, 37, 1, g16)
    yield "gemm Q8_0 grouped T=20", case_gemm_linear, (Q8_0, 64, 128, 20, 4, g16)
    yield "gemm IQ2_XXS T=18", case_gemm_linear, (IQ2_XXS, 32, 512, 18, 1, C(bn=16, tq=16, nb=1))
    yield "gemm Q2_K shard T=17", case_gemm_linear, (Q2_K, 16, 512, 17, 1, C(bn=16, tq=16, nb=1), True)
    yield "gemm Q4_K T=17", case_gemm_linear, (Q4_K, 16, 256, 17, 1, C(bn=16, tq=16, nb=1))
    yield "split_h16 rows over float32's range", case_split_h16, (9, 300)
    yield "gemm F16 T=19 (3xTF32)", case_gemm_linear, (F16, 24, 512, 19, 1, C(bn=16, tq=16, nb=32))
    yield "gemm experts IQ2_XXS swiglu rows", case_gemm_experts, (IQ2_XXS, 4, 16, 256, 12, 3, False, True, C(bn=16, tq=16, nb=1), "rows")
    yield "gemm experts Q2_K per-slot cols", case_gemm_experts, (Q2_K, 4, 16, 512, 11, 3, True, False, C(bn=16, tq=16, nb=1), "cols")
    yield "gemm experts Q8_0 shared x", case_gemm_experts, (Q8_0, 3, 16, 128, 9, 2, False, False, C(bn=16, tq=16, nb=4))
    # the float16 path: weights decoded once, float16 dots
    for qt in (Q8_0, Q2_K, IQ2_XXS):
        yield f"dequant_h16 {type_name(qt)}", case_dequant_h16, (qt, (24, 512))
    yield "dequant_h16 IQ2_XXS experts 2..4 rows", case_dequant_h16, (IQ2_XXS, (5, 16, 256), 2, 3, "rows")
    yield "dequant_h16 Q2_K experts cols", case_dequant_h16, (Q2_K, (3, 16, 512), 0, None, "cols")
    h16 = dict(bn=16, tq=16, nb=32)
    yield "gemm h16 Q8_0 T=37", case_gemm_linear, (Q8_0, 40, 256, 37, 1, h16, False, True)
    yield "gemm h16 Q8_0 grouped T=20", case_gemm_linear, (Q8_0, 64, 256, 20, 4, h16, False, True)
    yield "gemm h16 Q2_K shard T=17", case_gemm_linear, (Q2_K, 16, 512, 17, 1, h16, True, True)
    yield "gemm h16 default launch T=70", case_gemm_linear, (IQ2_XXS, 32, 256, 70, 1)
    yield "gemm exact path forced T=70", case_gemm_linear, (Q8_0, 32, 256, 70, 1, None, False, False)
    yield "gemm h16 experts IQ2_XXS swiglu rows", case_gemm_experts, (IQ2_XXS, 5, 16, 256, 12, 3, False, True, h16, "rows", 0.15, True)
    yield "gemm h16 experts IQ2_XXS swiglu, 3 per group", case_gemm_experts_h16_groups, (IQ2_XXS, 8, 3, True)
    yield "gemm h16 experts Q8_0, 2 per group", case_gemm_experts_h16_groups, (Q8_0, 7, 2, False)
    yield "gemm h16 experts Q2_K per-slot cols", case_gemm_experts, (Q2_K, 4, 16, 512, 11, 3, True, False, h16, "cols", 0.15, True)
    # the device-built expert tile table: its one-launch kernel against the torch twin
    yield "expert tiles kernel E=12 tq=16", case_expert_tiles_kernel, (70, 6, 12, 16)
    yield "expert tiles kernel E=256 default tq", case_expert_tiles_kernel, (33, 6, 256, None)
    yield "expert tiles kernel ids >= E", case_expert_tiles_kernel, (300, 6, 256, None, True)
    yield "expert tiles kernel E=3 tq=64", case_expert_tiles_kernel, (5, 2, 3, 64)
    yield "expert tiles kernel all -1", case_expert_tiles_kernel, (9, 6, 16, None, False, True)


def run_interpreter(seed=1234) -> int:
    gen = torch.Generator().manual_seed(seed)
    fails = 0
    t_all = time.time()
    for name, fn, args in interpreter_cases():
        t0 = time.time()
        try:
            res = fn("cpu", gen, *args)
            print(f"ok    {name:40s} {res if isinstance(res, str) else f'rel err {res:.2e}'} "
                  f"({time.time() - t0:.1f}s)", flush=True)
        except Exception as exc:  # report every case, then fail
            fails += 1
            print(f"FAIL  {name:40s} {type(exc).__name__}: {exc}", flush=True)
    print(f"{'FAILED' if fails else 'passed'}: {fails} failing case(s), {time.time() - t_all:.1f}s total")
    return 1 if fails else 0


def case_expert_tiles_kernel(device, gen, T, K, E, tq, out_of_range=False, all_skipped=False):
    """The many-token expert tile table from its Triton kernel (expert_tiles_device_triton)
    against the torch twin, bit for bit: random routing with -1 ids, optionally some ids >= E
    (in no tile, not counted) or every id -1."""
    from ds4tp.kernels import triton_gemm as tg
    ids = rand_ids(T, K, E, gen, device)
    if out_of_range:
        big = torch.rand(T, K, generator=gen) < 0.1
        ids[big.to(device)] = E + torch.randint(0, 3, (int(big.sum()),), generator=gen).to(device)
    if all_skipped:
        ids.fill_(-1)
    pairs, tiles, tq_k = tg.expert_tiles_device_triton(ids, E, tq)
    pairs_t, tiles_t, tq_t = tg.expert_tiles_device_torch(ids, E, tq)
    assert tq_k == tq_t, f"tq {tq_k} != {tq_t}"
    assert pairs.dtype == tiles.dtype == torch.int32 and torch.equal(pairs, pairs_t), "pairs"
    assert tiles.shape == tiles_t.shape and torch.equal(tiles, tiles_t), "tiles"
    live = int((tiles_t[:, 2] > 0).sum())
    return f"{live} live tiles of {tiles.shape[0]}, tq {tq_k}"


if __name__ == "__main__":
    import os
    import warnings
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (the Triton CPU interpreter)")
    warnings.filterwarnings("ignore", category=RuntimeWarning)   # exp overflow inside sigmoid
    sys.exit(run_interpreter())
