"""Synthetic DS4-shaped GGUF files: the real tensor layout and metadata, seeded random weights.

`ds4tp synth --preset tiny|small|full --seed N --out F.gguf [--layers N]` writes a GGUF v3 with
exactly the tensors of `ds4tp.config.expected_tensors(shape)` (names, GGUF dims, types, order)
and the metadata keys the loader checks, typed like the golden files.

Writing is parallel and streamed. Every tensor's offset is known from the directory, so the file
is first sized to its final length, then `jobs` writer processes each take tasks (a run of
consecutive row pieces of one tensor, at most TASK_BYTES), generate them a piece (PIECE_BYTES)
at a time and pwrite them in place: memory per process stays at a few times PIECE_BYTES, and the
full-size shape (87 GB) needs no more memory with 32 processes than with one. The header goes in
last, so an interrupted run leaves a file without the GGUF magic rather than one that loads with
zero weights. The bytes do not depend on `jobs`: a piece's bytes depend only on (seed, tensor,
piece index), never on which process draws it.

Weights follow the golden models' recipe (shared/golden/README.md) so activations stay O(1):
- every tensor draws from its own streams, so its bytes do not depend on which other tensors are
  written or in what order: a vector (F32, I32) from one stream seeded by (seed, crc32(name)); a
  matrix is cut into pieces of max(1, PIECE_BYTES // row bytes) rows and piece k draws from the
  stream seeded by (seed, crc32(name), k) (what lets processes write pieces of one tensor);
- matrices have std 1/sqrt(fan_in); FFN down projections (routed and shared) an extra gain 0.3;
  output.weight std 0.18*sqrt(256/n_embd); token_embd std 1;
- norm weights 1 + 0.1 N; HC fn std 1/sqrt(n_hc*n_embd), HC scales U[0.5, 1.5], HC bases 0.5 N
  plus 1 on the diagonal of the combine block; sinks 0.5 + N; exp_probs_b 0.1 N; APE 0.5 N;
- routed gate/up are IQ2_XXS blocks of uniformly random bytes (every bit pattern is valid) with
  the fp16 d set so the std hits the target, times a per-layer, per-expert factor drawn
  log-uniform in [0.5, 3.5] (so some experts hit the SwiGLU clamp); routed down is Q2_K with
  random 2-bit values, scale nibbles 1..15, min nibble = scale nibble and dmin = 1.5 d, so each
  weight is d*sc*(q - 1.5): zero mean;
- Q8_0 blocks are written directly: int8 values of a rounded normal, one fp16 d per tensor;
- F16 values come from a 65536-entry table of normal quantiles indexed by random 16-bit words
  (a discretized normal, much faster than drawing floats).

The tokenizer is a byte-level BPE trained at generation time on `ds4tp.synth_corpus.CORPUS`.
"""
from __future__ import annotations

import errno
import functools
import json
import math
import multiprocessing
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from ds4tp import config as C
from ds4tp.config import Shape

# Bumped whenever the bytes written for a given (shape, seed) change; cached default models
# from another version are regenerated. 2: matrices drawn in row pieces, one stream per piece.
GENERATOR_VERSION = 2
ALIGNMENT = 32                      # GGUF default (we do not write general.alignment)
PIECE_BYTES = 8 << 20               # matrix row pieces: part of the recipe (changes the bytes)
TASK_BYTES = 64 << 20               # work handed to a writer process at a time: only scheduling
MAX_AUTO_JOBS = 32                  # default writer processes at most: past that the disk limits
MIN_BYTES_PER_JOB = 256 << 20       # and one per this much data (tiny files: one process)
PROGRESS_EVERY_S = 2.0

# ---- tokenizer ------------------------------------------------------------------------------
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
# GGUF token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# The chat specials take the last five ids, with the golden files' token types.
CHAT_SPECIALS = (("<｜User｜>", CONTROL), ("<｜Assistant｜>", CONTROL), ("<think>", USER_DEFINED),
                 ("</think>", USER_DEFINED), ("｜DSML｜", USER_DEFINED))
# BPE entries trained at most (specials + byte alphabet + merges); the small corpus runs out of
# pairs seen twice well before this, so every preset gets the same BPE.
MAX_BPE_TOKENS = 3072 - len(CHAT_SPECIALS)

# Pre-split used only to train the merges: an approximation of the JoyAI-style split ds4 runs
# at inference (spec 14.3): 1-3 digit runs, CJK runs, punctuation glued to a following ASCII
# word, letter runs with one leading non-letter, punctuation runs with their newlines, spaces.
_SPLIT_DIGITS = r"\p{N}{1,3}"
_SPLIT_CJK = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_SPLIT_MAIN = "|".join([
    r"[!-/:-@\[-`{-~][A-Za-z]+",
    r"[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+",
    r" ?[\p{P}\p{S}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tokens, merges) of the BPE trained on the embedded corpus: ids 0-2 are BOS/EOS/PAD,
    then the 256 byte symbols, then one token per merge (merge i creates token 259 + i)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from ds4tp.synth_corpus import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_DIGITS), behavior="isolated"),
        pre_tokenizers.Split(Regex(_SPLIT_CJK), behavior="isolated"),
        pre_tokenizers.Split(Regex(_SPLIT_MAIN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=MAX_BPE_TOKENS, min_frequency=2,
                                  special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([p for p in CORPUS.split("\n\n") if p.strip()], trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [None] * len(model["vocab"])
    for text, i in model["vocab"].items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if tokens[:3] != [BOS, EOS, PAD] or None in tokens or len(tokens) != 259 + len(merges):
        raise RuntimeError("BPE training did not give the expected vocabulary layout")
    return tuple(tokens), tuple(merges)


def synthetic_tokenizer(vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) with exactly `vocab` tokens: the trained BPE, filler
    tokens `<｜reserved_N｜>` (unreachable: byte-level pieces never contain U+FF5C), and the
    five chat specials as the last five ids."""
    bpe, merges = _trained_bpe()
    n_fill = vocab - len(bpe) - len(CHAT_SPECIALS)
    if n_fill < 0:
        raise ValueError(f"vocab {vocab} is too small for the synthetic tokenizer "
                         f"({len(bpe) + len(CHAT_SPECIALS)} tokens)")
    tokens = list(bpe) + [f"<｜reserved_{i}｜>" for i in range(n_fill)]
    types = [CONTROL] * 3 + [NORMAL] * (len(bpe) - 3) + [UNUSED] * n_fill
    tokens += [t for t, _ in CHAT_SPECIALS]
    types += [ty for _, ty in CHAT_SPECIALS]
    return tokens, types, list(merges)


# ---- metadata -------------------------------------------------------------------------------
# GGUF value types (gguf.GGUFValueType). A KV entry is (key, value type, value); an array's
# value is (element type, list).
V_U32, V_I32, V_F32, V_BOOL, V_STR, V_ARR = 4, 5, 6, 7, 8, 9


def _metadata(shape: Shape, seed: int) -> list[tuple[str, int, object]]:
    k = C.ARCH + "."
    kv: list[tuple[str, int, object]] = [
        ("general.architecture", V_STR, C.ARCH),
        ("general.name", V_STR, f"ds4tp-synth-e{shape.n_embd}-l{shape.n_layer}-seed{seed}"),
        # printed, not checked, by ds4; the golden files store 65536 as u32
        (k + "context_length", V_U32, C.ROPE_ORIG_CTX),
    ]
    kv += [(k + key, V_U32, getattr(shape, field)) for key, field in C.SHAPE_KEYS.items()]
    kv += [(k + key, V_U32, v) for key, v in C.FIXED_U32.items()]
    kv += [(k + key, V_U32, 0) for key in C.OPTIONAL_U32_ZERO]
    kv += [(k + key, V_U32, v) for key, v in C.FIXED_INT_ANY.items()]
    kv += [(k + key, V_F32, v) for key, v in C.FIXED_F32.items()]
    kv += [
        (k + "attention.compress_ratios", V_ARR, (V_I32, shape.compress_ratios)),
        (k + "swiglu_clamp_exp", V_ARR, (V_F32, [C.SWIGLU_CLAMP] * shape.n_layer)),
        (k + "rope.scaling.type", V_STR, "yarn"),
        (k + "expert_weights_norm", V_BOOL, True),
    ]
    tokens, types, merges = synthetic_tokenizer(shape.vocab)
    kv += [
        ("tokenizer.ggml.model", V_STR, "gpt2"),
        ("tokenizer.ggml.pre", V_STR, "joyai-llm"),
        ("tokenizer.ggml.tokens", V_ARR, (V_STR, tokens)),
        ("tokenizer.ggml.token_type", V_ARR, (V_I32, types)),
        ("tokenizer.ggml.merges", V_ARR, (V_STR, merges)),
        ("tokenizer.ggml.bos_token_id", V_U32, tokens.index(BOS)),
        ("tokenizer.ggml.eos_token_id", V_U32, tokens.index(EOS)),
        ("tokenizer.ggml.padding_token_id", V_U32, tokens.index(PAD)),
        ("tokenizer.ggml.add_bos_token", V_BOOL, False),
        ("tokenizer.ggml.add_eos_token", V_BOOL, False),
        ("ds4tp.synth.version", V_U32, GENERATOR_VERSION),
        ("ds4tp.synth.seed", V_U32, seed),
    ]
    return kv


# ---- GGUF v3 encoding -----------------------------------------------------------------------
_SCALAR = {V_U32: "<I", V_I32: "<i", V_F32: "<f", V_BOOL: "<?"}


def _gguf_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _gguf_value(vtype: int, value) -> bytes:
    if vtype == V_STR:
        return _gguf_str(value)
    if vtype == V_ARR:
        etype, items = value
        head = struct.pack("<IQ", etype, len(items))
        if etype == V_STR:
            return head + b"".join(_gguf_str(s) for s in items)
        return head + np.asarray(items, dtype=_SCALAR[etype]).tobytes()
    return struct.pack(_SCALAR[vtype], value)


def _pad(n: int) -> int:
    return -n % ALIGNMENT


def _gguf_header(kv, specs: list[C.TensorSpec], qtypes: list[int]) -> tuple[bytes, list[int]]:
    """Header, KV data and tensor infos, padded to the alignment; and each tensor's size."""
    out = [struct.pack("<IIQQ", 0x46554747, 3, len(specs), len(kv))]   # "GGUF", version 3
    for key, vtype, value in kv:
        out.append(_gguf_str(key) + struct.pack("<I", vtype) + _gguf_value(vtype, value))
    sizes, offset = [], 0
    for spec, qt in zip(specs, qtypes):
        size = C.nbytes_of(qt, math.prod(spec.dims))
        out.append(_gguf_str(spec.name) + struct.pack(f"<I{len(spec.dims)}QIQ", len(spec.dims),
                                                      *spec.dims, qt, offset))
        sizes.append(size)
        offset += size + _pad(size)
    head = b"".join(out)
    return head + bytes(_pad(len(head))), sizes


# ---- random weights -------------------------------------------------------------------------
def _rng(seed: int, name: str, piece: int | None = None) -> np.random.Generator:
    key = [seed, zlib.crc32(name.encode("utf-8"))]
    return np.random.default_rng(key if piece is None else key + [piece])


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniformly random bytes (uint8), fast (raw 64-bit draws), endian-independent."""
    words = rng.bit_generator.random_raw((n + 7) // 8).astype("<u8", copy=False)
    return words.view(np.uint8)[:n]


def _random_u16(rng: np.random.Generator, n: int) -> np.ndarray:
    return _random_bytes(rng, 2 * n).view("<u2")


@functools.lru_cache(maxsize=1)
def _normal_quantiles() -> np.ndarray:
    """float64 [65536]: the standard normal quantiles at (i + 0.5) / 65536, std ~1."""
    inv = statistics.NormalDist().inv_cdf
    return np.array([inv((i + 0.5) / 65536) for i in range(65536)])


Q8_SIGMA = 30.0    # int8 std of Q8_0 values: the largest quantile (4.2 sigma) stays below 127


@functools.lru_cache(maxsize=1)
def _q8_table() -> tuple[np.ndarray, float]:
    """(int8 [65536] rounded-normal values, their exact std)."""
    q = np.clip(np.rint(_normal_quantiles() * Q8_SIGMA), -127, 127)
    return q.astype(np.int8), float(q.std())


@functools.lru_cache(maxsize=1)
def _iq2_xxs_unit_rms() -> float:
    """RMS of IQ2_XXS weights with d = 1 and uniformly random bytes: E[((0.5+s)/4)^2] over the
    16 scales times the mean squared grid magnitude (signs do not change squares)."""
    from gguf.quants import IQ2_XXS
    IQ2_XXS.init_grid()
    grid_ms = float(np.mean(np.asarray(IQ2_XXS.grid, dtype=np.float64) ** 2))
    scale_ms = float(np.mean(((0.5 + np.arange(16)) * 0.25) ** 2))
    return math.sqrt(grid_ms * scale_ms)


# Q2_K with scale nibbles uniform in 1..15 and 2-bit q: w = d*sc*(q - 1.5), E[(q-1.5)^2] = 1.25.
Q2_K_UNIT_RMS = math.sqrt(np.mean(np.arange(1, 16) ** 2) * 1.25)
FFN_DOWN_GAIN = 0.3
OUTPUT_STD_256 = 0.18


def _f16_bytes(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype("<f2").view(np.uint8)


def _is_vector(qtype: int) -> bool:
    """F32 and I32 tensors are drawn whole, from one stream; the others are row-pieced matrices."""
    return qtype in (C.F32, C.I32)


def _piece_layout(spec: C.TensorSpec, qtype: int) -> tuple[int, int, int]:
    """(rows, bytes per row, rows per piece) of a tensor as drawn; a vector is one piece of one
    "row". Piece k holds rows [k * rows_per_piece, (k + 1) * rows_per_piece) (the last is
    shorter) and starts k * rows_per_piece * row_bytes into the tensor."""
    n = math.prod(spec.dims)
    if _is_vector(qtype):
        return 1, C.nbytes_of(qtype, n), 1
    row_bytes = C.nbytes_of(qtype, spec.dims[0])
    return n // spec.dims[0], row_bytes, max(1, PIECE_BYTES // row_bytes)


def _quant_rows(rng, qtype: int, n_in: int, row_std: np.ndarray) -> np.ndarray:
    """Encoded rows (uint8) of a random matrix piece; row r has std row_std[r]."""
    epb, bpb = C.BLOCK[qtype]
    nb, rows = n_in // epb, len(row_std)
    if qtype == C.F16:
        if np.ptp(row_std):
            raise ValueError("F16 matrices take one std for all rows")
        table = (_normal_quantiles() * float(row_std[0])).astype("<f2")
        return table[_random_u16(rng, rows * n_in)].view(np.uint8)
    std = row_std.reshape(rows, 1, 1)
    blocks = np.empty((rows, nb, bpb), dtype=np.uint8)
    if qtype == C.Q8_0:
        table8, unit = _q8_table()
        q = table8[_random_u16(rng, rows * nb * 32)]
        blocks[..., 2:] = q.view(np.uint8).reshape(rows, nb, 32)
        blocks[..., 0:2] = _f16_bytes(np.broadcast_to(std / unit, (rows, nb, 1)))
    elif qtype == C.IQ2_XXS:
        blocks[..., 2:] = _random_bytes(rng, rows * nb * 64).reshape(rows, nb, 64)
        d = std / _iq2_xxs_unit_rms()
        blocks[..., 0:2] = _f16_bytes(np.broadcast_to(d, (rows, nb, 1)))
    elif qtype == C.Q2_K:
        sc = rng.integers(1, 16, size=(rows, nb, 16), dtype=np.uint8)
        blocks[..., 0:16] = sc | (sc << 4)
        blocks[..., 16:80] = _random_bytes(rng, rows * nb * 64).reshape(rows, nb, 64)
        d = np.broadcast_to(std / Q2_K_UNIT_RMS, (rows, nb, 1)).astype(np.float32)
        d16 = d.astype("<f2")
        blocks[..., 80:82] = d16.view(np.uint8)
        blocks[..., 82:84] = _f16_bytes(d16.astype(np.float32) * 1.5)
    else:
        raise ValueError(f"no random generator for {C.type_name(qtype)}")
    return blocks.reshape(-1)


def expert_factors(seed: int, layer: int, n_expert: int) -> np.ndarray:
    """Per-expert magnitude factors of a layer's routed gate/up, log-uniform in [0.5, 3.5]."""
    g = _rng(seed, f"blk.{layer}.expert_scale")
    return np.exp(g.uniform(math.log(0.5), math.log(3.5), size=n_expert))


def _tid2eid(rng, n_tokens: int, n_used: int, n_expert: int) -> np.ndarray:
    """int32 [n_tokens, n_used]: per token, n_used distinct expert ids in random order.
    Sequential selection without replacement: draw r among the experts not yet chosen, then
    step r over the chosen ids in ascending order to get the actual id."""
    out = np.empty((n_tokens, n_used), dtype=np.int64)
    for k in range(n_used):
        r = rng.integers(0, n_expert - k, size=n_tokens)
        for c in np.sort(out[:, :k], axis=1).T:
            r += r >= c
        out[:, k] = r
    return out.astype("<i4")


def tensor_target_std(name: str, spec: C.TensorSpec, shape: Shape) -> float:
    """Target std of a random matrix (before any per-expert factor)."""
    role = name.split(".", 2)[-1] if name.startswith("blk.") else name
    if role == "token_embd.weight":
        return 1.0
    if role == "output.weight":
        return OUTPUT_STD_256 * math.sqrt(256 / shape.n_embd)
    if role.endswith("_fn.weight"):                  # hyper-connection mixers
        return 1 / math.sqrt(shape.hc_dim)
    if role.endswith("_ape.weight"):
        return 0.5
    gain = FFN_DOWN_GAIN if role in ("ffn_down_exps.weight", "ffn_down_shexp.weight") else 1.0
    return gain / math.sqrt(spec.dims[0])


def _tensor_data(name: str, spec: C.TensorSpec, qtype: int, shape: Shape, seed: int,
                 pieces: range | None = None) -> Iterator[np.ndarray]:
    """The tensor's pieces `pieces` (default: all), as uint8 arrays in file order. One dispatch
    point for every tensor."""
    n_rows, _, rows_per_piece = _piece_layout(spec, qtype)
    n_pieces = -(-n_rows // rows_per_piece)
    pieces = range(n_pieces) if pieces is None else pieces
    if pieces.step != 1 or not 0 <= pieces.start <= pieces.stop <= n_pieces:
        raise ValueError(f"{name}: pieces {pieces} not a run within its {n_pieces} pieces")
    if not pieces:
        return
    role = name.split(".", 2)[-1] if name.startswith("blk.") else name
    n = math.prod(spec.dims)

    def f32(x):
        yield np.asarray(x, dtype="<f4").view(np.uint8)

    # A vector is one piece, drawn from the tensor's stream; matrix piece k below from its own.
    rng = _rng(seed, name)
    if qtype == C.F32:
        if role.endswith("_norm.weight"):
            yield from f32(1 + 0.1 * rng.standard_normal(n))
        elif role.endswith("_scale.weight"):         # hyper-connection scales
            yield from f32(rng.uniform(0.5, 1.5, n))
        elif role.endswith("_base.weight"):          # hyper-connection bases
            base = 0.5 * rng.standard_normal(n)
            if n == shape.hc_mix:                    # pre | post | combine[n_hc][n_hc]
                h = shape.n_hc
                base[2 * h + np.arange(h) * (h + 1)] += 1.0
            yield from f32(base)
        elif role == "attn_sinks.weight":
            yield from f32(0.5 + rng.standard_normal(n))
        elif role == "exp_probs_b.bias":
            yield from f32(0.1 * rng.standard_normal(n))
        else:
            raise ValueError(f"no recipe for F32 tensor {name}")
        return
    if qtype == C.I32:
        if role != "ffn_gate_tid2eid.weight":
            raise ValueError(f"no recipe for I32 tensor {name}")
        n_used, n_tok = spec.dims
        yield _tid2eid(rng, n_tok, n_used, shape.n_expert).view(np.uint8)
        return

    row_std = np.full(n_rows, tensor_target_std(name, spec, shape))
    if role in ("ffn_gate_exps.weight", "ffn_up_exps.weight"):
        layer = int(name.split(".")[1])
        per_expert = expert_factors(seed, layer, shape.n_expert)
        row_std *= np.repeat(per_expert, n_rows // shape.n_expert)
    for k in pieces:
        r0 = k * rows_per_piece
        yield _quant_rows(_rng(seed, name, k), qtype, spec.dims[0],
                          row_std[r0:r0 + rows_per_piece])


def _tensor_type(spec: C.TensorSpec) -> int:
    """The type written: routed gate/up IQ2_XXS, routed down Q2_K (the ds4 2-bit file)."""
    if len(spec.types) == 1:
        return spec.types[0]
    return C.Q2_K if spec.name.endswith("ffn_down_exps.weight") else C.IQ2_XXS


# ---- parallel writer ------------------------------------------------------------------------
class _Task(NamedTuple):
    """A run of consecutive pieces of one tensor, written at `offset` (absolute, in the file)."""
    name: str
    spec: C.TensorSpec
    qtype: int
    pieces: range
    offset: int
    nbytes: int


def _plan_tasks(specs: list[C.TensorSpec], qtypes: list[int], data_start: int,
                task_bytes: int = TASK_BYTES) -> list[_Task]:
    """Every tensor's data cut into tasks of at most `task_bytes` (at least one piece each), in
    file order; the tensors start at data_start and are padded to ALIGNMENT like the header says."""
    tasks, offset = [], data_start
    for spec, qt in zip(specs, qtypes):
        n_rows, row_bytes, rows_per_piece = _piece_layout(spec, qt)
        piece_bytes = rows_per_piece * row_bytes
        n_pieces = -(-n_rows // rows_per_piece)
        step = max(1, task_bytes // piece_bytes)
        for k0 in range(0, n_pieces, step):
            k1 = min(n_pieces, k0 + step)
            nbytes = (min(n_rows, k1 * rows_per_piece) - k0 * rows_per_piece) * row_bytes
            tasks.append(_Task(spec.name, spec, qt, range(k0, k1), offset + k0 * piece_bytes, nbytes))
        size = n_rows * row_bytes
        offset += size + _pad(size)
    return tasks


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):              # pwrite may write less than asked (e.g. > 2 GB)
        done += os.pwrite(fd, view[done:], offset + done)


def _write_task(path: str, shape: Shape, seed: int, task: _Task) -> int:
    """Generate one task's pieces and write them in place; returns the bytes written. Runs in the
    writer processes (and in-process for jobs=1), opening the file for itself."""
    fd = os.open(path, os.O_WRONLY)
    try:
        at = task.offset
        for piece in _tensor_data(task.name, task.spec, task.qtype, shape, seed, task.pieces):
            _pwrite_all(fd, piece, at)
            at += piece.nbytes
    finally:
        os.close(fd)
    if at - task.offset != task.nbytes:
        raise AssertionError(f"{task.name} pieces {task.pieces}: wrote {at - task.offset} bytes, "
                             f"expected {task.nbytes}")
    return task.nbytes


def default_jobs(total_bytes: int) -> int:
    """Writer processes for a file of `total_bytes`: one per usable core, at most MAX_AUTO_JOBS
    and at most one per MIN_BYTES_PER_JOB (starting processes is not worth it for small files)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, MAX_AUTO_JOBS, total_bytes // MIN_BYTES_PER_JOB))


class _Progress:
    """`[synth]` lines on stderr every PROGRESS_EVERY_S: bytes done / total and the mean rate."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0
        self.t0 = self.last = time.monotonic()

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            print(f"[synth] {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB "
                  f"({100 * self.done / self.total:.0f}%)  {self.rate_mb_s():.0f} MB/s  "
                  f"{now - self.t0:.1f} s", file=sys.stderr, flush=True)

    def rate_mb_s(self) -> float:
        return self.done / 1e6 / max(time.monotonic() - self.t0, 1e-9)


# ---- public API -----------------------------------------------------------------------------
def write_synthetic(path, shape: Shape, seed: int, *, jobs: int | None = 1,
                    progress: bool = False, _task_bytes: int = TASK_BYTES) -> None:
    """Write a synthetic DS4 GGUF of `shape` with weights from `seed` to `path`, with `jobs`
    writer processes (None: `default_jobs`; 1: in this process). Every `jobs` writes the same
    bytes. On failure the partial file is removed. (`_task_bytes`: scheduling, for tests.)

    With jobs > 1 the writers are started with multiprocessing's 'spawn': a script calling this
    at import time needs the usual `if __name__ == "__main__":` guard."""
    shape.validate()
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    specs = list(C.expected_tensors(shape).values())
    qtypes = [_tensor_type(s) for s in specs]
    head, sizes = _gguf_header(_metadata(shape, seed), specs, qtypes)
    total = len(head) + sum(s + _pad(s) for s in sizes)
    tasks = _plan_tasks(specs, qtypes, len(head), _task_bytes)
    jobs = min(default_jobs(total) if jobs is None else jobs, len(tasks))
    path = os.fspath(path)
    meter = _Progress(sum(sizes), progress)
    created = False
    try:
        with open(path, "wb") as f:
            created = True
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            if free < total:
                raise OSError(errno.ENOSPC, f"synthetic GGUF needs {total / 1e9:.2f} GB, only "
                              f"{free / 1e9:.2f} GB free", path)
            f.truncate(total)            # final size; every byte not written below stays zero
        write = functools.partial(_write_task, path, shape, seed)
        if jobs == 1:
            for task in tasks:
                meter.add(write(task))
        else:
            with multiprocessing.get_context("spawn").Pool(jobs) as pool:
                for nbytes in pool.imap_unordered(write, tasks):
                    meter.add(nbytes)
        if meter.done != sum(sizes):
            raise AssertionError(f"wrote {meter.done} data bytes, expected {sum(sizes)}")
        with open(path, "r+b") as f:     # header last: a partial file has no GGUF magic
            f.write(head)
    except BaseException:
        if created:
            os.unlink(path)
        raise
    if progress:
        print(f"[synth] wrote {path}: {len(specs)} tensors, {total / 1e9:.2f} GB in "
              f"{time.monotonic() - meter.t0:.1f} s ({meter.rate_mb_s():.0f} MB/s, "
              f"{jobs} job{'s' if jobs > 1 else ''})", file=sys.stderr, flush=True)


def default_model_path() -> Path:
    """The embedded default model (preset tiny, seed 0), generated on first use and cached in
    $DS4TP_CACHE (a directory) or ~/.cache/ds4tp, as tiny-seed0.gguf. Concurrent callers are
    safe: each writes a private temporary file and renames it into place."""
    cache = Path(os.environ.get("DS4TP_CACHE") or Path.home() / ".cache" / "ds4tp")
    path = cache / "tiny-seed0.gguf"
    if path.exists() and _generator_version(path) == GENERATOR_VERSION:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tiny-seed0.", suffix=".partial", dir=cache)
    os.close(fd)
    try:
        write_synthetic(tmp, C.TINY, 0)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _generator_version(path: Path) -> int | None:
    from gguf import GGUFReader
    try:
        field = GGUFReader(path).fields.get("ds4tp.synth.version")
    except Exception:      # unreadable or truncated: regenerate
        return None
    return None if field is None else int(field.contents())


def main(args) -> int:
    shape = C.PRESETS[args.preset]
    if args.layers is not None:
        if args.layers < 1:
            raise SystemExit(f"--layers must be at least 1, got {args.layers}")
        shape = replace(shape, n_layer=args.layers)
    if args.jobs is not None and args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    write_synthetic(args.out, shape, args.seed, jobs=args.jobs, progress=args.preset == "full")
    return 0
