"""A decode step's greedy pick in one Triton launch (the twin: ds4tp.worker.sampling.greedy_pick_torch).

From one token's float32 logits [V] and a logit_bias table of NB (id, value) entries (unused
entries add 0.0 to token 0; sampling.bias_table): the first maximum of x = float64(logits) + bias
(ties to the lower id) and the log-softmax of the raw logits there, in float64. It replaces the
float64 copy, the index_add, argmax, logsumexp's two reductions and the copies into the decode
graphs' buffers: ~75 us a token on an H200, mostly three float64 reductions that torch ran in
one block each (bench/critical_path.py, sixteenth session).

Program p takes logits [p*BV, p*BV + BV): the maximum m_p of the raw logits, s_p = sum exp(raw -
m_p), and the first maximum of x. The last program to arrive (atomic ticket) combines the
partials in a fixed order: M = max m_p, S = sum s_p * exp(m_p - M), norm = M + log S, and the
lowest program holding the largest x. The token is exact (a max, then the lowest index holding
it); norm rounds differently from torch.logsumexp (~1e-16 relative), the same on every run.
sampling.log_norm takes this launch's norm on CUDA, so a sampled step's logprobs and a graph's
pick agree to the bit. Logits are finite (x may be -inf where a bias bans a token).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4tp.kernels import pdl
from ds4tp.kernels.cuda_c import Switch
from ds4tp.kernels.triton_pdl import pdl_start

BV = 2048          # logits per program (129,280: 64 programs)
_switch = Switch()
set_enabled = _switch.set    # benchmarks time the torch twin in the same run


def enabled() -> bool:
    return _switch.on


@triton.jit
def _pick_kernel(logit_ptr, bid_ptr, bval_ptr, part_ptr, cnt_ptr, pick_ptr, tok_ptr, norm_ptr, V,
                 NB: tl.constexpr, BV: tl.constexpr, P: tl.constexpr, PP: tl.constexpr,
                 PDL: tl.constexpr = False):
    pdl_start(PDL)
    p = tl.program_id(0)
    idx = p * BV + tl.arange(0, BV)
    ok = idx < V
    raw = tl.load(logit_ptr + idx, mask=ok, other=float("-inf")).to(tl.float64)
    m = tl.max(raw, axis=0)
    s = tl.sum(tl.where(ok, tl.exp(raw - m), 0.0), axis=0)
    x = raw
    for j in range(NB):                      # in table order, as index_add
        x = tl.where(idx == tl.load(bid_ptr + j), x + tl.load(bval_ptr + j), x)
    bx = tl.max(tl.where(ok, x, float("-inf")), axis=0)
    bi = tl.min(tl.where(ok & (x == bx), idx, V), axis=0)    # the first maximum (every x -inf: the first)
    tl.store(part_ptr + 4 * p, m)
    tl.store(part_ptr + 4 * p + 1, s)
    tl.store(part_ptr + 4 * p + 2, bx)
    tl.store(part_ptr + 4 * p + 3, bi.to(tl.float64))
    tl.debug_barrier()                                       # partial stores before the ticket
    if tl.atomic_add(cnt_ptr, 1) == P - 1:                   # acq_rel, gpu scope: the last one
        jj = tl.arange(0, PP)
        jok = jj < P
        mv = tl.load(part_ptr + 4 * jj, mask=jok, other=float("-inf"), cache_modifier=".cg")
        sv = tl.load(part_ptr + 4 * jj + 1, mask=jok, other=0.0, cache_modifier=".cg")
        xv = tl.load(part_ptr + 4 * jj + 2, mask=jok, other=float("-inf"), cache_modifier=".cg")
        iv = tl.load(part_ptr + 4 * jj + 3, mask=jok, other=0.0, cache_modifier=".cg")
        mm = tl.max(mv, axis=0)
        norm = mm + tl.log(tl.sum(tl.where(jok, sv * tl.exp(mv - mm), 0.0), axis=0))
        best = tl.max(xv, axis=0)
        jb = tl.min(tl.where(jok & (xv == best), jj, PP), axis=0)   # the lowest program holding it
        tok = tl.sum(tl.where(jj == jb, iv, 0.0), axis=0)
        t64 = tok.to(tl.int64)
        tl.store(pick_ptr, tok)
        tl.store(pick_ptr + 1, tl.load(logit_ptr + t64).to(tl.float64) - norm)
        tl.store(tok_ptr, t64)
        tl.store(norm_ptr, norm)
        tl.atomic_xchg(cnt_ptr, 0)


def pick(logits: torch.Tensor, bias_ids: torch.Tensor | None = None, bias_vals: torch.Tensor | None = None,
         out: torch.Tensor | None = None, token: torch.Tensor | None = None, bv: int | None = None):
    """(pick float64 [2]: token, logprob; token int64 [1]; norm float64 [1]: logsumexp of the
    logits) of one token's float32 logits (any shape of V elements), with a logit_bias table
    (int64 ids [NB], float64 values [NB]) or none. out, token: buffers to write them to (the
    decode graphs' own), else new ones. bv: logits per program (a power of two; tests take
    small ones; None: BV, read at call time)."""
    from ds4tp.kernels.triton_matvec import _tickets
    if logits.dtype != torch.float32:
        raise ValueError(f"pick: expects float32 logits, got {logits.dtype}")
    raw = logits.reshape(-1)
    if not raw.is_contiguous():
        raw = raw.contiguous()
    V = raw.numel()
    if V == 0 or V >= 1 << 31:
        raise ValueError(f"pick: {V} logits (1 to 2**31 - 1)")
    dev = raw.device
    if bias_ids is None:
        bias_ids = torch.zeros(0, dtype=torch.int64, device=dev)
        bias_vals = torch.zeros(0, dtype=torch.float64, device=dev)
    nb = bias_ids.numel()
    if (bias_ids.dtype != torch.int64 or bias_vals is None or bias_vals.dtype != torch.float64
            or bias_vals.shape != bias_ids.shape or bias_ids.dim() != 1
            or bias_ids.device != dev or bias_vals.device != dev):
        raise ValueError("pick: the bias table is int64 ids and float64 values [NB] on the logits' device")
    out = torch.empty(2, dtype=torch.float64, device=dev) if out is None else out
    token = torch.empty(1, dtype=torch.int64, device=dev) if token is None else token
    if (out.shape != (2,) or out.dtype != torch.float64 or token.numel() != 1
            or token.dtype != torch.int64 or not (out.is_contiguous() and token.is_contiguous())):
        raise ValueError("pick: out is float64 [2] and token int64 [1], contiguous")
    norm = torch.empty(1, dtype=torch.float64, device=dev)
    bv = bv or BV
    P = triton.cdiv(V, bv)
    part = torch.empty(4 * P, dtype=torch.float64, device=dev)
    _pick_kernel[(P,)](raw, bias_ids, bias_vals, part, _tickets(dev), out, token, norm, V,
                       NB=nb, BV=bv, P=P, PP=triton.next_power_of_2(P), num_warps=8,
                       **pdl.triton_args(dev))
    return out, token, norm
