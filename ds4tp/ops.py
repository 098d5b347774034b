"""Weight-times-activation ops: the one dispatch point of each, and its plain-torch twin.

The reference engine never multiplies a float activation by a quantised weight: the activation is
first quantised (Q8_0 for Q8_0 weights, Q8_K for the K/IQ quants of the routed experts) and the
product is taken in integers per block. Mathematically that equals dequant(W) @ quant(x), which is
what the torch twins compute in float32. F16/F32 weights take the float activation as is.

On CUDA the fused kernels in `ds4tp.kernels` read the quantised bytes directly; everywhere else
(and for shapes the kernels do not cover) the torch twin runs. Tests compare the two.
"""
from __future__ import annotations

import torch

from ds4tp.config import F16, F32, IQ2_XXS, Q2_K, Q4_K, Q8_0, RMS_EPS, SWIGLU_CLAMP
from ds4tp.numerics import q8_0_act, q8_k_act, rms_norm, swiglu_clamped
from ds4tp.qtensor import QTensor


def act_quant(qtype: int, x: torch.Tensor) -> torch.Tensor:
    """Round-trip x through the activation format the reference pairs with weight type qtype."""
    if qtype == Q8_0:
        return q8_0_act(x)
    if qtype in (IQ2_XXS, Q2_K, Q4_K):
        return q8_k_act(x)
    if qtype in (F16, F32):
        return x
    raise ValueError(f"no activation format for weight type {qtype}")


# ---- torch twins -------------------------------------------------------------------------------
def linear_torch(w: QTensor, x: torch.Tensor) -> torch.Tensor:
    """x [T, in] -> [T, out] with w (out, in)."""
    return act_quant(w.qtype, x) @ w.f32().T


def expert_linear_torch(w: QTensor, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Routed experts: w (E, out, in); ids [T, K] local expert indices (-1 = not on this rank,
    gives zeros); x [T, in] (shared by the K slots) or [T, K, in]. Returns [T, K, out].

    The activation is quantised per (token, slot) row exactly as the reference does, then each
    expert's rows are multiplied in one matmul (grouped by expert, no weight gather).
    """
    T, K = ids.shape
    E, n_out, n_in = w.shape
    xq = act_quant(w.qtype, x)
    if xq.dim() == 2:
        xq = xq[:, None, :].expand(T, K, n_in)
    wf = w.f32()
    if T * K <= 16:    # decode: multiply each slot's row by its expert's matrix directly
        safe = ids.clamp_min(0).reshape(-1)
        y = torch.bmm(wf[safe], xq.reshape(T * K, n_in, 1)).view(T, K, n_out)
        return y.masked_fill_((ids < 0)[:, :, None], 0.0)
    # prefill: rows grouped by expert with one stable sort (each expert's rows keep their order)
    # and one host sync for the group sizes, then one GEMM per expert on a contiguous slice
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids + 1, minlength=E + 1).tolist()   # [0] counts the -1 slots
    xs = xq.reshape(T * K, n_in)[order]
    ys = torch.zeros(T * K, n_out, dtype=torch.float32, device=x.device)
    start = counts[0]
    for e in range(E):
        c = counts[e + 1]
        if c:
            ys[start:start + c] = xs[start:start + c] @ wf[e].T
            start += c
    out = torch.empty(T * K, n_out, dtype=torch.float32, device=x.device)
    out[order] = ys
    return out.view(T, K, n_out)


def expert_swiglu_torch(w_gate: QTensor, w_up: QTensor, x: torch.Tensor, ids: torch.Tensor,
                        weights: torch.Tensor, clamp: float = SWIGLU_CLAMP) -> torch.Tensor:
    """Routed gate/up and the clamped SwiGLU times the router weight: [T, K, out]."""
    g = expert_linear_torch(w_gate, x, ids)
    u = expert_linear_torch(w_up, x, ids)
    return swiglu_clamped(g, u, clamp) * weights[:, :, None]


def grouped_linear_torch(w: QTensor, x: torch.Tensor) -> torch.Tensor:
    """Grouped projection: w (G*o, in_g) holds G blocks of o rows; group g multiplies x[:, g].
    x [T, G, in_g] -> [T, G, o]."""
    T, G, n_in = x.shape
    wf = w.f32().view(G, -1, n_in)
    return torch.einsum("tgi,goi->tgo", act_quant(w.qtype, x), wf)


# ---- dispatch points ---------------------------------------------------------------------------
# On CUDA every weight-times-activation op goes to ds4tp.kernels (which picks the few-token
# matvec kernels or, for a prefill's many tokens, the one-launch GEMM); elsewhere, and for what
# the kernels do not cover, the torch twin runs.
def _fused_ok(x: torch.Tensor) -> bool:
    from ds4tp import kernels
    return kernels.on_gpu(x)


def linear(w: QTensor, x: torch.Tensor, mix=None) -> torch.Tensor:
    """y = W @ quant(x) for x [T, in]; fused kernel on CUDA, torch twin elsewhere. mix: an HC
    Sinkhorn (kernels.cuda_c.MixJob) that a one-token CUDA C launch carries if it can (mix.done
    says whether it did; the caller runs it otherwise)."""
    if _fused_ok(x):
        from ds4tp import kernels
        y = kernels.linear(w, x, mix)
        if y is not None:
            return y
    return linear_torch(w, x)


def linear_normed_torch(w: QTensor, x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return linear(w, rms_norm(x, norm))


def linear_normed(w: QTensor, x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """linear(w, rms_norm(x, norm)): one launch for a decode token on CUDA (the norm in the
    matvec's prologue), the twin elsewhere."""
    if _fused_ok(x):
        from ds4tp import kernels
        y = kernels.linear_normed(w, x, norm, RMS_EPS)
        if y is not None:
            return y
    return linear_normed_torch(w, x, norm)


def swiglu_linear_torch(w: QTensor, gu: torch.Tensor, clamp: float = SWIGLU_CLAMP) -> torch.Tensor:
    """y = W @ quant(swiglu_clamped(gate, up)) for gu [T, 2F] = gate then up (the shared expert's
    down projection of its fused gate/up output)."""
    gate, up = gu.chunk(2, -1)
    return linear(w, swiglu_clamped(gate, up, clamp))


def swiglu_linear(w: QTensor, gu: torch.Tensor, clamp: float = SWIGLU_CLAMP) -> torch.Tensor:
    """swiglu_linear_torch in one launch for a decode token on CUDA (the SwiGLU in the matvec's
    prologue), the twin elsewhere."""
    if _fused_ok(gu):
        from ds4tp import kernels
        y = kernels.swiglu_linear(w, gu, clamp)
        if y is not None:
            return y
    return swiglu_linear_torch(w, gu, clamp)


def expert_linear(w: QTensor, x: torch.Tensor, ids: torch.Tensor,
                  sum_slots: bool = False) -> torch.Tensor:
    """Selected routed experts per token; see expert_linear_torch for shapes. With sum_slots
    the K slots of each token are summed: [T, out] (the routed down projection)."""
    if _fused_ok(x):
        from ds4tp import kernels
        y = kernels.expert_linear(w, x, ids, sum_slots=sum_slots)
        if y is not None:
            return y
    y = expert_linear_torch(w, x, ids)
    return y.sum(1) if sum_slots else y


def expert_swiglu(w_gate: QTensor, w_up: QTensor, x: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor, clamp: float = SWIGLU_CLAMP) -> torch.Tensor:
    """mid [T, K, out] = swiglu_clamped(gate, up, clamp) * weights (routed gate/up, one fused
    launch on CUDA); see expert_swiglu_torch."""
    if _fused_ok(x):
        from ds4tp import kernels
        y = kernels.expert_swiglu(w_gate, w_up, x, ids, weights, clamp)
        if y is not None:
            return y
    return expert_swiglu_torch(w_gate, w_up, x, ids, weights, clamp)


def shared_rides(x: torch.Tensor) -> bool:
    """Whether the shared expert of this token rides in the routed experts' launches
    (expert_swiglu_shared, expert_down_shared take it in one launch each): one token on CUDA."""
    if not _fused_ok(x):
        return False
    from ds4tp import kernels
    return kernels.shared_rides(x)


def expert_swiglu_shared(w_gate: QTensor, w_up: QTensor, w_sh: QTensor, x: torch.Tensor,
                         ids: torch.Tensor, weights: torch.Tensor,
                         clamp: float = SWIGLU_CLAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert_swiglu(...), linear(w_sh, x)): the routed gate/up and the shared expert's gate |
    up of the same input, in one launch for a decode token on CUDA; the two ops elsewhere."""
    if _fused_ok(x):
        from ds4tp import kernels
        y = kernels.expert_swiglu_shared(w_gate, w_up, w_sh, x, ids, weights, clamp)
        if y is not None:
            return y
    return expert_swiglu(w_gate, w_up, x, ids, weights, clamp), linear(w_sh, x)


def expert_swiglu_routed(w_gate: QTensor, w_up: QTensor, w_sh: QTensor, x: torch.Tensor,
                         logits: torch.Tensor, bias, tid2eid, tokens, k: int, floor: float,
                         scale: float, clamp: float = SWIGLU_CLAMP):
    """(mid, gu, ids, weights): the routed gate/up and the shared expert's gate | up of one decode
    token on CUDA with its expert choice (model.route_select's, from the router logits) in the
    same launch; None where that launch does not apply (the caller then chooses first: the twin
    is route_select, then expert_swiglu_shared)."""
    if not _fused_ok(x):
        return None
    from ds4tp import kernels
    return kernels.expert_swiglu_routed(w_gate, w_up, w_sh, x, logits, bias, tid2eid, tokens, k,
                                        floor, scale, clamp)


def expert_down_shared(w: QTensor, mid: torch.Tensor, ids: torch.Tensor, w_sh: QTensor,
                       gu: torch.Tensor, clamp: float = SWIGLU_CLAMP, mix=None) -> torch.Tensor:
    """expert_linear(w, mid, ids, sum_slots=True) + swiglu_linear(w_sh, gu, clamp): the routed
    down summed over the slots plus the shared expert's down, [T, out], in one launch for a
    decode token on CUDA; the two ops elsewhere. mix: as linear's."""
    if _fused_ok(mid):
        from ds4tp import kernels
        y = kernels.expert_down_shared(w, mid, ids, w_sh, gu, clamp, mix)
        if y is not None:
            return y
    return expert_linear(w, mid, ids, sum_slots=True) + swiglu_linear(w_sh, gu, clamp)


def grouped_linear(w: QTensor, x: torch.Tensor) -> torch.Tensor:
    """Grouped low-rank projection (attention output A); see grouped_linear_torch."""
    if _fused_ok(x):
        from ds4tp import kernels
        y = kernels.grouped_linear(w, x)
        if y is not None:
            return y
    return grouped_linear_torch(w, x)
