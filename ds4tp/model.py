"""DeepSeek V4 Flash, top to bottom, tensor-parallel aware, pure torch.

Reading order: weights (GGUF names bound once), session state, hyper-connections, attention
(projections, compressors, indexer, sparse attention with sinks, grouped output), MoE FFN, output
head, and the forward loop. Section numbers refer to ../shared/ds4-architecture.md.

Tensor parallelism: the model is given rank, world and a comm object (all_reduce, all_gather) and
holds only its local shards, so it sees local shapes: H_l query heads, G_l output groups, the
local slice of every expert's FFN width (or whole local experts), V_l vocabulary rows. The HC
state, norms, KV path, compressors and caches are replicated and identical on every rank. Each
collective is one line at its call site below.

Shape tags in comments: T tokens in this call, E n_embd, D head_dim, H_l local heads, L keys.
One function serves both paths: a call with T > 1 is a batched prefill, T == 1 is decode; both
update the same SessionState and compute the same math.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from ds4tp import config as C, kernels
from ds4tp.comm import SingleComm
from ds4tp.fuse import fused
from ds4tp.config import Shape
from ds4tp.numerics import (f16_round, fp8_e4m3_blocks, hadamard_fp4, rms_norm,
                            rope_cos_sin, rope_tail, softplus)
from ds4tp.ops import (expert_down_shared, expert_linear, expert_swiglu, expert_swiglu_routed,
                       expert_swiglu_shared, grouped_linear, linear, shared_rides, swiglu_linear)
from ds4tp.qtensor import QTensor
from ds4tp.streams import Side


# ================================ weights ======================================================
@dataclass
class CompressorWeights:
    ratio: int
    ape: torch.Tensor          # [r, width] float32, row = pos % r
    kv: QTensor                # F16 (width, E)                row views of kv_gate
    gate: QTensor              # F16 (width, E)
    norm: torch.Tensor         # [hd]
    kv_gate: QTensor | None = None   # F16 (2*width, E)       kv then gate rows (one launch)


@dataclass
class LayerWeights:
    il: int
    ratio: int
    # attention
    hc_attn_fn: QTensor        # F16 (24, 4E)
    hc_attn_scale: torch.Tensor
    hc_attn_base: torch.Tensor
    attn_norm: torch.Tensor
    q_a_kv: QTensor            # Q8_0 (q_lora + D, E)          attn_q_a and attn_kv stacked (one
    q_a: QTensor               #   launch; q_a / kv are row views of it)   replicated
    q_a_norm: torch.Tensor
    q_b: QTensor               # Q8_0 (H_l*D, q_lora)          rows = this rank's heads
    kv: QTensor                # Q8_0 (D, E)                   replicated (single KV head)
    kv_norm: torch.Tensor
    sinks: torch.Tensor        # [H_l]
    out_a: QTensor             # Q8_0 (G_l*o_lora, group_in)   rows = this rank's groups
    out_b: QTensor             # Q8_0 (E, G_l*o_lora)          cols = this rank's groups
    comp: CompressorWeights | None
    icomp: CompressorWeights | None
    idx_q_b: QTensor | None    # F16 (Hi_l*128, q_lora)        rows = this rank's indexer heads
    idx_proj: QTensor | None   # F16 (Hi_l, E)
    # ffn
    hc_ffn_fn: QTensor
    hc_ffn_scale: torch.Tensor
    hc_ffn_base: torch.Tensor
    ffn_norm: torch.Tensor
    router: QTensor            # F16 (n_expert, E)             replicated
    router_bias: torch.Tensor | None
    tid2eid: torch.Tensor | None   # [V, K] int64 (hash layers)
    gate_exps: QTensor         # (E_l, F_l, E)  F_l = local FFN width, E_l = local experts
    up_exps: QTensor
    down_exps: QTensor         # (E_l, E, F_l)
    gate_up_sh: QTensor        # Q8_0 (2*F_l, E)               gate then up rows (one launch)
    gate_sh: QTensor           # Q8_0 (F_l, E)                 row views of gate_up_sh
    up_sh: QTensor
    down_sh: QTensor           # Q8_0 (E, F_l)

    @property
    def attn_mixer(self):
        """The attention sublayer's HC mixer: weight, scale, base, and its input norm."""
        return self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, self.attn_norm

    @property
    def ffn_mixer(self):
        return self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, self.ffn_norm


@dataclass
class Weights:
    token_embd: torch.Tensor   # [V, E] float16 (replicated; one row per token)
    layers: list[LayerWeights]
    out_hc_fn: QTensor         # F16 (4, 4E)
    out_hc_scale: torch.Tensor
    out_hc_base: torch.Tensor
    out_norm: torch.Tensor
    output: QTensor            # Q8_0 (V_l, E) rows = this rank's vocabulary slice

    def mixer_after(self, il: int):
        """The mixer of the sublayer after layer il's FFN: the next layer's attention mixer, or
        None after the last layer (the output head mixes the streams itself)."""
        return self.layers[il + 1].attn_mixer if il + 1 < len(self.layers) else None

    @property
    def head_mixer(self):
        """The output head's stream mix as a mixer (weight, scale, base, norm) with n_hc logits
        only: its weights are a sublayer mixer's pre weights (sigmoid(z * scale[0] + base) + eps)
        and its input a sublayer's (RMS norm of their sum of the streams), with no post or M
        (triton_hc.hc_step's x-only form: the decode graphs' last stream update)."""
        return self.out_hc_fn, self.out_hc_scale, self.out_hc_base, self.out_norm

    @staticmethod
    def bind(t: dict, s: Shape) -> "Weights":
        """Bind GGUF tensor names to attributes, once."""
        def comp(p, kind):
            if p + f"{kind}_kv.weight" not in t:
                return None
            ape = t[p + f"{kind}_ape.weight"].float()          # (r, width)
            kv_gate, kv, gate = stacked(p + f"{kind}_kv.weight", p + f"{kind}_gate.weight")
            return CompressorWeights(ape.shape[0], ape, kv, gate, t[p + f"{kind}_norm.weight"], kv_gate)

        def stacked(*names):
            both = QTensor.cat_rows(*(t[n] for n in names))
            n0 = t[names[0]].shape[0]
            return both, both.row_slice(0, n0), both.row_slice(n0, both.shape[0])

        def _rows(tid2eid):        # the hash table as the kernels index it: [V, K] rows in place
            return tid2eid.contiguous() if tid2eid is not None else None
        layers = []
        for il in range(s.n_layer):
            p = f"blk.{il}."
            q_a_kv, q_a, kv = stacked(p + "attn_q_a.weight", p + "attn_kv.weight")
            gate_up_sh, gate_sh, up_sh = stacked(p + "ffn_gate_shexp.weight", p + "ffn_up_shexp.weight")
            layers.append(LayerWeights(
                il=il, ratio=s.ratio(il),
                hc_attn_fn=t[p + "hc_attn_fn.weight"], hc_attn_scale=t[p + "hc_attn_scale.weight"],
                hc_attn_base=t[p + "hc_attn_base.weight"], attn_norm=t[p + "attn_norm.weight"],
                q_a_kv=q_a_kv, q_a=q_a, q_a_norm=t[p + "attn_q_a_norm.weight"],
                q_b=t[p + "attn_q_b.weight"], kv=kv,
                kv_norm=t[p + "attn_kv_a_norm.weight"], sinks=t[p + "attn_sinks.weight"],
                out_a=t[p + "attn_output_a.weight"], out_b=t[p + "attn_output_b.weight"],
                comp=comp(p, "attn_compressor"), icomp=comp(p, "indexer_compressor"),
                idx_q_b=t.get(p + "indexer.attn_q_b.weight"), idx_proj=t.get(p + "indexer.proj.weight"),
                hc_ffn_fn=t[p + "hc_ffn_fn.weight"], hc_ffn_scale=t[p + "hc_ffn_scale.weight"],
                hc_ffn_base=t[p + "hc_ffn_base.weight"], ffn_norm=t[p + "ffn_norm.weight"],
                router=t[p + "ffn_gate_inp.weight"], router_bias=t.get(p + "exp_probs_b.bias"),
                tid2eid=_rows(t.get(p + "ffn_gate_tid2eid.weight")),
                gate_exps=t[p + "ffn_gate_exps.weight"], up_exps=t[p + "ffn_up_exps.weight"],
                down_exps=t[p + "ffn_down_exps.weight"], gate_up_sh=gate_up_sh,
                gate_sh=gate_sh, up_sh=up_sh, down_sh=t[p + "ffn_down_shexp.weight"]))
        return Weights(t["token_embd.weight"], layers, t["output_hc_fn.weight"],
                       t["output_hc_scale.weight"], t["output_hc_base.weight"],
                       t["output_norm.weight"], t["output.weight"])


# ================================ session state ===============================================
class Rows:
    """An append-only [n, width] float32 buffer with amortised growth (caches, histories).
    Rows live at buf[start:start+n]: dropping the oldest moves `start` and copies nothing; an
    append that would run past the end first moves the live rows to the front (or grows)."""

    def __init__(self, width: int, device, cap: int = 64):
        self.buf = torch.empty(cap, width, dtype=torch.float32, device=device)
        self.start = 0
        self.n = 0

    def append(self, rows: torch.Tensor) -> None:
        need = self.n + rows.shape[0]
        if self.start + need > self.buf.shape[0]:
            live = self.buf[self.start: self.start + self.n]
            if need > self.buf.shape[0]:
                new = torch.empty(max(need, 2 * self.buf.shape[0]), self.buf.shape[1],
                                  dtype=self.buf.dtype, device=self.buf.device)
                new[: self.n] = live
                self.buf = new
            elif self.n:
                # the live rows may overlap their new place: copy through a temporary
                self.buf[: self.n] = live.clone() if self.start < self.n else live
            self.start = 0
        self.buf[self.start + self.n: self.start + need] = rows
        self.n = need

    def drop_front(self, k: int) -> None:
        """Forget the k oldest rows."""
        if k <= 0:
            return
        k = min(k, self.n)
        self.start += k
        self.n -= k

    def view(self) -> torch.Tensor:
        return self.buf[self.start: self.start + self.n]


@dataclass
class CompressorState:
    """Per-position projections still needed for future emissions: positions [start, n)."""
    kv: Rows
    sc: Rows
    start: int = 0


@dataclass
class LayerState:
    raw: Rows                           # last <= n_swa raw KV rows, F16-rounded, oldest first
    comp: Rows | None = None            # compressed attention rows (all of them)
    comp_state: CompressorState | None = None
    index: Rows | None = None           # indexer rows (ratio-4 layers)
    index_state: CompressorState | None = None


@dataclass
class SessionState:
    n: int                              # tokens consumed; the next token's position
    layers: list[LayerState]
    tokens: list[int] = field(default_factory=list)

    def clone(self) -> "SessionState":
        return copy.deepcopy(self)


# ================================ hyper-connections (sec. 8) ==================================
@fused
def hc_split(z: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n_hc: int, iters: int):
    """Mix logits z [T, 2n+n^2] -> pre [T,n], post [T,n], M [T,n,n] (Sinkhorn, sec. 8.1)."""
    eps = C.HC_EPS
    pre = torch.sigmoid(z[:, :n_hc] * scale[0] + base[:n_hc]) + eps
    post = 2 * torch.sigmoid(z[:, n_hc: 2 * n_hc] * scale[1] + base[n_hc: 2 * n_hc])
    m = (z[:, 2 * n_hc:] * scale[2] + base[2 * n_hc:]).view(-1, n_hc, n_hc)   # M[r][c]
    m = torch.softmax(m, dim=-1).add_(eps)
    m.div_(m.sum(dim=-2, keepdim=True).add_(eps))        # columns
    for _ in range(iters - 1):
        m.div_(m.sum(dim=-1, keepdim=True).add_(eps))    # rows
        m.div_(m.sum(dim=-2, keepdim=True).add_(eps))    # columns
    return pre, post, m


@fused
def hc_flat(hc: torch.Tensor) -> torch.Tensor:
    """The mixer's input: all streams flattened, RMS-scaled over all n_hc*E values."""
    return rms_norm(hc.reshape(hc.shape[0], -1))


@fused
def hc_combine_torch(z, scale, base, hc, norm, n_hc: int, iters: int):
    """Mix logits -> the sublayer input x = sum_h pre[h]*H[h] RMS-normed with weight `norm`
    (the sublayer's attn_norm / ffn_norm), and post, M for hc_post."""
    pre, post, m = hc_split(z, scale, base, n_hc, iters)
    return rms_norm((pre[:, :, None] * hc).sum(1), norm), post, m


def hc_combine(z, scale, base, hc, norm, n_hc: int, iters: int):
    """The dispatch point: one Triton launch on CUDA (ds4tp.kernels.triton_hc; Sinkhorn's ~40
    dependent reductions otherwise run as as many tiny kernels), the torch twin elsewhere."""
    if kernels.on_gpu(hc):
        from ds4tp.kernels import triton_hc
        return triton_hc.hc_combine(z, scale, base, hc, norm, n_hc, iters, C.HC_EPS, C.RMS_EPS)
    return hc_combine_torch(z, scale, base, hc, norm, n_hc, iters)


def hc_logits_torch(hc: torch.Tensor, fn: QTensor) -> torch.Tensor:
    """The mixer logits [T, N] of the RMS-scaled flat streams (float activations x F16)."""
    return linear(fn, hc_flat(hc))


def hc_logits(hc: torch.Tensor, fn: QTensor) -> torch.Tensor:
    """The dispatch point: one decode token on CUDA takes one Triton launch (scale and matvec;
    compiled torch ran the float64 scale as three kernels before the matvec), else the twin."""
    if hc.shape[0] == 1 and fn.qtype == C.F16 and kernels.on_gpu(hc):
        from ds4tp.kernels import triton_hc
        return triton_hc.hc_logits(hc, fn.raw, C.RMS_EPS)
    return hc_logits_torch(hc, fn)


def hc_pre(hc: torch.Tensor, fn: QTensor, scale, base, norm, s: Shape):
    """hc [T, n_hc, E] -> the sublayer's normed input xn [T, E], post, M."""
    z = hc_logits(hc, fn)                                # [T, 24]
    return hc_combine(z, scale, base, hc, norm, s.n_hc, s.sinkhorn_iters)


@fused
def hc_post_torch(f: torch.Tensor, hc_in: torch.Tensor, post: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """H_out[i] = post[i]*f + sum_r M[r][i]*H_in[r]."""
    return post[:, :, None] * f[:, None, :] + torch.einsum("tri,tre->tie", m, hc_in)


def hc_post(f: torch.Tensor, hc_in: torch.Tensor, post: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The dispatch point: one Triton launch on CUDA (a batched [n, n] x [n, E] matmul per token
    is slow in cuBLAS; compiled, a decode step ran it as a GEMM plus a pointwise kernel)."""
    if kernels.on_gpu(hc_in) and not torch.compiler.is_compiling():
        from ds4tp.kernels import triton_hc
        return triton_hc.hc_post(f, hc_in, post, m)
    return hc_post_torch(f, hc_in, post, m)


def hc_post_pre(f, hc, post, m, mixer, s: Shape):
    """One sublayer's stream update, then the next sublayer's mixer on the new streams:
    f [T, E] (the sublayer's all-reduced output), hc [T, n, E], its post and M, and the next
    sublayer's mixer (weight, scale, base, norm) -> the new streams, the next sublayer's input
    xn [T, E], post and M (None for those three with no next mixer). The dispatch point: one
    Triton launch for a decode token on CUDA (triton_hc.hc_step: the update, the logits and
    Sinkhorn, three launches otherwise)."""
    if mixer is None:
        return hc_post(f, hc, post, m), None, None, None
    fn, scale, base, norm = mixer
    if (hc.shape[0] == 1 and fn.qtype == C.F16 and kernels.on_gpu(hc)
            and not torch.compiler.is_compiling()):
        from ds4tp.kernels import triton_hc
        if triton_hc.step_enabled():
            return triton_hc.hc_step(f, hc, post, m, fn.raw, scale, base, norm, s.n_hc,
                                     s.sinkhorn_iters, C.HC_EPS, C.RMS_EPS)
    hc = hc_post(f, hc, post, m)
    return (hc, *hc_pre(hc, fn, scale, base, norm, s))


# ================================ attention (sec. 9) ==========================================
def kv_cache_row(kv_n: torch.Tensor, cos, sin, s: Shape) -> torch.Tensor:
    """A raw KV row as the cache holds it: RoPE, FP8 of the non-RoPE dims, F16 (sec. 9.3)."""
    return f16_round(kv_row_quant(rope_tail(kv_n, cos, sin), s))


def kv_rows(kv_lin: torch.Tensor, norm, cos, sin, s: Shape, trace=None) -> torch.Tensor:
    """The raw KV rows as the cache holds them, from the attn_kv projection [T, D]: RMS norm
    with weight norm, then kv_cache_row. The dispatch point: one Triton launch on CUDA
    (triton_attn.kv_rows), the twin elsewhere (traced: the twin)."""
    if trace is None and kernels.on_gpu(kv_lin) and not torch.compiler.is_compiling():
        from ds4tp.kernels import triton_attn
        return triton_attn.kv_rows(kv_lin, norm, cos, sin, C.RMS_EPS)
    return kv_cache_row(rms_norm(kv_lin, norm), cos, sin, s)


@fused
def kv_row_quant(kv: torch.Tensor, s: Shape) -> torch.Tensor:
    """FP8 round trip of the non-RoPE dims of a KV row (sec. 9.3); the RoPE tail is left alone."""
    nope = s.head_dim - s.n_rot
    return torch.cat((fp8_e4m3_blocks(kv[..., :nope]), kv[..., nope:]), -1)


def pooled_channels(width: int, ratio: int) -> int:
    """Channels a compressor's projection of `width` pools into: a ratio-4 projection holds two
    window halves. The row width hd, or a rank's share of it where split by channel."""
    return width // (2 if ratio == 4 else 1)


def compress(cw: CompressorWeights, st: CompressorState, x: torch.Tensor, p0: int, hd: int,
             is_index: bool, s: Shape, trace=None, tag="", comm=None):
    """Step a compressor over T tokens at positions p0.. and return the rows they emit
    ([n_emit, hd], F16-rounded, plus the float32 rows before F16 where traced), or (None, None).
    Sec. 9.5. comm: gathers the ranks' pooled channels where the compressor is split."""
    return compress_layer([(cw, st, hd, is_index, tag)], x, p0, s, comm, trace)[0]


def compress_layer(jobs, x: torch.Tensor, p0: int, s: Shape, comm=None, trace=None):
    """`compress` for a layer's compressors at once, jobs [(weights, state, row width, is_index,
    trace tag)] of one ratio (a ratio-4 layer's kv and indexer compressors): they end their
    windows at the same tokens, so where they are split by channel their pooled shares travel
    in one all-gather. Returns each one's (rows, rows before F16 or None), or (None, None)."""
    r, T = jobs[0][0].ratio, x.shape[0]
    pos = torch.arange(p0, p0 + T, device=x.device)
    for cw, st, *_ in jobs:
        W = cw.kv.shape[0]
        both = linear(cw.kv_gate, x)                             # [T, 2 width] kv | gate, one launch
        st.kv.append(both[:, :W])
        st.sc.append(both[:, W:] + cw.ape[pos % r])
    n_end = p0 + T
    cs = range(p0 // r, n_end // r)            # rows c emitted here: (c+1)*r-1 in [p0, n_end)
    out = [(None, None)] * len(jobs)
    if cs:
        out = layer_rows([(cw, st.kv.view(), st.sc.view(), st.start, hd, is_index, tag)
                          for cw, st, hd, is_index, tag in jobs], cs, s, comm, trace)
    # keep only what future emissions read: the previous complete window (ratio 4) and the
    # current partial one
    new_start = max(0, (n_end // r - (1 if r == 4 else 0)) * r)
    for _, st, *_ in jobs:
        st.kv.drop_front(new_start - st.start)
        st.sc.drop_front(new_start - st.start)
        st.start = new_start
    return out


def compressed_rows(cw: CompressorWeights, all_kv, all_sc, base: int, cs: range, hd: int,
                    is_index: bool, s: Shape, trace=None, tag="", comm=None):
    """Compressed rows cs from a compressor's projections all_kv, all_sc [n, width] at
    positions base.. -> (rows [n_emit, hd] F16-rounded, the float32 rows before F16 or None).

    Each emitted row c pools, per channel, tokens [c*r, c*r+r) through the second half of the
    projection (ratio 4) or the whole projection (ratio 128), plus for ratio 4 the previous
    window [c*r-4, c*r) through the first half (the coff=2 overlap), softmax-weighted by the
    gate scores. It is RMS-normed and rotated at position c*r."""
    return layer_rows([(cw, all_kv, all_sc, base, hd, is_index, tag)], cs, s, comm, trace)[0]


def layer_rows(jobs, cs: range, s: Shape, comm=None, trace=None):
    """compressed_rows for a layer's compressors of one ratio, jobs [(weights, kv, sc, base,
    row width, is_index, trace tag)]. Where they are split by channel (each rank holds the same
    range of channels of each window half, shard.plan) every rank pools its channels, one
    all-gather brings every rank's, and the whole rows are finished. The dispatch point: on CUDA
    one Triton launch per compressor (triton_attn.compressor_rows), or where split its pool_only
    launch before the gather and compressor_finish after; the twins below (traced: this path)."""
    r, dev = jobs[0][0].ratio, jobs[0][1].device
    # (built on the device: a tensor from host values would wait for the GPU's queue)
    c = torch.arange(cs[0], cs[-1] + 1, device=dev)
    cos, sin = rope_cos_sin(c * r, s.n_rot, compressed=True, top=cs[-1] * r + 1)
    fast = False
    if trace is None and kernels.on_gpu(jobs[0][1]) and not torch.compiler.is_compiling():
        from ds4tp.kernels import triton_attn
        fast = triton_attn.rows_enabled()
    split = pooled_channels(jobs[0][1].shape[1], r) != jobs[0][4]   # this rank pools a share of hd
    if fast:   # whole rows, or where split this rank's pooled channels
        pooled = [triton_attn.compressor_rows(kv, sc, base, cs[0], len(cs), r, cw.norm, cos, sin,
                                              is_index, C.RMS_EPS, pool_only=split)
                  for cw, kv, sc, base, _, is_index, _ in jobs]
        if not split:
            return [(rows, None) for rows in pooled]
    else:
        pooled = [pool_rows_torch(kv, sc, base, c, r, pooled_channels(kv.shape[1], r))
                  for _, kv, sc, base, *_ in jobs]
    if split:
        sizes = [p.shape[1] for p in pooled]
        pooled = unpack_rows(comm.all_gather(pack_rows(pooled)), sizes)   # compressor rows all-gather
    out = []
    for (cw, _, _, _, _, is_index, tag), row in zip(jobs, pooled):
        if fast:
            out.append((triton_attn.compressor_finish(row, cw.norm, cos, sin, is_index, C.RMS_EPS), None))
            continue
        if trace is not None:
            trace[tag + "pooled"] = row
        out32 = finish_rows_torch(row, cw.norm, cos, sin, is_index, s)
        out.append((f16_round(out32), out32))
    return out


def pack_rows(parts: list) -> torch.Tensor:
    """A layer's compressors' pooled channels [n, c_i] side by side, for one all-gather."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def unpack_rows(gathered: torch.Tensor, sizes: list) -> list:
    """pack_rows all-gathered (every rank's [n, sum c] side by side, rank order) -> each
    compressor's whole rows [n, world * c_i], channels in rank order."""
    if len(sizes) == 1:
        return [gathered]
    g = gathered.view(gathered.shape[0], -1, sum(sizes))         # [n, world, sum c]
    return [t.reshape(t.shape[0], -1) for t in g.split(sizes, -1)]


def pool_rows_torch(all_kv, all_sc, base: int, c: torch.Tensor, r: int, hd: int) -> torch.Tensor:
    """The pooling of compressed_rows for rows c [n] over hd channels -> [n, hd]."""
    dev = all_kv.device
    if r == 4:   # previous window via the first half, current window via the second half
        prev = c[:, None] * 4 - 4 + torch.arange(4, device=dev)
        cur = c[:, None] * 4 + torch.arange(4, device=dev)
        cand = torch.cat((prev, cur), 1)                         # [n_emit, 8] positions
        half = (torch.arange(8, device=dev) >= 4).long()         # 0 0 0 0 1 1 1 1
    else:
        cand = c[:, None] * r + torch.arange(r, device=dev)
        half = torch.zeros(r, dtype=torch.long, device=dev)
    valid = cand >= 0
    rel = (cand - base).clamp_min(0)
    cols = half[None, :, None] * hd + torch.arange(hd, device=dev)   # [1, k, hd]
    v = all_kv[rel[:, :, None], cols]                            # [n_emit, k, hd]
    w = all_sc[rel[:, :, None], cols].masked_fill(~valid[:, :, None], C.NEG_INF)
    w = torch.softmax(w, dim=1)
    return (w * v).sum(1)                                        # [n_emit, hd]


def finish_rows_torch(pooled, norm, cos, sin, is_index: bool, s: Shape) -> torch.Tensor:
    """Pooled rows [n, hd] as the cache holds them, before F16: RMS norm, RoPE (cos/sin
    [n, n_rot/2]), then Hadamard + FP4 (index rows) or FP8 of the non-RoPE dims (kv rows)."""
    row = rope_tail(rms_norm(pooled, norm), cos, sin)
    return hadamard_fp4(row) if is_index else kv_row_quant(row, s)


def indexer_query(lw: LayerWeights, qrn, xn, cos, sin, s: Shape):
    """The indexer's queries [T, Hi_l, 128] over this rank's heads (RoPE, then Hadamard + FP4)
    and their head weights [T, Hi_l] (times 1/sqrt(head_dim * n_heads) in the scores)."""
    T = qrn.shape[0]
    q = linear(lw.idx_q_b, qrn).view(T, -1, s.indexer_head_dim)
    return hadamard_fp4(rope_tail(q, cos[:, None], sin[:, None])), linear(lw.idx_proj, xn)


def index_weight_scale(s: Shape) -> float:
    return 1.0 / math.sqrt(s.indexer_head_dim * s.n_indexer_head)


def index_scores_torch(q, w, keys, wscale: float):
    """Partial indexer scores [T, n_comp]: sum_h relu(q_h . K_c) * w_h * wscale."""
    dots = torch.relu(torch.einsum("thd,cd->thc", q, keys))      # [T, Hi_l, n_comp]
    return (dots * (w * wscale)[:, :, None]).sum(1)


def indexer_scores(lw: LayerWeights, qrn, xn, keys, cos, sin, s: Shape, trace=None):
    """Partial indexer scores [T, n_comp] over this rank's indexer heads (sec. 9.6):
    sum_h relu(q_h . K_c) * w_h, with q Hadamard+FP4'd after RoPE and w scaled by
    1/sqrt(head_dim * n_heads)."""
    q, w = indexer_query(lw, qrn, xn, cos, sin, s)
    if trace is not None:
        trace.update(index_q=q, index_weights=w * index_weight_scale(s))
    return index_scores_torch(q, w, keys, index_weight_scale(s))


@fused
def select_rows(score: torch.Tensor, n_visible: torch.Tensor, top_k: int):
    """Allowed-row mask [T, n_comp] and the selected ids [T, top_k] (-1 where a token sees
    all its rows): top_k by descending score among the visible rows, ties to the lower row
    (a stable descending sort keeps index order among equal scores)."""
    visible = torch.arange(score.shape[1], device=score.device)[None, :] < n_visible[:, None]
    order = torch.sort(score.masked_fill(~visible, float("-inf")), dim=-1, descending=True,
                       stable=True).indices[:, :top_k]
    mask = torch.zeros_like(visible).scatter_(1, order, True) & visible
    full = (n_visible <= top_k)[:, None]                         # few rows: all visible
    return torch.where(full, visible, mask), torch.where(full, -1, order)


@fused
def attend(q, raw, raw_pos, comp, comp_mask, pos, sinks, s: Shape) -> torch.Tensor:
    """Attention with sinks over raw-window and compressed rows in one softmax (sec. 9.7).

    q [T, H_l, D]; raw [L, D] at positions raw_pos; comp [C, D] with comp_mask [T, C]. K = V
    (one KV head). Token t sees raw rows in (pos-n_swa, pos] and the compressed rows its mask
    allows; each head's sink logit joins the max and the denominator but adds no value.
    """
    T = q.shape[0]
    scale = 1.0 / math.sqrt(s.head_dim)
    raw_ok = (raw_pos[None, :] <= pos[:, None]) & (raw_pos[None, :] > pos[:, None] - s.n_swa)
    logits = [sinks.view(1, -1, 1).expand(T, -1, 1),
              torch.einsum("thd,ld->thl", q, raw).mul_(scale).masked_fill_(~raw_ok[:, None, :], float("-inf"))]
    has_comp = comp is not None and comp.shape[0] > 0
    if has_comp:
        logits.append(torch.einsum("thd,cd->thc", q, comp).mul_(scale)
                      .masked_fill_(~comp_mask[:, None, :], float("-inf")))
    w = torch.softmax(torch.cat(logits, -1), dim=-1)
    n_raw = raw.shape[0]
    o = torch.einsum("thl,ld->thd", w[..., 1: 1 + n_raw], raw)
    if has_comp:
        o = o + torch.einsum("thc,cd->thd", w[..., 1 + n_raw:], comp)
    return o


ATTN_QUERY_CHUNK = 256


def query_chunks(T: int, raw_prev: int, n_swa: int, chunk: int = ATTN_QUERY_CHUNK):
    """(a, b, lo, hi): queries [a, b) of this call and the raw cache rows [lo, hi) their windows
    reach (the cache holds raw_prev older rows, then this call's T rows; query i sits at row
    raw_prev + i and sees rows (raw_prev + i - n_swa, raw_prev + i]). Bounds the [T, H, keys]
    scores of a prefill and skips the rows no query of a chunk can see."""
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        yield a, b, max(0, raw_prev + a - n_swa + 1), raw_prev + b


def attend_many(q, cos, sin, raw, raw_prev: int, raw_pos, comp, comp_mask, p0: int, pos,
                ratio: int, sinks, s: Shape, trace=None) -> torch.Tensor:
    """Every query of a call: q [T, H_l, D] (before RoPE) at positions pos = p0.. with their
    RoPE tables cos, sin [T, n_rot/2], over the raw cache rows raw (positions raw_pos =
    p0 - raw_prev ..) and the compressed rows comp with comp_mask [T, C] -> the heads after the
    inverse RoPE [T, H_l, D]. The dispatch point: one Triton launch for the whole call on CUDA
    (triton_attn.prefill_attention, both rotations inside); the twin rotates, attends in query
    chunks, each over the raw rows its window reaches and the compressed rows emitted up to its
    last token ((pos+1)//ratio rows are visible), and rotates back (traced: this path)."""
    T = q.shape[0]
    if trace is None and T > 1 and kernels.on_gpu(q) and not torch.compiler.is_compiling():
        from ds4tp.kernels import triton_attn
        if triton_attn.prefill_enabled():
            return triton_attn.prefill_attention(q.contiguous(), raw, raw_prev, comp, comp_mask, p0,
                                                 ratio, sinks, s.n_swa, rope=(cos, sin))
    q = rope_tail(q, cos[:, None], sin[:, None])
    parts = []
    for a, b, lo, hi in query_chunks(T, raw_prev, s.n_swa):
        c = cm = None
        if comp is not None:
            c = comp[: min(comp.shape[0], (p0 + b) // ratio)]
            cm = comp_mask[a:b, : c.shape[0]]
        parts.append(attend(q[a:b], raw[lo:hi], raw_pos[lo:hi], c, cm, pos[a:b], sinks, s))
    o = torch.cat(parts)
    if trace is not None:
        trace.update(q=q, heads=o)
    o = rope_tail(o, cos[:, None], sin[:, None], inverse=True)
    if trace is not None:
        trace["heads_inv_rope"] = o
    return o


def grouped_linear_out(lw: LayerWeights, o: torch.Tensor, s: Shape, mix=None) -> torch.Tensor:
    """Grouped low-rank output (sec. 9.8): o [T, H_l, D] -> this rank's partial [T, E].
    Each output group maps its heads to o_lora dims; this rank's groups are exactly its heads,
    and attn_output_b holds the matching input columns (row-parallel, summed by all-reduce).
    mix: the next HC update's Sinkhorn for attn_output_b's launch to carry (ops.linear)."""
    T = o.shape[0]
    low = grouped_linear(lw.out_a, o.reshape(T, -1, s.group_in))  # [T, G_l, o_lora]
    return linear(lw.out_b, low.reshape(T, -1), mix)


def attention(lw: LayerWeights, ls: LayerState, xn: torch.Tensor, p0: int, pos: torch.Tensor,
              s: Shape, comm, trace=None) -> torch.Tensor:
    """Attention sublayer: its mixed, normed input xn [T, E] at positions pos = p0 .. p0+T-1 ->
    its all-reduced output [T, E]. Rows of this call are pushed to the caches in `ls` before
    attending (a token sees its own row). Position bounds come from p0 on the host: reading
    them from pos would wait for the GPU."""
    T, D = xn.shape[0], s.head_dim
    qa, kv_lin = linear(lw.q_a_kv, xn).split([lw.q_a.shape[0], D], -1)   # one launch for both
    qrn = rms_norm(qa, lw.q_a_norm)                              # [T, q_lora]
    q = linear(lw.q_b, qrn).view(T, -1, D)                       # [T, H_l, D] this rank's heads
    q = rms_norm(q)                                              # per-head, unweighted
    compressed = lw.ratio > 0
    cos, sin = rope_cos_sin(pos, s.n_rot, compressed, top=p0 + T)
    if trace is not None:
        trace.update(qr_norm=qrn, q_pre_rope=q, kv_normed=rms_norm(kv_lin, lw.kv_norm))
    kv = kv_rows(kv_lin, lw.kv_norm, cos, sin, s, trace)        # [T, D] single shared KV head, cached form
    raw_prev = ls.raw.n
    ls.raw.append(kv)
    raw = ls.raw.view()                                          # positions [p0-raw_prev, p0+T)
    raw_pos = torch.arange(p0 - raw_prev, p0 + T, device=xn.device)

    comp = comp_mask = None
    if compressed:
        jobs = [(lw.comp, ls.comp_state, D, False, "comp_")]
        if lw.ratio == 4:
            jobs.append((lw.icomp, ls.index_state, s.indexer_head_dim, True, "index_comp_"))
        (rows, rows32), *index_rows = compress_layer(jobs, xn, p0, s, comm, trace)
        if rows is not None:
            ls.comp.append(rows)
        if lw.ratio == 4:
            irows, irows32 = index_rows[0]
            if irows is not None:
                ls.index.append(irows)
            if trace is not None:
                trace.update(index_comp_kv_f32=irows32, index_comp_kv=irows)
        if trace is not None:
            trace.update(comp_kv_f32=rows32, comp_kv=rows)
        comp = ls.comp.view()                                    # [n_comp, D]
        n_vis = (pos + 1) // lw.ratio                            # rows visible to each token
        comp_mask = torch.arange(comp.shape[0], device=xn.device)[None, :] < n_vis[:, None]
        if lw.ratio == 4 and (p0 + T) // lw.ratio > s.indexer_top_k:   # n_vis.max()
            score = indexer_scores(lw, qrn, xn, ls.index.view(), cos, sin, s, trace)
            score = comm.all_reduce(score)                       # indexer-score all-reduce (heads split)
            comp_mask, selected = select_rows(score, n_vis, s.indexer_top_k)
            if trace is not None:
                trace.update(index_scores=score, index_selected=selected)
    if trace is not None:
        trace["kv"] = kv

    # [T, H_l, D]: RoPE on the queries, attention, inverse RoPE on the heads
    o = attend_many(q, cos, sin, raw, raw_prev, raw_pos, comp, comp_mask, p0, pos, lw.ratio,
                    lw.sinks, s, trace)

    out = grouped_linear_out(lw, o, s)                           # [T, E] partial over groups
    out = comm.all_reduce(out)                                   # attention output all-reduce
    if trace is not None:
        trace["attn_out"] = out
    # keep the raw window to its last n_swa rows
    ls.raw.drop_front(ls.raw.n - s.n_swa)
    return out


# ================================ MoE FFN (sec. 10) ===========================================
def route(lw: LayerWeights, xn: torch.Tensor, tokens: torch.Tensor, s: Shape):
    """Expert ids [T, K] (global) and weights [T, K] (sec. 10.2)."""
    return choose(lw, linear(lw.router, xn), tokens, s)         # [T, n_expert] float x F16


def choose(lw: LayerWeights, logits: torch.Tensor, tokens: torch.Tensor, s: Shape):
    """route's choice from the router logits. The dispatch point: on CUDA one Triton launch
    selects for every token (kernels/triton_route.py), else the twin below (the hash table
    lookup and route_select)."""
    if kernels.on_gpu(logits) and not torch.compiler.is_compiling():
        from ds4tp.kernels import triton_route
        return triton_route.route(logits, lw.router_bias, lw.tid2eid, tokens.reshape(-1)[-logits.shape[0]:],
                                  s.n_expert_used, C.ROUTER_WEIGHT_FLOOR, C.EXPERT_WEIGHT_SCALE)
    hashed = lw.tid2eid[tokens] if lw.tid2eid is not None else None   # hash layer: ids by token
    return route_select(logits, lw.router_bias, hashed, s.n_expert_used)


@fused
def route_select(logits, bias, hashed_ids, k: int):
    """sqrt(softplus) scores; the top-k of score+bias (descending, ties to the lower id) unless
    a hash layer gave the ids; weights = scores normalised over the k, times 1.5."""
    p = torch.sqrt(softplus(logits))
    if hashed_ids is not None:
        ids = hashed_ids
    else:
        score = p + bias if bias is not None else p
        ids = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]
    ps = torch.gather(p, 1, ids)
    w = ps / ps.sum(-1, keepdim=True).clamp_min(C.ROUTER_WEIGHT_FLOOR) * C.EXPERT_WEIGHT_SCALE
    return ids, w


@fused
def local_expert_ids(ids: torch.Tensor, first: int, n_local: int) -> torch.Tensor:
    """Global expert ids -> this rank's local indices, -1 where the expert lives elsewhere."""
    loc = ids - first
    return torch.where((loc >= 0) & (loc < n_local), loc, -1)


SHARED_LANE = 2    # the shared expert's side stream (streams.LANE_PRIORITY; benchmarks time others)


def ffn(lw: LayerWeights, xn: torch.Tensor, tokens: torch.Tensor, s: Shape, comm, rank: int,
        trace=None, overlap: bool = False, reduce: bool = True, mix=None) -> torch.Tensor:
    """MoE FFN sublayer: its mixed, normed input xn [T, E] -> its all-reduced output [T, E]
    (reduce=False: this rank's part, for a caller that sums it in its next launch). mix: the
    next HC update's Sinkhorn for the routed down's launch to carry (ops.expert_down_shared)."""
    if trace is None and shared_rides(xn):
        # one token on CUDA: the shared expert's rows ride in the routed experts' two launches
        # (in launches of its own, even on a second stream, it waited for the SMs the routed
        # ones hold: bench/critical_path.py)
        logits = linear(lw.router, xn)                           # [1, n_expert]
        got = None
        # every expert here: the choice in the gate/up launch, not a launch of its own between
        # the router and it (the step 2.9% / 1.7% faster at TP=2 / TP=1, s26c)
        if lw.gate_exps.shape[0] == s.n_expert:
            got = expert_swiglu_routed(lw.gate_exps, lw.up_exps, lw.gate_up_sh, xn, logits,
                                       lw.router_bias, lw.tid2eid, tokens.reshape(-1)[-1:],
                                       s.n_expert_used, C.ROUTER_WEIGHT_FLOOR,
                                       C.EXPERT_WEIGHT_SCALE, C.SWIGLU_CLAMP)
        if got is not None:
            mid, gate_up, local_ids, _ = got
        else:
            ids, w = choose(lw, logits, tokens, s)
            local_ids = _local_ids(lw, ids, s, rank)
            mid, gate_up = expert_swiglu_shared(lw.gate_exps, lw.up_exps, lw.gate_up_sh, xn,
                                                local_ids, w, C.SWIGLU_CLAMP)
        out = expert_down_shared(lw.down_exps, mid, local_ids, lw.down_sh, gate_up, C.SWIGLU_CLAMP,
                                 mix)
        return comm.all_reduce(out) if reduce else out           # FFN all-reduce (routed + shared)
    # with overlap, one decode token on CUDA: the shared expert on a second stream, beside the
    # router and the routed experts (a prefill's GEMMs fill the GPU on their own)
    side = Side(xn, overlap and xn.shape[0] == 1, lane=SHARED_LANE)
    with side:
        gate_up = linear(lw.gate_up_sh, xn)                          # [T, 2F_l] gate | up, one launch
        shared = swiglu_linear(lw.down_sh, gate_up, C.SWIGLU_CLAMP)  # [T, E] partial over FFN width
    ids, w = route(lw, xn, tokens, s)
    local_ids = _local_ids(lw, ids, s, rank)
    # gate/up with Q8_K(xn) shared by the K slots, clamped SwiGLU, router weight before down
    mid = expert_swiglu(lw.gate_exps, lw.up_exps, xn, local_ids, w, C.SWIGLU_CLAMP)   # [T, K, F_l]
    routed = expert_linear(lw.down_exps, mid, local_ids, sum_slots=True)  # [T, E] partial; Q8_K per slot
    side.join()
    if trace is not None:
        trace.update(expert_ids=ids, expert_weights=w, moe_out=routed, shared_out=shared)
    out = routed + shared
    return comm.all_reduce(out) if reduce else out               # FFN all-reduce (routed + shared)


def _local_ids(lw: LayerWeights, ids: torch.Tensor, s: Shape, rank: int) -> torch.Tensor:
    """This rank's experts: all of them with a slice of each one's FFN width ("ff" split: the
    ids are local ids), or a contiguous range of whole experts ("experts" split; others' slots
    give -1, so zeros here)."""
    n_local = lw.gate_exps.shape[0]
    if n_local == s.n_expert:
        return ids
    return local_expert_ids(ids, rank * n_local, n_local)


# ================================ output head (sec. 11) =======================================
def output_head(wt: Weights, hc: torch.Tensor, s: Shape, comm, trace=None) -> torch.Tensor:
    z = hc_logits(hc, wt.out_hc_fn)                              # [T, n_hc]
    hw = torch.sigmoid(z * wt.out_hc_scale[0] + wt.out_hc_base) + C.HC_EPS
    x = (hw[:, :, None] * hc).sum(1)
    xn = rms_norm(x, wt.out_norm)
    if trace is not None:
        trace.update(out_hc_weights=hw, out_embd=x, out_norm=xn)
    return output_logits(wt, xn, comm)


def output_logits(wt: Weights, xn: torch.Tensor, comm) -> torch.Tensor:
    """The head's normed input xn [T, E] -> the logits [T, V]."""
    logits = linear(wt.output, xn)                               # [T, V_l] this rank's vocab rows
    return comm.all_gather(logits, dim=-1)                       # logits gather -> [T, V]


# ================================ the model ===================================================
class DS4Model:
    def __init__(self, shape: Shape, weights: Weights, *, rank: int = 0, world: int = 1, comm=None,
                 device="cpu", overlap: bool = True):
        self.shape, self.w = shape, weights
        self.rank, self.world = rank, world
        self.overlap = overlap      # CUDA: independent sublayer work on a second stream (streams.py)
        self.comm = comm if comm is not None else SingleComm()
        self.device = torch.device(device)
        if self.device.type == "cuda":
            kernels.prepare_weights(weights)        # (rows re-ordered for the decode kernels)

    @classmethod
    def load(cls, path, *, rank: int = 0, world: int = 1, comm=None, device="cpu") -> "DS4Model":
        """Open and check the GGUF, then read this rank's shard of every tensor."""
        from ds4tp.gguf_file import open_ds4
        from ds4tp.shard.load import load_rank
        from ds4tp.shard.plan import plan_for_file

        f = open_ds4(path)
        plan = plan_for_file(f, world)
        tensors = load_rank(f, plan, rank, device)
        m = cls(f.shape, Weights.bind(tensors, f.shape), rank=rank, world=world, comm=comm, device=device)
        m.plan = plan
        return m

    def new_state(self) -> SessionState:
        s, dev = self.shape, self.device
        layers = []
        for il, lw in enumerate(self.w.layers):
            r = s.ratio(il)
            ls = LayerState(raw=Rows(s.head_dim, dev, cap=2 * s.n_swa))
            if r:
                width = lw.comp.kv.shape[0]          # this rank's channels of both window halves
                ls.comp = Rows(s.head_dim, dev)
                ls.comp_state = CompressorState(Rows(width, dev, cap=2 * r), Rows(width, dev, cap=2 * r))
            if r == 4:
                iw = lw.icomp.kv.shape[0]
                ls.index = Rows(s.indexer_head_dim, dev)
                ls.index_state = CompressorState(Rows(iw, dev, cap=8), Rows(iw, dev, cap=8))
            layers.append(ls)
        return SessionState(0, layers)

    @torch.no_grad()
    def forward(self, tokens, state: SessionState, *, all_logits: bool = False, trace=None):
        """Consume `tokens` at positions state.n.. and return logits: [V] after the last token,
        or [T, V] for every token with all_logits. T > 1 is a batched prefill, T == 1 decode.

        trace: optional dict; per-layer intermediates are stored under "<layer>.<stage>".
        """
        s = self.shape
        # checked and kept on the host: no device round trip before or after the launches
        ids = [int(t) for t in (tokens.reshape(-1).tolist() if torch.is_tensor(tokens) else tokens)]
        if not ids:
            raise ValueError("forward needs at least one token")
        if min(ids) < 0 or max(ids) >= s.vocab:
            raise ValueError(f"token id out of range [0, {s.vocab})")
        tok = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
        T = len(ids)
        pos = torch.arange(state.n, state.n + T, device=self.device)
        e = self.w.token_embd[tok].float()                       # [T, E]
        hc = e[:, None, :].expand(T, s.n_hc, s.n_embd).contiguous()   # 4 equal streams
        # Each sublayer's stream update (hc_post) and the next sublayer's mixer (hc_pre) are one
        # step, hc_post_pre (one launch for a decode token); the first mixer stands alone.
        xn, post, m = hc_pre(hc, *self.w.layers[0].attn_mixer, s)
        for lw, ls in zip(self.w.layers, state.layers):
            lt = {} if trace is not None else None
            if lt is not None:
                lt.update(hc=hc, hc_split=(post, m), attn_in=xn)
            out = attention(lw, ls, xn, state.n, pos, s, self.comm, lt)
            hc, xn, post, m = hc_post_pre(out, hc, post, m, lw.ffn_mixer, s)
            if lt is not None:
                lt.update(hc_mid=hc, ffn_split=(post, m), ffn_in=xn)
            f = ffn(lw, xn, tok, s, self.comm, self.rank, lt, self.overlap)
            hc, xn, post, m = hc_post_pre(f, hc, post, m, self.w.mixer_after(lw.il), s)
            if lt is not None:
                trace.update({f"{lw.il}.{k}": v for k, v in lt.items()})
        if trace is not None:
            trace["final_hc"] = hc
        state.n += T
        state.tokens.extend(ids)
        head_in = hc if all_logits else hc[-1:]
        logits = output_head(self.w, head_in, s, self.comm, trace)
        return logits if all_logits else logits[0]
