"""The tensor-parallel shard plan: a table from tensor-name pattern to split rule, applied here.

Split kinds (on the logical torch shape, input dim last; routed experts are (expert, out, in)):
  replicate  every rank holds the whole tensor
  rows       output rows split into `world` equal contiguous ranges of whole units (heads, output
             groups, expert-FFN rows, vocabulary rows); for routed experts the per-expert rows
  cols       input columns split into equal contiguous ranges; must land on quant-block
             boundaries so per-block activation quantisation is unchanged (row-parallel matmul,
             partial sums all-reduced)
  experts    whole experts split into equal contiguous ranges (routed experts only)

A split by "channel" (the compressors' kv, gate and position-bias tables) cuts each block of
`head width` channels the same way: a ratio-4 compressor's projection holds two such blocks (the
previous window's half and the current window's), and rank r takes the same channel range of
each. Pooling is per channel, so a rank pools its channels alone; a layer's pooled rows are
all-gathered before their RMS norm (model.layer_rows, decode_graph.StaticDecoder._emit), once
per window (every 4th token in a ratio-4 layer, one gather for both of its compressors), and
each rank then reads half of the compressors' 0.61 GB a token at TP=2.

The routed experts pick one mode for gate, up and down together: "ff" (split the expert FFN
width: gate/up rows, down cols, as on the full model) when each rank's share of the width is a
whole number of the down projection's blocks, else "experts" (whole experts per rank, exact for
any width; tiny models with one 256-block per expert row need it).

Bytes per token count the weights one decoded token reads at context 0: 6 of the routed experts,
one embedding row, one tid2eid row, one APE row per compressor; the indexer's q_b/proj are read
only once a ratio-4 layer holds more compressed rows than its top-k, so not at context 0.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field

from ds4tp import config as C
from ds4tp.config import Shape, expected_tensors, type_name


@dataclass(frozen=True)
class Split:
    kind: str          # replicate | rows | cols | experts
    unit: str = ""     # what stays whole in a rows/cols split


REPLICATE = Split("replicate")

# (pattern, rule or {routed mode: rule}); the first matching pattern applies.
TABLE: list[tuple[str, Split | dict]] = [
    (r"blk\.\d+\.attn_q_b\.weight", Split("rows", "head")),
    (r"blk\.\d+\.attn_sinks\.weight", Split("rows", "head")),
    (r"blk\.\d+\.attn_output_a\.weight", Split("rows", "group")),
    (r"blk\.\d+\.attn_output_b\.weight", Split("cols", "group")),
    (r"blk\.\d+\.indexer\.attn_q_b\.weight", Split("rows", "indexer head")),
    (r"blk\.\d+\.indexer\.proj\.weight", Split("rows", "indexer head")),
    (r"blk\.\d+\.ffn_(gate|up)_shexp\.weight", Split("rows", "ff")),
    (r"blk\.\d+\.ffn_down_shexp\.weight", Split("cols", "ff")),
    (r"blk\.\d+\.ffn_(gate|up)_exps\.weight", {"ff": Split("rows", "ff"), "experts": Split("experts")}),
    (r"blk\.\d+\.ffn_down_exps\.weight", {"ff": Split("cols", "ff"), "experts": Split("experts")}),
    (r"output\.weight", Split("rows", "vocab")),
    (r"blk\.\d+\.(attn|indexer)_compressor_(kv|gate)\.weight", Split("rows", "channel")),
    (r"blk\.\d+\.(attn|indexer)_compressor_ape\.weight", Split("cols", "channel")),
    # everything else (HC, norms, q_a, kv, router, embeddings) is replicated: the single KV head
    # means every rank needs the whole KV path and session state.
    (r".*", REPLICATE),
]
_COMPILED = [(re.compile(p), r) for p, r in TABLE]


def _unit_rows(name: str, s: Shape) -> int:
    """Rows of one unit of a rows split (a head's rows, a group's rows...)."""
    if "indexer.attn_q_b" in name:
        return s.indexer_head_dim
    if "attn_q_b" in name:
        return s.head_dim
    if "attn_output_a" in name:
        return s.o_lora
    return 1


class PlanError(ValueError):
    pass


@dataclass
class TensorPlan:
    name: str
    qtype: int
    shape: tuple[int, ...]               # global logical torch shape
    split: Split
    dim: int | None                      # split dim (None when replicated)
    ranges: list[tuple[int, int]]        # per rank, along dim (within each block)
    bytes: int                           # whole tensor
    rank_bytes: list[int]                # held by each rank
    rank_token_bytes: list[int]          # read by each rank per decoded token (context 0)
    note: str = ""
    blocks: int = 1                      # equal blocks along dim, each split by `ranges` (channel splits)

    def local_shape(self, rank: int) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        a, b = self.ranges[rank]
        return tuple((b - a) * self.blocks if i == self.dim else n for i, n in enumerate(self.shape))


@dataclass
class ShardPlan:
    shape: Shape
    world: int
    routed_mode: str
    tensors: list[TensorPlan] = field(default_factory=list)

    def by_name(self) -> dict[str, TensorPlan]:
        return {t.name: t for t in self.tensors}

    def load_bytes(self, rank: int) -> int:
        return sum(t.rank_bytes[rank] for t in self.tensors)

    def token_bytes(self, rank: int) -> int:
        return sum(t.rank_token_bytes[rank] for t in self.tensors)

    @property
    def compressors_split(self) -> bool:
        """Whether the compressors are split by channel (their rows gathered once per window)."""
        return any(t.split.unit == "channel" and t.dim is not None for t in self.tensors)

    def collectives_per_token(self, indexer_active_layers: int = 0, emitting_layers: int = 0) -> dict[str, int]:
        """Collectives one decoded token makes: an all-reduce after attention and after the
        FFN in every layer, the logits gather, an indexer-score all-reduce per ratio-4 layer
        whose indexer is active (only when the indexer heads are split), and a gather of the
        pooled rows per layer whose compressors end a window at this token (only when the
        compressors are split by channel; one for both compressors of a ratio-4 layer)."""
        if self.world == 1:
            return {}
        return {"all_reduce": 2 * self.shape.n_layer + indexer_active_layers,
                "all_gather": 1 + (emitting_layers if self.compressors_split else 0)}

    def to_json(self, tp1_bytes: int) -> dict:
        return {
            "world": self.world,
            "routed_mode": self.routed_mode,
            "tp1_bytes_per_token": tp1_bytes,
            "ranks": [{"rank": r, "load_bytes": self.load_bytes(r), "bytes_per_token": self.token_bytes(r)}
                      for r in range(self.world)],
            "tensors": [{"name": t.name, "rule": t.split.kind, "unit": t.split.unit,
                         "type": type_name(t.qtype), "shape": list(t.shape), "dim": t.dim,
                         "ranges": [list(r) for r in t.ranges], "blocks": t.blocks, "bytes": t.bytes,
                         "rank_bytes": t.rank_bytes, "rank_bytes_per_token": t.rank_token_bytes,
                         **({"note": t.note} if t.note else {})}
                        for t in self.tensors],
        }


def _routed_mode(s: Shape, world: int, down_type: int) -> tuple[str, str]:
    if world == 1:
        return "ff", ""
    epb = C.BLOCK[down_type][0]
    if s.n_ff_exp % world == 0 and (s.n_ff_exp // world) % epb == 0:
        return "ff", ""
    if s.n_expert % world == 0:
        return "experts", (f"expert width {s.n_ff_exp} / {world} ranks is not a whole number of "
                           f"{type_name(down_type)} blocks ({epb}): whole experts per rank instead")
    raise PlanError(f"cannot split routed experts over {world} ranks: width {s.n_ff_exp} is not "
                    f"block-aligned per rank and {s.n_expert} experts do not divide evenly")


def _token_fraction(name: str, s: Shape, nbytes: int, qtype: int, shape: tuple[int, ...]) -> float:
    """Fraction of a (local) tensor one decoded token at context 0 reads."""
    if name == "token_embd.weight" or name.endswith("ffn_gate_tid2eid.weight") or "compressor_ape" in name:
        return 1.0 / shape[0]                     # one row (torch shape: rows first)
    if name.endswith("_exps.weight"):
        return s.n_expert_used / s.n_expert
    if ".indexer." in name:
        return 0.0
    return 1.0


def make_plan(s: Shape, world: int, types: dict[str, int] | None = None, *,
              split_compressors: bool = True) -> ShardPlan:
    """Apply TABLE to every tensor of shape `s` for `world` ranks. `types` overrides the
    default type of a tensor (from a real file); otherwise the first accepted type is used
    (IQ2_XXS for routed gate/up, Q2_K for down as in the q2 GGUF). split_compressors=False
    replicates the compressors instead (spec 18.3's baseline; the bench's comparison)."""
    if world < 1:
        raise PlanError("world must be >= 1")
    specs = expected_tensors(s)
    types = dict(types or {})

    def qtype_of(name, spec):
        if name in types:
            return types[name]
        if name.endswith("ffn_down_exps.weight"):
            return C.Q2_K
        return spec.types[0]

    down_types = {qtype_of(n, sp) for n, sp in specs.items() if n.endswith("ffn_down_exps.weight")}
    mode, mode_note = "ff", ""
    for dt in down_types:
        m, note = _routed_mode(s, world, dt)
        if m == "experts":
            mode, mode_note = m, note
    plan = ShardPlan(s, world, mode)
    for name, spec in specs.items():
        if name not in types and spec.optional:
            continue
        qtype = qtype_of(name, spec)
        shape = tuple(reversed(spec.dims))
        nbytes = C.nbytes_of(qtype, _prod(shape))
        rule = next(r for rx, r in _COMPILED if rx.fullmatch(name))
        if isinstance(rule, dict):
            rule = rule[mode]
        split = rule if world > 1 and (split_compressors or rule.unit != "channel") else REPLICATE
        dim, ranges, blocks = _ranges(name, s, world, split, shape, qtype)
        note = mode_note if name.endswith("_exps.weight") else ""
        tp = TensorPlan(name, qtype, shape, split, dim, ranges, nbytes, [], [], note, blocks)
        for r in range(world):
            local = tp.local_shape(r)
            lb = C.nbytes_of(qtype, _prod(local))
            tp.rank_bytes.append(lb)
            tp.rank_token_bytes.append(int(round(lb * _token_fraction(name, s, lb, qtype, local))))
        plan.tensors.append(tp)
    return plan


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def _channel_width(name: str, s: Shape) -> int:
    """Channels per block of a compressor tensor: the width of the row it pools into."""
    return s.indexer_head_dim if name.split(".")[2].startswith("indexer") else s.head_dim


def _ranges(name, s: Shape, world, split: Split, shape, qtype):
    """(dim, per-rank ranges within a block, blocks) of a split."""
    if split.kind == "replicate":
        return None, [], 1
    if split.kind == "experts":
        dim = 0
    elif split.kind == "rows":
        dim = len(shape) - 2 if len(shape) >= 2 else 0
    elif split.kind == "cols":
        dim = len(shape) - 1
    else:
        raise PlanError(f"{name}: unknown split kind {split.kind}")
    n, blocks = shape[dim], 1
    if split.unit == "channel":
        n = _channel_width(name, s)
        blocks = shape[dim] // n
        if blocks * n != shape[dim]:
            raise PlanError(f"{name}: width {shape[dim]} is not whole blocks of {n} channels")
    unit = _unit_rows(name, s) if split.kind == "rows" else 1
    if n % (world * unit):
        raise PlanError(f"{name}: {n} along dim {dim} does not split into {world} ranks of whole "
                        f"{split.unit or 'units'} ({unit})")
    per = n // world
    if split.kind == "cols":
        epb = C.BLOCK[qtype][0]
        if per % epb:
            raise PlanError(f"{name}: input split {per} per rank is not a multiple of the "
                            f"{type_name(qtype)} block ({epb})")
    return dim, [(r * per, (r + 1) * per) for r in range(world)], blocks


def verify_plan(plan: ShardPlan) -> None:
    """Every tensor is covered exactly once: split ranges are disjoint, contiguous, cover the
    whole dim, and input splits sit on block boundaries."""
    names = [t.name for t in plan.tensors]
    if len(set(names)) != len(names):
        raise PlanError("a tensor appears twice in the plan")
    want = {n for n, sp in expected_tensors(plan.shape).items() if not sp.optional}
    missing = want - set(names)
    if missing:
        raise PlanError(f"plan misses {sorted(missing)[0]}")
    for t in plan.tensors:
        if t.dim is None:
            if t.rank_bytes != [t.bytes] * plan.world:
                raise PlanError(f"{t.name}: replicated but a rank holds a part")
            continue
        pos = 0
        for a, b in t.ranges:
            if a != pos or b <= a:
                raise PlanError(f"{t.name}: ranges {t.ranges} are not a partition")
            pos = b
        if pos * t.blocks != t.shape[t.dim]:
            raise PlanError(f"{t.name}: ranges cover {pos * t.blocks} of {t.shape[t.dim]}")
        if t.dim == len(t.shape) - 1:
            epb = C.BLOCK[t.qtype][0]
            if any(a % epb or b % epb for a, b in t.ranges):
                raise PlanError(f"{t.name}: input split not on {type_name(t.qtype)} block boundaries")
        if sum(t.rank_bytes) != t.bytes:
            raise PlanError(f"{t.name}: rank bytes {t.rank_bytes} do not add up to {t.bytes}")


def plan_for_file(f, world: int) -> ShardPlan:
    """The plan for an opened DS4File (uses the file's actual types)."""
    types = {n: t.qtype for n, t in f.tensors.items()}
    return make_plan(f.shape, world, types)


# ---- CLI ---------------------------------------------------------------------------------------
def _fmt(b: int) -> str:
    return f"{b / 1e9:8.3f} GB" if b >= 1e8 else f"{b / 1e6:8.3f} MB"


def main(args) -> int:
    if args.preset:
        s = C.PRESETS[args.preset]
        plan, tp1 = make_plan(s, args.world), make_plan(s, 1)
        src = f"preset {args.preset}"
    elif args.model:
        from ds4tp.gguf_file import open_ds4
        f = open_ds4(args.model)
        plan, tp1 = plan_for_file(f, args.world), plan_for_file(f, 1)
        src = args.model
    else:
        print("ds4tp plan: give a GGUF file or --preset", file=sys.stderr)
        return 2
    verify_plan(plan)
    tp1_tok = tp1.token_bytes(0)
    if args.json:
        json.dump(plan.to_json(tp1_tok), sys.stdout, indent=1)
        print()
        return 0
    print(f"shard plan for {src}: world {args.world}, routed experts split by "
          f"{'expert FFN width' if plan.routed_mode == 'ff' else 'whole experts'}")
    rows = {}
    for t in plan.tensors:   # group per-layer tensors by pattern for a readable table
        key = re.sub(r"blk\.\d+\.", "blk.N.", t.name)
        agg = rows.setdefault(key, [t, 0, [0] * plan.world, [0] * plan.world, 0])
        agg[1] += t.bytes
        agg[4] += 1
        for r in range(plan.world):
            agg[2][r] += t.rank_bytes[r]
            agg[3][r] += t.rank_token_bytes[r]
    print(f"{'tensor':42s} {'n':>3s} {'type':8s} {'rule':22s} {'file':>11s} {'rank0 load':>11s} {'rank0 tok':>11s}")
    for key, (t, total, rb, rt, n) in rows.items():
        rule = t.split.kind + (f" by {t.split.unit}" if t.split.unit else "")
        print(f"{key:42s} {n:3d} {type_name(t.qtype):8s} {rule:22s} {_fmt(total)} {_fmt(rb[0])} {_fmt(rt[0])}")
        if t.note:
            print(f"    note: {t.note}")
    print(f"\nTP=1 bytes per decoded token: {tp1_tok:,} ({tp1_tok / 1e9:.3f} GB)")
    for r in range(plan.world):
        tb = plan.token_bytes(r)
        print(f"rank {r}: loads {plan.load_bytes(r):,} B, reads {tb:,} B per token "
              f"({tb / tp1_tok:.3f} of TP=1)")
    return 0
