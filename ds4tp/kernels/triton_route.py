"""Expert selection in one Triton launch, one program per token (the twin: ds4tp.model.route_select).

From the router logits [n_expert]: scores p = sqrt(softplus(logit)); the top-k of p + bias,
descending, ties to the lower expert id (what a stable descending sort gives), or, on a hash
layer, the ids the token's row of tid2eid names; weights = p of the chosen ids divided by their
sum (floored), times the expert weight scale. Compiled torch ran this as a sort kernel and two or
three elementwise kernels per layer, plus an index kernel for the hash table.

Same operations as the twin: softplus by its three branches, correctly rounded sqrt and division;
exp and log1p may differ from torch's by an ulp. The k selections are exact (max, then the
lowest index holding it), so ids only differ from the twin where scores tie within an ulp.
The CUDA C choice inside the routed gate/up launch (experts.cu route_scores, route_pick) repeats
this arithmetic op for op (exp as ex2.approx of z * log2(e), the Kahan log1p, the sum in slot
order): its weights are bit-identical to these, which the graphs' bit-identity tests rely on.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4tp.kernels import pdl
from ds4tp.kernels.triton_pdl import pdl_start


@triton.jit
def _route_kernel(logit_ptr, bias_ptr, tid_ptr, tok_ptr, ids_ptr, w_ptr, NE, floor, scale,
                  K: tl.constexpr, KP: tl.constexpr, BE: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HASH: tl.constexpr,
                  PDL: tl.constexpr = False):
    pdl_start(PDL)
    t = tl.program_id(0)                         # one token per program
    logit_ptr += t * NE
    tok_ptr += t
    ids_ptr += t * K
    w_ptr += t * K
    e = tl.arange(0, BE)
    ok = e < NE
    z = tl.load(logit_ptr + e, mask=ok, other=0.0)
    y = tl.exp(z)
    u = 1.0 + y                                  # log1p(y) = log(u) * y / (u - 1) (Kahan),
    l1p = tl.where(u == 1.0, y, tl.log(u) * tl.math.div_rn(y, tl.where(u == 1.0, 1.0, u - 1.0)))
    sp = tl.where(z > 20.0, z, tl.where(z < -20.0, y, l1p))   # to an ulp or two of torch.log1p
    p = tl.sqrt_rn(sp)
    kk = tl.arange(0, KP)
    sel = tl.full([KP], 0, tl.int64)
    ps = tl.zeros([KP], tl.float32)
    tot = tl.sum(ps, axis=0)                     # the chosen scores summed in slot order
    if HASH:
        tok = tl.load(tok_ptr)
        sel = tl.load(tid_ptr + tok * K + kk, mask=kk < K, other=0).to(tl.int64)
        for k in tl.static_range(K):
            i = tl.sum(tl.where(kk == k, sel, 0), axis=0)
            pk = tl.sum(tl.where(e == i, p, 0.0), axis=0)            # (exact: one term)
            ps = tl.where(kk == k, pk, ps)
            tot += pk
    else:
        score = p
        if HAS_BIAS:
            score = p + tl.load(bias_ptr + e, mask=ok, other=0.0)
        score = tl.where(ok, score, float("-inf"))
        for k in tl.static_range(K):
            m = tl.max(score, axis=0)
            i = tl.min(tl.where(score == m, e, BE), axis=0)          # ties: the lower id
            sel = tl.where(kk == k, i.to(tl.int64), sel)
            pk = tl.sum(tl.where(e == i, p, 0.0), axis=0)
            ps = tl.where(kk == k, pk, ps)
            tot += pk
            score = tl.where(e == i, float("-inf"), score)
    tot = tl.maximum(tot, floor)
    w = tl.math.div_rn(ps, tl.broadcast_to(tot, ps.shape)) * scale
    tl.store(ids_ptr + kk, sel, mask=kk < K)
    tl.store(w_ptr + kk, w, mask=kk < K)


ROUTE_WARPS = 4     # warps per program (bench/critical_path.py times others: none faster, s19c)


def route(logits, bias, tid2eid, tokens, k: int, floor: float, scale: float):
    """T tokens, one program each: logits [T, n_expert] float32, bias [n_expert] or None,
    tid2eid [V, k] (a hash layer; None otherwise) with tokens [T] int64 -> ids [T, k] int64,
    weights [T, k] float32."""
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.dtype != torch.float32:
        raise ValueError(f"route: expects float32 logits [T, n_expert], got "
                         f"{logits.dtype} {tuple(logits.shape)}")
    T, ne = logits.shape
    if bias is not None and (bias.shape != (ne,) or bias.dtype != torch.float32):
        raise ValueError(f"route: bias {bias.dtype} {tuple(bias.shape)} does not match {ne} experts")
    if tid2eid is not None and (tid2eid.dim() != 2 or tid2eid.shape[1] != k or tokens.shape != (T,)):
        raise ValueError(f"route: hash table {tuple(tid2eid.shape)} / tokens {tuple(tokens.shape)} "
                         f"do not match k={k} and {T} logit rows")
    logits = logits.contiguous()
    ids = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    w = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    _route_kernel[(T,)](logits, logits if bias is None else bias.contiguous(),
                        ids if tid2eid is None else tid2eid.contiguous(),
                        ids if tokens is None else tokens.contiguous(), ids, w, ne, floor, scale,
                        K=k, KP=triton.next_power_of_2(k), BE=triton.next_power_of_2(ne),
                        HAS_BIAS=bias is not None, HASH=tid2eid is not None, num_warps=ROUTE_WARPS,
                        **pdl.triton_args(logits.device))
    return ids, w
