"""The command line end to end: synth a tiny model, evaluate it, plan it, and the errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ds4tp(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "ds4tp", *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    ds4tp("synth", "--preset", "tiny", "--seed", 4, "--out", p)
    return p


def test_synth_then_eval_json(tiny):
    out = json.loads(ds4tp("eval", "--model", tiny, "--tokens", "0,5,9,17", "--positions", "all",
                           "--steps", 3, "--top", 5, "--json").stdout)
    assert out["prompt_tokens"] == [0, 5, 9, 17]
    assert [p["pos"] for p in out["positions"]] == [0, 1, 2, 3]
    assert all(len(p["top"]) == 5 for p in out["positions"])
    for p in out["positions"]:
        logits = [l for _, l in p["top"]]
        assert logits == sorted(logits, reverse=True)
    assert len(out["steps"]) == 3
    assert out["steps"][0]["top"] == out["positions"][-1]["top"]      # step 0 = after the prompt
    assert out["steps"][0]["token"] == out["steps"][0]["top"][0][0]   # greedy


def test_decode_path_and_prompt(tiny):
    a = json.loads(ds4tp("eval", "--model", tiny, "--prompt", "Hello there", "--json").stdout)
    b = json.loads(ds4tp("eval", "--model", tiny, "--prompt", "Hello there", "--path", "decode",
                         "--json").stdout)
    assert a["prompt_tokens"] == b["prompt_tokens"] and a["prompt_tokens"][0] == 0   # BOS first
    assert abs(a["positions"][0]["top"][0][1] - b["positions"][0]["top"][0][1]) < 1.0
    c = json.loads(ds4tp("eval", "--model", tiny, "--prompt", "Hi", "--chat", "--json").stdout)
    assert len(c["prompt_tokens"]) > 3


def test_plan_json(tiny):
    p = json.loads(ds4tp("plan", tiny, "--world", 2, "--json").stdout)
    assert p["world"] == 2 and len(p["ranks"]) == 2
    assert all(r["bytes_per_token"] < p["tp1_bytes_per_token"] for r in p["ranks"])
    assert {t["rule"] for t in p["tensors"]} >= {"replicate", "rows", "cols", "experts"}
    full = json.loads(ds4tp("plan", "--preset", "full", "--world", 2, "--json").stdout)
    assert max(r["bytes_per_token"] for r in full["ranks"]) <= 0.56 * full["tp1_bytes_per_token"]


def test_errors_are_clear(tmp_path, tiny):
    r = ds4tp("eval", "--model", tmp_path / "nope.gguf", "--tokens", "1", check=False)
    assert r.returncode != 0 and "no such file" in r.stderr
    r = ds4tp("eval", "--model", tiny, "--tokens", "1,x", check=False)
    assert r.returncode != 0 and "comma-separated integers" in r.stderr
    r = ds4tp("eval", "--model", tiny, "--tokens", "99999", check=False)
    assert r.returncode != 0 and "out of range" in r.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 10)
    r = ds4tp("eval", "--model", bad, "--tokens", "1", check=False)
    assert r.returncode != 0 and "bad.gguf" in r.stderr
