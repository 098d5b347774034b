"""DeepSeek V4 Flash shape and constants, and the GGUF layout they imply.

ds4 hard-codes one shape; we keep the same constants for the real model and allow the smaller
shapes of the golden and synthetic models, which differ only in the numbers below. Everything
that is not a shape number (RoPE bases, YaRN, clamps, eps, scales) is fixed for every shape and
checked against the GGUF metadata once, at load (see `ds4tp.gguf_file`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# GGML type ids used by DS4 GGUFs (the subset of gguf.GGMLQuantizationType we support).
F32, F16, Q8_0, Q2_K, Q4_K, IQ2_XXS, I32 = 0, 1, 8, 10, 12, 16, 26
TYPE_NAMES = {F32: "F32", F16: "F16", Q8_0: "Q8_0", Q2_K: "Q2_K", Q4_K: "Q4_K",
              IQ2_XXS: "IQ2_XXS", I32: "I32"}
# (elements per block, bytes per block)
BLOCK = {F32: (1, 4), F16: (1, 2), Q8_0: (32, 34), Q2_K: (256, 84), Q4_K: (256, 144),
         IQ2_XXS: (256, 66), I32: (1, 4)}
ROUTED_EXPERT_TYPES = (IQ2_XXS, Q2_K, Q4_K)


def type_name(t: int) -> str:
    return TYPE_NAMES.get(t, f"type#{t}")


def nbytes_of(qtype: int, n_elements: int) -> int:
    epb, bpb = BLOCK[qtype]
    assert n_elements % epb == 0, (qtype, n_elements)
    return n_elements // epb * bpb


# Fixed scalar constants (spec section 1); identical for every shape.
RMS_EPS = 1e-6
HC_EPS = 1e-6
EXPERT_WEIGHT_SCALE = 1.5
SWIGLU_CLAMP = 10.0
ROPE_FREQ_BASE = 10000.0
COMPRESS_ROPE_FREQ_BASE = 160000.0
ROPE_SCALE_FACTOR = 16.0
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0
ROPE_ORIG_CTX = 65536
NEG_INF = -1e30
ROUTER_WEIGHT_FLOOR = 6.103515625e-5  # 2**-14, floor of the selected-score sum


@dataclass(frozen=True)
class Shape:
    """The shape numbers of a DS4-architecture model. `FULL` is DeepSeek V4 Flash."""
    n_layer: int = 43
    n_embd: int = 4096
    vocab: int = 129280
    n_head: int = 64
    head_dim: int = 512          # key = value width; single shared KV head
    n_rot: int = 64              # RoPE on the last n_rot dims of each head
    n_out_group: int = 8
    q_lora: int = 1024
    o_lora: int = 1024
    n_expert: int = 256
    n_expert_used: int = 6
    n_ff_exp: int = 2048
    n_hash_layer: int = 3
    n_swa: int = 128
    n_indexer_head: int = 64
    indexer_head_dim: int = 128
    indexer_top_k: int = 512
    n_hc: int = 4
    sinkhorn_iters: int = 20

    # ---- derived ------------------------------------------------------------------------
    def ratio(self, il: int) -> int:
        """Compression ratio of layer il: 0 for the first two, then 4 (even) / 128 (odd)."""
        if il < 2:
            return 0
        return 4 if il % 2 == 0 else 128

    @property
    def compress_ratios(self) -> list[int]:
        return [self.ratio(il) for il in range(self.n_layer)]

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def hc_dim(self) -> int:
        return self.n_hc * self.n_embd

    @property
    def hc_mix(self) -> int:
        return 2 * self.n_hc + self.n_hc * self.n_hc

    @property
    def heads_per_group(self) -> int:
        return self.n_head // self.n_out_group

    @property
    def group_in(self) -> int:
        return self.heads_per_group * self.head_dim

    @property
    def out_low(self) -> int:
        return self.n_out_group * self.o_lora

    def validate(self) -> None:
        problems = []
        if self.n_head % self.n_out_group:
            problems.append("n_head must be a multiple of n_out_group")
        if self.n_rot % 2 or self.n_rot > min(self.head_dim, self.indexer_head_dim):
            problems.append("n_rot must be even and fit in both head dims")
        if (self.head_dim - self.n_rot) % 64:
            problems.append("head_dim - n_rot must be a multiple of 64 (FP8 KV blocks)")
        if self.indexer_head_dim % 32 or self.indexer_head_dim & (self.indexer_head_dim - 1):
            problems.append("indexer_head_dim must be a power of two (Hadamard), multiple of 32")
        for name, v in (("n_embd", self.n_embd), ("n_ff_exp", self.n_ff_exp)):
            if v % 256:
                problems.append(f"{name} must be a multiple of 256 (K-quant super-blocks)")
        for name, v in (("q_lora", self.q_lora), ("o_lora", self.o_lora),
                        ("head_dim", self.head_dim)):
            if v % 32:
                problems.append(f"{name} must be a multiple of 32 (Q8_0 blocks)")
        if self.n_expert_used > self.n_expert:
            problems.append("n_expert_used > n_expert")
        if problems:
            raise ValueError("invalid DS4 shape: " + "; ".join(problems))


FULL = Shape()
# The golden shapes (shared/golden/README.md). `small` differs from `tiny` only in n_embd,
# the expert width and the two LoRA ranks.
TINY = Shape(n_layer=6, n_embd=256, vocab=3072, n_head=8, head_dim=256, n_out_group=2,
             q_lora=128, o_lora=128, n_expert=16, n_ff_exp=256, n_swa=32, n_indexer_head=8,
             indexer_top_k=16)
SMALL = dataclasses.replace(TINY, n_embd=512, n_ff_exp=512, q_lora=256, o_lora=256)
PRESETS = {"tiny": TINY, "small": SMALL, "full": FULL}


# ---- GGUF metadata --------------------------------------------------------------------------
ARCH = "deepseek4"

# key -> Shape field, for u32 shape keys (must be exactly UINT32 in the file).
SHAPE_KEYS = {
    "block_count": "n_layer",
    "embedding_length": "n_embd",
    "vocab_size": "vocab",
    "attention.head_count": "n_head",
    "attention.key_length": "head_dim",
    "attention.value_length": "head_dim",
    "rope.dimension_count": "n_rot",
    "attention.q_lora_rank": "q_lora",
    "attention.output_lora_rank": "o_lora",
    "attention.output_group_count": "n_out_group",
    "expert_count": "n_expert",
    "expert_used_count": "n_expert_used",
    "expert_feed_forward_length": "n_ff_exp",
    "hash_layer_count": "n_hash_layer",
    "attention.sliding_window": "n_swa",
    "attention.indexer.head_count": "n_indexer_head",
    "attention.indexer.key_length": "indexer_head_dim",
    "attention.indexer.top_k": "indexer_top_k",
    "hyper_connection.count": "n_hc",
    "hyper_connection.sinkhorn_iterations": "sinkhorn_iters",
}
# Fixed u32 keys (same value for every shape).
FIXED_U32 = {"attention.head_count_kv": 1, "expert_shared_count": 1}
OPTIONAL_U32_ZERO = ("expert_group_count", "expert_group_used_count")
# Fixed float keys.
FIXED_F32 = {
    "rope.freq_base": ROPE_FREQ_BASE,
    "attention.compress_rope_freq_base": COMPRESS_ROPE_FREQ_BASE,
    "rope.scaling.factor": ROPE_SCALE_FACTOR,
    "rope.scaling.yarn_beta_fast": YARN_BETA_FAST,
    "rope.scaling.yarn_beta_slow": YARN_BETA_SLOW,
    "expert_weights_scale": EXPERT_WEIGHT_SCALE,
    "attention.layer_norm_rms_epsilon": RMS_EPS,
    "hyper_connection.epsilon": HC_EPS,
}
FIXED_INT_ANY = {"rope.scaling.original_context_length": ROPE_ORIG_CTX}  # u32 or u64


def float_matches(got: float, want: float) -> bool:
    return abs(got - want) <= max(1.0, abs(want)) * 1e-6


# ---- tensor layout --------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    types: tuple[int, ...]   # accepted GGML types
    dims: tuple[int, ...]    # GGUF order: ne0 (contiguous) first
    optional: bool = False


def expected_tensors(s: Shape, *, with_hash_bias: bool = False) -> dict[str, TensorSpec]:
    """Every tensor of a DS4 GGUF of shape `s`, in file order, with types and GGUF dims.

    Routed experts accept IQ2_XXS, Q2_K or Q4_K (gate and up must match; checked by the
    loader). `exp_probs_b.bias` is expected on the non-hash layers and accepted (optional) on
    the hash layers, where ds4 never reads it.
    """
    out: dict[str, TensorSpec] = {}

    def add(name, types, dims, optional=False):
        if isinstance(types, int):
            types = (types,)
        out[name] = TensorSpec(name, tuple(types), tuple(int(d) for d in dims), optional)

    E, V, hc = s.n_embd, s.vocab, s.hc_dim
    add("token_embd.weight", F16, (E, V))
    for il in range(s.n_layer):
        p = f"blk.{il}."
        r = s.ratio(il)
        add(p + "hc_attn_fn.weight", F16, (hc, s.hc_mix))
        add(p + "hc_attn_scale.weight", F32, (3,))
        add(p + "hc_attn_base.weight", F32, (s.hc_mix,))
        add(p + "attn_norm.weight", F32, (E,))
        add(p + "attn_q_a.weight", Q8_0, (E, s.q_lora))
        add(p + "attn_q_a_norm.weight", F32, (s.q_lora,))
        add(p + "attn_q_b.weight", Q8_0, (s.q_lora, s.q_dim))
        add(p + "attn_kv.weight", Q8_0, (E, s.head_dim))
        add(p + "attn_kv_a_norm.weight", F32, (s.head_dim,))
        add(p + "attn_sinks.weight", F32, (s.n_head,))
        add(p + "attn_output_a.weight", Q8_0, (s.group_in, s.out_low))
        add(p + "attn_output_b.weight", Q8_0, (s.out_low, E))
        if r:
            coff = 2 if r == 4 else 1
            width = coff * s.head_dim
            add(p + "attn_compressor_ape.weight", F16, (width, r))
            add(p + "attn_compressor_kv.weight", F16, (E, width))
            add(p + "attn_compressor_gate.weight", F16, (E, width))
            add(p + "attn_compressor_norm.weight", F32, (s.head_dim,))
        if r == 4:
            iw = 2 * s.indexer_head_dim
            add(p + "indexer.attn_q_b.weight", F16, (s.q_lora, s.n_indexer_head * s.indexer_head_dim))
            add(p + "indexer.proj.weight", F16, (E, s.n_indexer_head))
            add(p + "indexer_compressor_ape.weight", F16, (iw, 4))
            add(p + "indexer_compressor_kv.weight", F16, (E, iw))
            add(p + "indexer_compressor_gate.weight", F16, (E, iw))
            add(p + "indexer_compressor_norm.weight", F32, (s.indexer_head_dim,))
        add(p + "hc_ffn_fn.weight", F16, (hc, s.hc_mix))
        add(p + "hc_ffn_scale.weight", F32, (3,))
        add(p + "hc_ffn_base.weight", F32, (s.hc_mix,))
        add(p + "ffn_norm.weight", F32, (E,))
        add(p + "ffn_gate_inp.weight", F16, (E, s.n_expert))
        is_hash = il < s.n_hash_layer
        if not is_hash or with_hash_bias:
            add(p + "exp_probs_b.bias", F32, (s.n_expert,), optional=is_hash)
        add(p + "ffn_gate_exps.weight", ROUTED_EXPERT_TYPES, (E, s.n_ff_exp, s.n_expert))
        add(p + "ffn_up_exps.weight", ROUTED_EXPERT_TYPES, (E, s.n_ff_exp, s.n_expert))
        add(p + "ffn_down_exps.weight", ROUTED_EXPERT_TYPES, (s.n_ff_exp, E, s.n_expert))
        add(p + "ffn_gate_shexp.weight", Q8_0, (E, s.n_ff_exp))
        add(p + "ffn_up_shexp.weight", Q8_0, (E, s.n_ff_exp))
        add(p + "ffn_down_shexp.weight", Q8_0, (s.n_ff_exp, E))
        if is_hash:
            add(p + "ffn_gate_tid2eid.weight", I32, (s.n_expert_used, V))
    add("output_hc_fn.weight", F16, (hc, s.n_hc))
    add("output_hc_scale.weight", F32, (1,))
    add("output_hc_base.weight", F32, (s.n_hc,))
    add("output_norm.weight", F32, (E,))
    add("output.weight", Q8_0, (E, V))
    return out


def yarn_corr_dims(s: Shape) -> tuple[float, float]:
    """YaRN ramp bounds (lo, hi) for the compressed layers (spec 9.2): 15 and 25."""
    def d(beta):
        return s.n_rot * math.log(ROPE_ORIG_CTX / (2 * math.pi * beta)) / (2 * math.log(COMPRESS_ROPE_FREQ_BASE))
    lo = max(0, math.floor(d(YARN_BETA_FAST)))
    hi = min(s.n_rot - 1, math.ceil(d(YARN_BETA_SLOW)))
    return float(lo), float(hi)
