"""ds4tp.synth: layout, metadata, determinism, weight statistics and tokenizer of the
synthetic DS4 GGUF files."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import subprocess
import sys
import time
import types
import zlib
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from ds4tp import config as C
from ds4tp import synth
from ds4tp.dequant import dequantize
from ds4tp.gguf_file import open_ds4

REPO = Path(__file__).resolve().parents[1]
SEED = 1
ROUTED_TYPE = {"ffn_gate_exps.weight": C.IQ2_XXS, "ffn_up_exps.weight": C.IQ2_XXS,
               "ffn_down_exps.weight": C.Q2_K}


def run_cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "ds4tp", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, **kw)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("synth") / "tiny.gguf"
    synth.write_synthetic(p, C.TINY, SEED)
    return p


@pytest.fixture(scope="module")
def tiny(tiny_path) -> gguf.GGUFReader:
    return gguf.GGUFReader(tiny_path)


def field(reader, key):
    f = reader.fields[key]
    return [gguf.GGUFValueType(t) for t in f.types], f.contents()


def tensor_f32(t) -> torch.Tensor:
    """Dequantize a GGUFReader tensor with ds4tp.dequant, as (rows, n_in)."""
    n_in = int(t.shape[0])
    raw = np.array(t.data).view(np.uint8).reshape(-1, C.nbytes_of(int(t.tensor_type), n_in))
    return dequantize(torch.from_numpy(raw), int(t.tensor_type), n_in)


def role_of(name: str) -> str:
    """'blk.3.attn_q_b.weight' -> 'attn_q_b.weight'; global names unchanged."""
    return name.split(".", 2)[2] if name.startswith("blk.") else name


def tensors_by_name(reader):
    return {t.name: t for t in reader.tensors}


# ---- layout -----------------------------------------------------------------------------------
def test_tensor_directory_matches_config(tiny, tiny_path):
    want = C.expected_tensors(C.TINY)
    assert [t.name for t in tiny.tensors] == list(want)        # same names, same order
    for t in tiny.tensors:
        spec = want[t.name]
        assert tuple(int(d) for d in t.shape) == spec.dims, t.name
        role = role_of(t.name)
        assert int(t.tensor_type) == ROUTED_TYPE.get(role, spec.types[0]), t.name
        assert int(t.n_bytes) == C.nbytes_of(int(t.tensor_type), math.prod(spec.dims))
        assert t.data_offset % 32 == 0
    last = tiny.tensors[-1]
    assert os.path.getsize(tiny_path) == last.data_offset + int(last.n_bytes) + (-int(last.n_bytes) % 32)


def test_metadata(tiny):
    s = C.TINY
    k = C.ARCH + "."
    U32, I32, F32, BOOL, STR, ARR = (gguf.GGUFValueType[n] for n in
                                     ("UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY"))
    assert field(tiny, "GGUF.version")[1] == 3
    assert field(tiny, "general.architecture") == ([STR], "deepseek4")
    assert field(tiny, "general.name")[0] == [STR]
    for key, attr in C.SHAPE_KEYS.items():
        assert field(tiny, k + key) == ([U32], getattr(s, attr)), key
    for key, v in C.FIXED_U32.items():
        assert field(tiny, k + key) == ([U32], v), key
    for key in C.OPTIONAL_U32_ZERO:
        assert field(tiny, k + key) == ([U32], 0), key
    for key, v in C.FIXED_INT_ANY.items():
        assert field(tiny, k + key) == ([U32], v), key
    for key, v in C.FIXED_F32.items():
        types, got = field(tiny, k + key)
        assert types == [F32] and C.float_matches(got, v), key
    assert field(tiny, k + "attention.compress_ratios") == ([ARR, I32], s.compress_ratios)
    assert field(tiny, k + "swiglu_clamp_exp") == ([ARR, F32], [C.SWIGLU_CLAMP] * s.n_layer)
    assert field(tiny, k + "expert_weights_norm") == ([BOOL], True)
    assert field(tiny, k + "context_length")[0] == [U32]
    assert field(tiny, k + "rope.scaling.type") == ([STR], "yarn")
    assert field(tiny, "tokenizer.ggml.model") == ([STR], "gpt2")
    assert field(tiny, "tokenizer.ggml.pre") == ([STR], "joyai-llm")
    assert field(tiny, "tokenizer.ggml.bos_token_id") == ([U32], 0)
    assert field(tiny, "tokenizer.ggml.eos_token_id") == ([U32], 1)
    assert field(tiny, "tokenizer.ggml.padding_token_id") == ([U32], 2)
    assert field(tiny, "ds4tp.synth.seed") == ([U32], SEED)


def test_metadata_types_like_golden(tiny, golden):
    """Every key the golden file has (apart from its generator's provenance) is present, with
    the same GGUF type; the non-tokenizer values match too, except the name."""
    ref = gguf.GGUFReader(golden("tiny-a.gguf"))
    for key, f in ref.fields.items():
        if key.startswith("ds4tiny.") or key == "GGUF.kv_count":
            continue
        assert key in tiny.fields, key
        assert tiny.fields[key].types == f.types, key
        if not key.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                               "tokenizer.ggml.token_type", "general.name")):
            assert tiny.fields[key].contents() == f.contents(), key


# ---- determinism ------------------------------------------------------------------------------
def test_same_seed_same_bytes_across_processes(tiny_path, tmp_path):
    """The CLI in a fresh process (fresh tokenizer training, other hash seed) writes the same
    bytes as the in-process API."""
    out = tmp_path / "again.gguf"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    r = run_cli("synth", "--preset", "tiny", "--seed", str(SEED), "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert sha256(out) == sha256(tiny_path)


def test_other_seed_other_weights(tiny, tmp_path):
    p = tmp_path / "seed2.gguf"
    synth.write_synthetic(p, C.TINY, SEED + 1)
    other = tensors_by_name(gguf.GGUFReader(p))
    for t in tiny.tensors:
        assert not np.array_equal(np.asarray(t.data), np.asarray(other[t.name].data)), t.name


def test_tensors_independent_of_layer_count(tiny, tmp_path):
    """Each tensor has its own stream: a 2-layer file holds exactly the same bytes for every
    tensor it shares with the 6-layer one (and --layers keeps the real per-layer sizes)."""
    p = tmp_path / "two.gguf"
    r = run_cli("synth", "--preset", "tiny", "--seed", str(SEED), "--layers", "2", "--out", str(p))
    assert r.returncode == 0, r.stderr
    two = gguf.GGUFReader(p)
    assert [t.name for t in two.tensors] == list(C.expected_tensors(
        dataclasses.replace(C.TINY, n_layer=2)))
    assert field(two, "deepseek4.block_count")[1] == 2
    full = tensors_by_name(tiny)
    for t in two.tensors:
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(full[t.name].data), t.name)


def test_bad_layers_rejected(tmp_path):
    r = run_cli("synth", "--preset", "tiny", "--layers", "0", "--out", str(tmp_path / "x.gguf"))
    assert r.returncode != 0 and "--layers" in r.stderr


# ---- parallel writer --------------------------------------------------------------------------
# One layer of a shape whose big tensors span several pieces, the last one short (token_embd 5,
# output and the routed experts 3 each), yet small enough (~120 MB) to write twice quickly.
MULTI_PIECE = dataclasses.replace(C.SMALL, n_layer=1, vocab=40_000, n_expert=256)


def plan(shape, task_bytes=synth.TASK_BYTES):
    specs = list(C.expected_tensors(shape).values())
    qtypes = [synth._tensor_type(s) for s in specs]
    head, sizes = synth._gguf_header(synth._metadata(shape, 0), specs, qtypes)
    return specs, sizes, len(head), synth._plan_tasks(specs, qtypes, len(head), task_bytes)


def test_jobs_do_not_change_bytes_tiny(tiny_path, tmp_path):
    p = tmp_path / "jobs3.gguf"
    synth.write_synthetic(p, C.TINY, SEED, jobs=3)
    assert sha256(p) == sha256(tiny_path)


def test_jobs_do_not_change_bytes_multi_piece(tmp_path):
    """Pieces of one tensor written by different processes (tasks of two pieces) give the bytes
    of the one-process writer, and the file opens with the loader."""
    tasks = plan(MULTI_PIECE, 2 * synth.PIECE_BYTES)[3]
    per_tensor = Counter(t.name for t in tasks)
    assert per_tensor["token_embd.weight"] == 3 and per_tensor["blk.0.ffn_down_exps.weight"] == 2
    one, three = tmp_path / "one.gguf", tmp_path / "three.gguf"
    synth.write_synthetic(one, MULTI_PIECE, SEED, jobs=1)
    synth.write_synthetic(three, MULTI_PIECE, SEED, jobs=3, _task_bytes=2 * synth.PIECE_BYTES)
    assert sha256(one) == sha256(three)
    f = open_ds4(three)
    assert f.shape == MULTI_PIECE and list(f.tensors) == list(C.expected_tensors(MULTI_PIECE))
    # Piece k of a matrix draws from the stream (seed, crc32(name), k): token_embd is F16 from
    # the normal-quantile table indexed by 16-bit words; 8192 rows of 512 per piece.
    name, n_in, rows_per_piece = "token_embd.weight", MULTI_PIECE.n_embd, 8192
    data = f.tensor_bytes(name).view("<f2").reshape(-1, n_in)
    table = synth._normal_quantiles().astype("<f2")
    for k in (2, 4):                                     # 4: the short last piece
        rows = data[k * rows_per_piece:(k + 1) * rows_per_piece]
        rng = np.random.default_rng([SEED, zlib.crc32(name.encode()), k])
        words = rng.bit_generator.random_raw(rows.size // 4).astype("<u8").view("<u2")
        np.testing.assert_array_equal(rows.ravel(), table[words])
    assert len(data) - 4 * rows_per_piece == MULTI_PIECE.vocab - 32768
    del f, data


def test_plan_tiles_the_full_file():
    """The full shape's tasks cover every tensor exactly, in order, at its aligned offset, and
    none exceeds TASK_BYTES, so writers get balanced work (routed experts: 9-11 tasks each)."""
    specs, sizes, data_start, tasks = plan(C.FULL)
    assert max(t.nbytes for t in tasks) <= synth.TASK_BYTES
    offset, i = data_start, 0
    for spec, size in zip(specs, sizes):
        at, piece = offset, 0
        while at < offset + size:
            t = tasks[i]
            assert (t.name, t.offset, t.pieces.start) == (spec.name, at, piece)
            at, piece, i = at + t.nbytes, t.pieces.stop, i + 1
        assert at == offset + size, spec.name
        offset += size + (-size % 32)
    assert i == len(tasks)
    per_tensor = Counter(t.name for t in tasks)
    assert 9 <= per_tensor["blk.7.ffn_gate_exps.weight"] and per_tensor["blk.7.ffn_down_exps.weight"] <= 11


def test_default_jobs():
    cores = len(os.sched_getaffinity(0))
    assert synth.default_jobs(0) == 1
    assert synth.default_jobs(20 * 10**6) == 1                    # tiny: no extra processes
    assert synth.default_jobs(3 * synth.MIN_BYTES_PER_JOB) == min(cores, 3)
    assert synth.default_jobs(87 * 10**9) == min(cores, synth.MAX_AUTO_JOBS)


def test_bad_jobs_rejected(tmp_path):
    r = run_cli("synth", "--preset", "tiny", "--jobs", "0", "--out", str(tmp_path / "x.gguf"))
    assert r.returncode != 0 and "--jobs" in r.stderr
    with pytest.raises(ValueError, match="jobs"):
        synth.write_synthetic(tmp_path / "y.gguf", C.TINY, SEED, jobs=0)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def test_not_enough_disk_fails_before_writing(tmp_path, monkeypatch):
    """Checked up front (an 87 GB run would otherwise fail late); no partial file is left."""
    monkeypatch.setattr(synth.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=10**6))
    p = tmp_path / "nospace.gguf"
    with pytest.raises(OSError, match=r"needs 0\.02 GB, only 0\.00 GB free"):
        synth.write_synthetic(p, C.TINY, SEED, jobs=2)
    assert not p.exists()


# ---- weight statistics ------------------------------------------------------------------------
def test_matrix_stds_on_target(tiny):
    """Dequantized (with ds4tp.dequant) matrices have mean ~0 and the documented std; routed
    gate/up per expert, times that layer's expert factor."""
    s = C.TINY
    specs = C.expected_tensors(s)
    checked = set()
    for t in tiny.tensors:
        if int(t.tensor_type) in (C.F32, C.I32):
            continue
        spec = specs[t.name]
        role = role_of(t.name)
        w = tensor_f32(t).double()
        target = {"token_embd.weight": 1.0,
                  "output.weight": 0.18 * math.sqrt(256 / s.n_embd),
                  "ffn_down_exps.weight": 0.3 / math.sqrt(s.n_ff_exp),
                  "ffn_down_shexp.weight": 0.3 / math.sqrt(s.n_ff_exp)}.get(role)
        if target is None:
            target = (0.5 if role.endswith("_ape.weight") else
                      1 / math.sqrt(4 * s.n_embd) if role.endswith("_fn.weight") else
                      1 / math.sqrt(spec.dims[0]))
        if role in ("ffn_gate_exps.weight", "ffn_up_exps.weight"):
            factors = synth.expert_factors(SEED, int(t.name.split(".")[1]), s.n_expert)
            assert factors.min() >= 0.5 and factors.max() <= 3.5
            stds = w.reshape(s.n_expert, -1).std(dim=1).numpy()
            np.testing.assert_allclose(stds, target * factors, rtol=0.05, err_msg=t.name)
            checked.add(role)
            continue
        tol = max(0.03, 4 / math.sqrt(2 * w.numel()))
        assert abs(w.std().item() / target - 1) < tol, (t.name, w.std().item(), target)
        assert abs(w.mean().item()) < 4 * target / math.sqrt(w.numel()) + 1e-3 * target, t.name
        checked.add(role)
    assert {"ffn_gate_exps.weight", "ffn_down_exps.weight", "output.weight",
            "attn_q_b.weight", "indexer_compressor_ape.weight"} <= checked


def test_vector_recipes(tiny):
    s = C.TINY
    ts = tensors_by_name(tiny)
    norms = np.concatenate([np.asarray(t.data) for n, t in ts.items() if n.endswith("_norm.weight")])
    assert abs(norms.mean() - 1) < 0.01 and abs(norms.std() - 0.1) < 0.01
    scales = np.concatenate([np.asarray(t.data) for n, t in ts.items() if "hc_" in n and "scale" in n])
    assert scales.min() >= 0.5 and scales.max() <= 1.5
    sinks = np.concatenate([np.asarray(t.data) for n, t in ts.items() if n.endswith("attn_sinks.weight")])
    assert abs(sinks.mean() - 0.5) < 0.5 and 0.6 < sinks.std() < 1.5
    assert "blk.0.exp_probs_b.bias" not in ts and "blk.3.exp_probs_b.bias" in ts
    # HC base: the documented stream (seed, crc32(name)), 0.5 N, +1 on the combine diagonal.
    name = "blk.2.hc_ffn_base.weight"
    want = 0.5 * np.random.default_rng([SEED, zlib.crc32(name.encode())]).standard_normal(s.hc_mix)
    want[[8 + 4 * r + r for r in range(4)]] += 1
    np.testing.assert_array_equal(np.asarray(ts[name].data), want.astype(np.float32))


def test_q2_k_blocks_zero_mean_layout(tiny):
    t = tensors_by_name(tiny)["blk.4.ffn_down_exps.weight"]
    blocks = np.asarray(t.data).reshape(-1, 84)
    sc = blocks[:, :16]
    assert np.array_equal(sc & 15, sc >> 4) and (sc & 15).min() >= 1
    d = blocks[:, 80:82].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 82:84].copy().view(np.float16)
    assert np.array_equal(dmin, (d * 1.5).astype(np.float16))


def test_tid2eid(tiny):
    s = C.TINY
    for il in range(s.n_hash_layer):
        ids = np.asarray(tensors_by_name(tiny)[f"blk.{il}.ffn_gate_tid2eid.weight"].data)
        assert ids.shape == (s.vocab, s.n_expert_used)
        assert ids.min() >= 0 and ids.max() < s.n_expert
        assert all(len(set(row)) == s.n_expert_used for row in ids.tolist())
        counts = np.bincount(ids.ravel(), minlength=s.n_expert)
        expect = ids.size / s.n_expert
        assert np.abs(counts - expect).max() < 6 * math.sqrt(expect)   # uniform over experts


# ---- tokenizer --------------------------------------------------------------------------------
def gpt2_byte_symbols() -> list[str]:
    """The GPT-2 byte -> unicode map (spec 14.2), built from its definition."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    moved = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(moved)}
    return [table[b] for b in range(256)]


@pytest.mark.parametrize("vocab", [C.TINY.vocab, C.FULL.vocab])
def test_tokenizer_layout(vocab):
    tokens, types, merges = synth.synthetic_tokenizer(vocab)
    assert len(tokens) == len(types) == vocab and len(set(tokens)) == vocab
    assert tokens[:3] == ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
    assert tokens[-5:] == ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜"]
    assert "\uff5c" in tokens[0] and "\u2581" in tokens[2]
    assert tokens[3:259] == sorted(gpt2_byte_symbols())
    assert len(merges) > 300
    for i, m in enumerate(merges):
        a, b = m.split(" ")
        assert tokens[259 + i] == a + b and tokens.index(a) < 259 + i and tokens.index(b) < 259 + i
    fillers = tokens[259 + len(merges):-5]
    assert len(fillers) == vocab - 264 - len(merges)
    assert all(f.startswith("<｜reserved_") for f in fillers)
    assert types[:3] == [3, 3, 3] and set(types[3:259 + len(merges)]) == {1}
    assert set(types[259 + len(merges):-5]) <= {5} and types[-5:] == [3, 3, 4, 4, 4]


def test_tokenizer_in_file_and_usable(tiny):
    tokens = field(tiny, "tokenizer.ggml.tokens")[1]
    merges = field(tiny, "tokenizer.ggml.merges")[1]
    assert (tokens, field(tiny, "tokenizer.ggml.token_type")[1], merges) == \
        tuple(synth.synthetic_tokenizer(C.TINY.vocab))
    # The merges make a working byte-level BPE: text round-trips, and common words merge.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "The station sends a summary; la stazione è sul tetto. def f(x): return 42 ✓"
    enc = tok.encode(text)
    assert tok.decode(enc.ids) == text
    assert len(enc.ids) < len(text.encode()) / 2


# ---- full shape, streamed ---------------------------------------------------------------------
FULL_SIZES = {"blk.0.ffn_gate_exps.weight": 553_648_128, "blk.0.ffn_up_exps.weight": 553_648_128,
              "blk.0.ffn_down_exps.weight": 704_643_072, "blk.0.attn_q_b.weight": 35_651_584,
              "token_embd.weight": 1_059_061_760, "output.weight": 562_626_560}


def test_full_one_layer_streams(tmp_path):
    """--preset full --layers 1 (~3.6 GB; ~20 s here) with 3 writer processes: the real
    per-layer tensor sizes, and pieces of the big tensors as one process draws them."""
    if shutil.disk_usage(tmp_path).free < 8e9:
        pytest.skip("needs ~4 GB of free disk in the temp dir")
    out = tmp_path / "full1.gguf"
    t0 = time.monotonic()
    r = run_cli("synth", "--preset", "full", "--layers", "1", "--seed", "0", "--jobs", "3",
                "--out", str(out))
    elapsed = time.monotonic() - t0
    try:
        assert r.returncode == 0, r.stderr
        assert "[synth] wrote" in r.stderr and "3 jobs" in r.stderr   # progress for full
        f = open_ds4(out)
        shape = dataclasses.replace(C.FULL, n_layer=1)
        assert f.shape == shape
        want = C.expected_tensors(shape)
        assert list(f.tensors) == list(want)
        for name, t in f.tensors.items():
            assert t.dims == want[name].dims
        assert {n: f.tensors[n].nbytes for n in FULL_SIZES} == FULL_SIZES
        assert len(f.metadata["tokenizer.ggml.tokens"][1]) == C.FULL.vocab
        # Pieces drawn in this process, with the same (seed, tensor, piece) streams, match the
        # file: first, middle and (short) last pieces of big tensors of each routed type.
        for name, k in (("token_embd.weight", 0), ("token_embd.weight", -1),
                        ("blk.0.ffn_gate_exps.weight", 33), ("blk.0.ffn_down_exps.weight", -1),
                        ("output.weight", -1)):
            spec, t = want[name], f.tensors[name]
            n_rows, row_bytes, rows_per_piece = synth._piece_layout(spec, t.qtype)
            k %= -(-n_rows // rows_per_piece)
            piece, = synth._tensor_data(name, spec, t.qtype, shape, 0, range(k, k + 1))
            at = k * rows_per_piece * row_bytes
            np.testing.assert_array_equal(f.tensor_bytes(name)[at:at + piece.nbytes], piece, name)
        # Spot check: one routed expert dequantizes to its target std.
        raw = f.tensor_bytes("blk.0.ffn_gate_exps.weight").reshape(C.FULL.n_expert, C.FULL.n_ff_exp, -1)[5]
        w = dequantize(torch.from_numpy(np.array(raw)), C.IQ2_XXS, C.FULL.n_embd)
        target = synth.expert_factors(0, 0, C.FULL.n_expert)[5] / math.sqrt(C.FULL.n_embd)
        assert abs(w.std().item() / target - 1) < 0.03
        del f, raw
    finally:
        out.unlink(missing_ok=True)
    print(f"full --layers 1 generated in {elapsed:.1f} s")


# ---- default model ----------------------------------------------------------------------------
def test_default_model_path(tmp_path, monkeypatch, tiny_path):
    monkeypatch.setenv("DS4TP_CACHE", str(tmp_path / "cache"))
    p = synth.default_model_path()
    assert p == tmp_path / "cache" / "tiny-seed0.gguf"
    ref = tmp_path / "ref.gguf"
    synth.write_synthetic(ref, C.TINY, 0)
    assert sha256(p) == sha256(ref)
    stamp = p.stat().st_mtime_ns
    assert synth.default_model_path() == p and p.stat().st_mtime_ns == stamp   # cached
    # A cached file from another generator version is replaced.
    data = bytearray(p.read_bytes())
    key = b"ds4tp.synth.version"
    at = data.index(key) + len(key) + 4                  # after the key and its u32 type tag
    assert int.from_bytes(data[at:at + 4], "little") == synth.GENERATOR_VERSION
    data[at:at + 4] = (synth.GENERATOR_VERSION + 1).to_bytes(4, "little")
    p.write_bytes(bytes(data))
    assert synth._generator_version(p) == synth.GENERATOR_VERSION + 1
    assert synth.default_model_path() == p and sha256(p) == sha256(ref)
    assert sorted(x.name for x in p.parent.iterdir()) == ["tiny-seed0.gguf"]   # no leftovers


def test_default_model_concurrent_callers(tmp_path):
    env = dict(os.environ, DS4TP_CACHE=str(tmp_path))
    code = "from ds4tp.synth import default_model_path; print(default_model_path())"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert {o.strip() for o, _ in outs} == {str(tmp_path / "tiny-seed0.gguf")}
    ref = tmp_path / "ref.gguf"
    synth.write_synthetic(ref, C.TINY, 0)
    assert sha256(tmp_path / "tiny-seed0.gguf") == sha256(ref)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ref.gguf", "tiny-seed0.gguf"]
