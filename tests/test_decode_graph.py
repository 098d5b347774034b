"""The static-buffer decoder (used for CUDA graphs) computes what DS4Model.forward computes.

Both decode the same teacher-forced tokens from the same prefilled session, across ratio-4 and
ratio-128 emissions and indexer activation; they differ only in summation order (the raw ring is
attended in slot order), so logits agree to float noise except where a rare FP8/int8 tie flips.
"""
from __future__ import annotations

import json

import pytest
import torch

from ds4tp.decode_graph import StaticDecoder
from ds4tp.model import DS4Model


@pytest.mark.parametrize("n_prefill", [1, 60])
def test_static_decoder_matches_model(golden, n_prefill):
    model = DS4Model.load(golden("tiny-a.gguf"))
    ids = json.loads(golden("tiny-a.json").read_text())["prompts"][2]["prompt_ids"][:200]
    st = model.new_state()
    model.forward(ids[:n_prefill], st)
    dec = StaticDecoder(model, max_ctx=256, use_graphs=False)
    dec.load_session(st)
    diffs, agree = [], 0
    for t in ids[n_prefill:]:
        a = model.forward([t], st)
        b = dec.step(t)
        diffs.append(float((a - b).abs().max()))
        agree += int(a.argmax() == b.argmax())
    n = len(diffs)
    close = sum(d < 1e-3 for d in diffs)
    assert dec.n == st.n == len(ids)
    assert close >= 0.9 * n, sorted(diffs)[-10:]
    assert agree >= 0.95 * n
