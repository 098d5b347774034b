"""End-to-end golden parity, teacher-forced, both paths, at TP=1 and TP=2 (see golden_eval.py).

Criteria (golden README, issue 2): pooled over every compared position of a golden model,
median max|dlogit| <= 0.5, p90 <= 2.0, top-1 agreement >= 0.75, and the reference's argmax
wherever its top-1/top-2 gap exceeds 3.0. These are loose on purpose (the reference engine
itself, recompiled, measures median 0.31-0.39 / p90 1.27-1.47 / top-1 0.83-0.86); the
stage-by-stage tests are the precise check.
"""
from __future__ import annotations

import json

import pytest
import torch

import golden_eval

MODELS = ["tiny-a", "small-a"]
_cache: dict = {}


def results(golden, name, tp):
    key = (name, tp)
    if key not in _cache:
        _cache[key] = golden_eval.run(golden(f"{name}.gguf"), golden(f"{name}.json"), tp,
                                      keep_logits=True)
    return _cache[key]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", MODELS)
def test_teacher_forced_parity(golden, name, tp):
    res = results(golden, name, tp)
    for path in ("decode", "prefill"):
        recs = [r for r in res["records"] if r["path"] == path]
        assert recs, f"no {path} positions compared"
        s = golden_eval.summarize(recs)
        print(f"{name} tp={tp} {path}: {json.dumps(s)}")
    s = golden_eval.summarize(res["records"])
    print(f"{name} tp={tp} pooled: {json.dumps(s)}")
    assert s["median"] <= 0.5, s
    assert s["p90"] <= 2.0, s
    assert s["top1"] >= 0.75, s
    assert not s["big_gap_mismatch"], s


@pytest.mark.parametrize("name", MODELS)
def test_tp2_matches_tp1(golden, name):
    """TP=2 changes only the order of partial sums (attention output, FFN, indexer scores), but
    on these random models a one-ulp change flips FP8/int8 roundings and grows, as between the
    reference's own prefill and decode paths. So TP=2 is held to TP=1 at that noise level over
    every decoded position (median max|dlogit| and argmax agreement), and the worst difference
    is reported."""
    a, b = results(golden, name, 1)["logits"], results(golden, name, 2)["logits"]
    assert a.keys() == b.keys() and a
    worst = {k: round(float((a[k] - b[k]).abs().max()), 4) for k in a}
    print(f"{name}: max |logit TP2 - TP1| per run: {json.dumps(worst)}")
    dec = [k for k in a if k.endswith("/decode")]
    # like the golden metric: max |dlogit| over TP=1's top-20 ids at each position
    per_pos = torch.cat([torch.gather((a[k] - b[k]).abs(), -1, a[k].topk(20, dim=-1).indices).amax(-1)
                         for k in dec])
    agree = torch.cat([a[k].argmax(-1) == b[k].argmax(-1) for k in dec]).float().mean().item()
    print(f"{name}: TP2 vs TP1 over {per_pos.numel()} decode positions (top-20 of TP=1): median "
          f"{per_pos.median().item():.3f}, argmax agreement {agree:.3f}")
    assert per_pos.median().item() <= 0.5 and agree >= 0.8, (per_pos.median().item(), agree)
