"""The static-buffer decoder (CUDA graphs on a GPU) meets the same golden criteria as the
model's own decode path, teacher-forced over every golden prompt.

It is the same per-token math on a different layout (the raw window is a ring attended in slot
order, caches are preallocated and masked), so its float rounding differs from
DS4Model.forward's in the last bit; on these random models such differences flip int8/FP8
roundings and grow, exactly as the reference's own prefill and decode paths differ. Hence the
statistical golden criteria (see test_golden_e2e.py), not a bitwise comparison.
"""
from __future__ import annotations

import math

import json

import pytest
import torch

import golden_eval
from ds4tp import config as C
from ds4tp.decode_graph import StaticDecoder
from ds4tp.model import DS4Model
from ds4tp.synth import write_synthetic


def test_static_decoder_golden_parity(golden):
    """The two raw prompts that stay under 200 tokens (230 compared positions: window crossed,
    ratio-4 and ratio-128 rows emitted, indexer selection active) keep this test short."""
    g = json.loads(golden("tiny-a.json").read_text())
    g["prompts"] = [p for p in g["prompts"] if p["name"] in ("short_raw", "mid_raw_200")]
    from ds4tp.model import DS4Model
    res = golden_eval.collect(DS4Model.load(golden("tiny-a.gguf")), g, paths=("static",))
    s = golden_eval.summarize(res["records"])
    print("tiny-a static:", json.dumps(s))
    assert s["n"] > 200
    assert s["median"] <= 0.5 and s["p90"] <= 2.0 and s["top1"] >= 0.75, s
    assert not s["big_gap_mismatch"], s


def test_static_decoder_golden_parity_at_tp2(golden, tmp_path):
    """The same prompts at TP=2 (gloo): the compressors are split by channel, so every window's
    row is pooled on each rank, gathered and finished inside the decoder's step."""
    g = json.loads(golden("tiny-a.json").read_text())
    g["prompts"] = [p for p in g["prompts"] if p["name"] in ("short_raw", "mid_raw_200")]
    path = tmp_path / "tiny-a-short.json"
    path.write_text(json.dumps(g))
    res = golden_eval.run(golden("tiny-a.gguf"), path, tp=2, paths=("static",))
    s = golden_eval.summarize(res["records"])
    print("tiny-a static TP=2:", json.dumps(s))
    assert s["n"] > 200
    assert s["median"] <= 0.5 and s["p90"] <= 2.0 and s["top1"] >= 0.75, s
    assert not s["big_gap_mismatch"], s


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = tmp_path_factory.mktemp("dg") / "tiny.gguf"
    write_synthetic(p, C.TINY, seed=7)
    return DS4Model.load(p)


def _states_equal(a, b):
    assert a.n == b.n and a.tokens == b.tokens
    for x, y in zip(a.layers, b.layers):
        assert torch.equal(x.raw.view(), y.raw.view())
        for cx, cy in ((x.comp, y.comp), (x.index, y.index)):
            if cx is not None:
                assert torch.equal(cx.view(), cy.view())
        for sx, sy in ((x.comp_state, y.comp_state), (x.index_state, y.index_state)):
            if sx is not None:
                assert sx.start == sy.start
                assert torch.equal(sx.kv.view(), sy.kv.view()) and torch.equal(sx.sc.view(), sy.sc.view())


@pytest.mark.parametrize("n", [1, 3, 4, 7, 130, 137])
def test_session_round_trip_is_exact(tiny, n):
    """load_session then store_session gives back the same state, at window edges too."""
    st = tiny.new_state()
    tiny.forward([(5 * i + 1) % 3000 for i in range(n)], st)
    ref = st.clone()
    dec = StaticDecoder(tiny, max_ctx=200, use_graphs=False)
    dec.load_session(st)
    dec.store_session(st)
    _states_equal(st, ref)


def test_hand_over_mid_decode_continues_identically(tiny):
    """Decoder A keeps going; decoder B takes A's state through a SessionState mid-way (across a
    ratio-4 emission) and must produce bit-identical logits afterwards."""
    toks = [(3 * i + 2) % 3000 for i in range(40)]
    st = tiny.new_state()
    tiny.forward(toks[:9], st)
    a = StaticDecoder(tiny, max_ctx=64, use_graphs=False)
    a.load_session(st)
    for t in toks[9:21]:
        a.step(t)
    mid = tiny.new_state()
    a.store_session(mid)
    b = StaticDecoder(tiny, max_ctx=64, use_graphs=False)
    b.load_session(mid)
    for t in toks[21:]:
        assert torch.equal(a.step(t).clone(), b.step(t))


def test_park_and_resume_continue_identically(tiny):
    """One decoder switching between two sequences through park/resume (across a ratio-4 and a
    ratio-128 emission) gives bit-identical logits to a decoder that never switches."""
    xs = [(3 * i + 2) % 3000 for i in range(134)]
    ys = [(7 * i + 5) % 3000 for i in range(20)]
    sx, sy = tiny.new_state(), tiny.new_state()
    tiny.forward(xs[:122], sx)
    tiny.forward(ys[:9], sy)
    alone = StaticDecoder(tiny, max_ctx=160, use_graphs=False)
    alone.load_session(sx.clone())
    want = [alone.step(t).clone() for t in xs[122:]]

    dec = StaticDecoder(tiny, max_ctx=160, use_graphs=False)
    dec.load_session(sx)
    got = [dec.step(t).clone() for t in xs[122:125]]
    px = dec.park()
    dec.load_session(sy)
    for t in ys[9:14]:
        dec.step(t)
    py = dec.park()
    dec.resume(px)
    got += [dec.step(t).clone() for t in xs[125:130]]
    px = dec.park()
    dec.resume(py)
    dec.step(ys[14])
    dec.resume(px)
    got += [dec.step(t).clone() for t in xs[130:]]
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"step {i} differs after switching"
    # the parked session written back is the uninterrupted one's
    ref, mid = tiny.new_state(), tiny.new_state()
    alone.store_session(ref)
    dec.store_session(mid)
    _states_equal(mid, ref)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (graphs, asynchronous lookahead)"))])
def test_runtime_lookahead_gives_the_same_tokens(tiny, tmp_path, device):
    """Lookahead (the sampled token fed before the reply) changes no token: two interleaved
    sequences with lookahead on and off, greedy and sampled; no lookahead past a stop token or
    on the last step; a decode that does not carry the token fed ahead is refused; a released
    sequence keeps its extra token for prefix reuse. On CUDA through the decode graphs, where
    the step fed ahead is still running when decode returns."""
    from ds4tp.comm import SingleComm
    from ds4tp.worker.runtime import RequestError, Runtime
    from ds4tp.worker.sampling import SamplingParams
    if device == "cuda":
        write_synthetic(tmp_path / "t.gguf", C.TINY, seed=7)
        tiny = DS4Model.load(tmp_path / "t.gguf", device="cuda")
    runs = {}
    for ahead in (False, True):
        rt = Runtime(tiny, SingleComm(), ctx=96, device=device, fast_decode=True, lookahead=ahead)
        assert rt.lookahead is ahead
        params = {"a": SamplingParams(), "b": SamplingParams(temperature=0.9, top_p=0.9, seed=3)}
        toks = {"a": [0, 11, 22, 33, 44, 55], "b": [0, 7, 8, 9]}
        n_past = []
        for sid in toks:
            toks[sid].append(rt.prefill(1, sid, toks[sid], params=params[sid]).sample.token)
        for step in range(1, 10):
            for sid in toks:
                r = rt.decode(10 + step, sid, [toks[sid][-1]], step, params[sid],
                              lookahead=step < 9, stop_tokens=frozenset())
                toks[sid].append(r.sample.token)
                n_past.append(r.n_past)
        assert all(s.ahead is None for s in rt.live.values())       # none on the last step
        stop = rt.decode(30, "a", [toks["a"][-1]], 10, params["a"], lookahead=True,
                         stop_tokens=frozenset(range(tiny.shape.vocab)))
        assert rt.live["a"].ahead is None                             # the sampled token stops
        toks["a"].append(stop.sample.token)
        r = rt.decode(31, "b", [toks["b"][-1]], 10, params["b"], lookahead=True)
        toks["b"].append(r.sample.token)
        if ahead:
            assert rt.live["b"].ahead == r.sample.token and len(rt.live["b"].tokens) == r.n_past + 1
            with pytest.raises(RequestError, match="by lookahead"):
                rt.decode(32, "b", [r.sample.token ^ 1], 11, params["b"])
        rt.release(40, "b")
        again = rt.prefill(41, "c", toks["b"][:-1] + [r.sample.token, 5], params=params["a"])
        runs[ahead] = (toks, n_past, again.reused)
    assert runs[True][:2] == runs[False][:2]
    assert runs[False][2] == len(runs[False][0]["b"]) - 1       # the state after its last decode
    assert runs[True][2] == len(runs[True][0]["b"])             # ... plus the token fed ahead


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (graphs, steps queued ahead)"))])
def test_runtime_chained_greedy_gives_the_same_tokens(tiny, tmp_path, device):
    """Requests with lookahead chain their steps (each queued before the host reads the token
    it consumes: the greedy pick the previous step left on the device, or a sample computed
    there): the same tokens and logprobs as without lookahead and as lookahead through the
    host, greedy with and without a logit_bias, across a logit_bias that changes, a second
    sequence in between, and sampled; a sample that is a stop token stays in the state, as a
    cancelled request's token fed ahead."""
    from ds4tp.comm import SingleComm
    from ds4tp.worker.runtime import Runtime
    from ds4tp.worker.sampling import SamplingParams
    if device == "cuda":
        write_synthetic(tmp_path / "t.gguf", C.TINY, seed=7)
        tiny = DS4Model.load(tmp_path / "t.gguf", device="cuda")
    greedy, banned = SamplingParams(), SamplingParams(logit_bias={1: -math.inf, 2: 3.0})
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=3)
    # (sequence, params) per step: chains, a bias change, another sequence in between, sampled
    plan = ([("a", greedy)] * 6 + [("a", banned)] * 5 + [("b", greedy)] + [("a", banned)] * 4
            + [("a", sampled)] * 2 + [("a", greedy)] * 4)
    runs = {}
    for ahead, chain in ((False, False), (True, False), (True, True)):
        rt = Runtime(tiny, SingleComm(), ctx=96, device=device, fast_decode=True, lookahead=ahead)
        if not chain:
            rt._chainable = lambda slot, params: False
        toks = {"a": [0, 11, 22, 33], "b": [0, 7]}
        out = []
        for sid in toks:
            toks[sid].append(rt.prefill(1, sid, toks[sid], params=greedy).sample.token)
        steps = {"a": 0, "b": 0}
        for i, (sid, p) in enumerate(plan):
            steps[sid] += 1
            r = rt.decode(10 + i, sid, [toks[sid][-1]], steps[sid], p, lookahead=True)
            toks[sid].append(r.sample.token)
            out.append((sid, r.sample.token, round(r.sample.logprob, 9), r.n_past, r.digest))
        chained = rt.chained
        # a chained pick that is a stop token: fed anyway; the state keeps it
        r = rt.decode(99, "a", [toks["a"][-1]], 99, greedy, lookahead=True,
                      stop_tokens=frozenset(range(tiny.shape.vocab)))
        assert (rt.live["a"].ahead == r.sample.token) is chain
        rt.release(100, "a")
        again = rt.prefill(101, "c", toks["a"] + [r.sample.token, 5], params=greedy)
        runs[ahead, chain] = (out, again.reused - len(toks["a"]))
        # every step with a token fed ahead: after the first of "a" and the one of "b"
        assert chained == (len(plan) - 2 if chain else 0), chained
    tokens = {k: [o[:4] for o in out] for k, (out, _) in runs.items()}
    assert tokens[True, True] == tokens[True, False] == tokens[False, False]
    # chaining folds the same operations into the digest as lookahead through the host
    assert runs[True, True][0] == runs[True, False][0]
    assert runs[False, False][1] == runs[True, False][1] == 0
    assert runs[True, True][1] == 1                                   # ... plus the pick fed ahead


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (graphs, steps queued ahead)"))])
def test_runtime_lanes_give_the_same_tokens(tiny, tmp_path, device):
    """Runtime lanes (one static decoder per sequence decoding at once): three sequences
    decoding round robin, greedy and sampled, chained, give the same tokens, logprobs, digests
    and logits with one, two or three decoders. With three nothing is parked; with fewer the
    least recently used lane's slot is. A sequence released without keeping its state frees its
    lane. On CUDA each decoder replays its own graphs."""
    from ds4tp.comm import SingleComm
    from ds4tp.worker.runtime import Runtime
    from ds4tp.worker.sampling import SamplingParams
    if device == "cuda":
        write_synthetic(tmp_path / "t.gguf", C.TINY, seed=7)
        tiny = DS4Model.load(tmp_path / "t.gguf", device="cuda")
    params = {"a": SamplingParams(), "b": SamplingParams(temperature=0.9, top_p=0.9, seed=3),
              "c": SamplingParams(logit_bias={1: -math.inf})}
    runs = {}
    for n_dec in (1, 2, 3):
        rt = Runtime(tiny, SingleComm(), ctx=96, device=device, fast_decode=True, lookahead=True,
                     decoders=n_dec)
        parked = 0                  # steps after which some live sequence was parked
        toks = {"a": [0, 11, 22, 33], "b": [0, 7, 8], "c": [5, 6]}
        out = []
        for sid in toks:
            toks[sid].append(rt.prefill(1, sid, toks[sid], params=params[sid]).sample.token)
        for step in range(1, 9):
            for sid in toks:
                r = rt.decode(10 * step + len(out), sid, [toks[sid][-1]], step, params[sid],
                              lookahead=True)
                toks[sid].append(r.sample.token)
                out.append((sid, r.sample.token, r.sample.logprob, r.n_past, r.digest))
                parked += any(slot.parked is not None for slot in rt.live.values())
        logits = {sid: rt.live[sid].logits.clone() for sid in toks}
        runs[n_dec] = (out, logits, parked, rt.chained)
        held_a = any(lane.slot is rt.live["a"] for lane in rt.lanes)
        assert held_a == (n_dec == 3)                  # else b and c stepped since, on its lane
        rt.release(200, "a", drop=True)
        assert sum(lane.slot is None for lane in rt.lanes) == int(held_a)
    assert runs[1][0] == runs[2][0] == runs[3][0]
    for sid in "abc":
        assert torch.equal(runs[1][1][sid], runs[2][1][sid]) and torch.equal(runs[1][1][sid], runs[3][1][sid])
    assert runs[3][2] == 0 and runs[2][2] > 0 and runs[1][2] > 0, [runs[k][2] for k in runs]
    assert runs[1][3] == runs[2][3] == runs[3][3] == 3 * 7            # every step fed ahead chains


def test_runtime_feeds_short_prompts_through_the_decoder(tiny):
    """Prompts (and prompt chunks) of at most graph_feed tokens go through a lane, one decode
    step per token, instead of one eager forward: the sequence then holds that lane (its first
    decode loads nothing), and its tokens and logits are those of feeding the prompt's tokens
    as decode steps one by one; longer prompts still go eager. A prompt chunk (resume) follows
    the same rule."""
    from ds4tp.comm import SingleComm
    from ds4tp.worker.runtime import Runtime
    from ds4tp.worker.sampling import SamplingParams
    greedy = SamplingParams()
    prompt = [0, 11, 22, 33, 44]
    rt = Runtime(tiny, SingleComm(), ctx=96, fast_decode=True, lookahead=True, graph_feed=5)
    loads = []
    for lane in rt.lanes:
        load = lane.dec.load_session
        lane.dec.load_session = lambda st, load=load: loads.append(st.n) or load(st)
    r = rt.prefill(1, "a", prompt, params=greedy)
    assert loads == [0] and rt.live["a"].lane is not None       # an empty state, then graph steps
    # the same tokens as decode steps of a fresh static decoder: the same logits, bit for bit
    ref = StaticDecoder(tiny, max_ctx=96, use_graphs=False)
    ref.load_session(tiny.new_state())
    for t in prompt:
        want = ref.step(t).clone()
    assert torch.equal(rt.live["a"].logits, want)
    toks = [r.sample.token]
    assert toks[-1] == int(want.argmax())
    for step in range(1, 6):
        want = ref.step(toks[-1]).clone()
        toks.append(rt.decode(1 + step, "a", [toks[-1]], step, greedy).sample.token)
        assert torch.equal(rt.live["a"].logits, want) and toks[-1] == int(want.argmax())
    assert loads == [0]
    # longer than graph_feed: one eager forward, the first decode loads the state
    rt.prefill(20, "b", prompt + [55], params=greedy)
    assert rt.live["b"].lane is None
    # a long prompt in chunks: the short last chunk goes through a lane
    rt.prefill(21, "c", list(range(40, 52)), max_feed=8, params=greedy)
    assert rt.live["c"].lane is None
    rt.prefill(22, "c", [], resume=True, params=greedy)
    assert rt.live["c"].lane is not None and loads[-1] == 8


def test_graph_feed_limit_leaves_the_runtime_as_it_was(tiny):
    """The warm-up's timing of an eager forward against graph steps (on CUDA; called directly
    here) sets graph_feed within [0, 64] and leaves the decoder empty: requests then get what a
    runtime given the same graph_feed gives."""
    from ds4tp.comm import SingleComm
    from ds4tp.worker.runtime import Runtime
    from ds4tp.worker.sampling import SamplingParams
    rt = Runtime(tiny, SingleComm(), ctx=64, fast_decode=True)
    got = rt._graph_feed_limit()
    assert 0 <= rt.graph_feed == got["graph_feed"] <= 64 and all(ln.dec.n == 0 for ln in rt.lanes)
    fresh = Runtime(tiny, SingleComm(), ctx=64, fast_decode=True, graph_feed=rt.graph_feed)
    out = []
    for r in (rt, fresh):
        toks = [r.prefill(1, "a", [3, 1, 4], params=SamplingParams()).sample.token]
        for k in range(1, 6):
            toks.append(r.decode(1 + k, "a", [toks[-1]], k).sample.token)
        out.append((toks, r.live["a"].logits.clone()))
    assert out[0][0] == out[1][0] and torch.equal(out[0][1], out[1][1])


def test_runtime_fast_decode_binding(tiny):
    """The worker runtime with the static decoder bound to slots: decode, release, a longer
    request reuses the state (written back), two interleaved sequences do not mix."""
    from ds4tp.comm import SingleComm
    from ds4tp.worker.runtime import Runtime
    from ds4tp.worker.sampling import SamplingParams
    rt = Runtime(tiny, SingleComm(), ctx=96, fast_decode=True)
    ref = Runtime(tiny, SingleComm(), ctx=96, fast_decode=False)
    prompt = [0, 11, 22, 33, 44, 55]
    out = {}
    for r in (rt, ref):
        toks = list(prompt)
        res = r.prefill(1, "a", prompt, params=SamplingParams())
        toks.append(res.sample.token)
        r.prefill(2, "b", [0, 7, 8, 9], params=SamplingParams())   # a second live sequence
        for step in range(1, 12):
            res = r.decode(10 + step, "a", [toks[-1]], step)
            toks.append(res.sample.token)
            r.decode(100 + step, "b", [5], step)                  # interleaved: rebinding
        r.release(50, "a")
        res = r.prefill(51, "c", toks + [3, 4], params=SamplingParams())
        assert res.reused == len(toks) - 1 or res.reused == len(toks)
        out[r is rt] = (toks, res.n_past)
    assert out[True][1] == out[False][1] == len(prompt) + 12 + 2
    # same math, different summation order: greedy tokens agree at least at the start
    assert out[True][0][: len(prompt) + 2] == out[False][0][: len(prompt) + 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a second stream, graphs)")
@pytest.mark.parametrize("comp_join", ["step", "attention"])
def test_side_stream_overlap_is_bit_identical_on_cuda(tmp_path, comp_join, monkeypatch):
    """The shared expert and the compressors on a second stream (ds4tp.streams) change only
    when kernels run, not what they compute: graph-replayed logits over 140 tokens (ratio-4 and
    ratio-128 emissions, the indexer on) are bit-identical with and without the overlap. A
    missing fork or join would read half-written buffers and differ. comp_join: where the
    compressors join on a token that ends none of their windows (decode_graph.COMP_JOIN)."""
    from ds4tp import decode_graph
    monkeypatch.setattr(decode_graph, "COMP_JOIN", comp_join)
    p = tmp_path / "tiny.gguf"
    write_synthetic(p, C.TINY, seed=3)
    m = DS4Model.load(p, device="cuda")
    toks = [(11 * i + 5) % 3000 for i in range(140)]
    runs = []
    for overlap in (True, False):
        m.overlap = overlap
        st = m.new_state()
        m.forward(toks[:2], st)
        dec = StaticDecoder(m, max_ctx=160, use_graphs=True)
        dec.load_session(st)
        runs.append(torch.stack([dec.step(t).clone() for t in toks[2:]]))
    assert torch.equal(runs[0], runs[1])


def _full_width(n_tok: int, n_prompt: int):
    """A 4-layer model of full width on cuda:0 (bench.build_model: synthetic weights), n_tok
    token ids, and a session that consumed the first n_prompt of them."""
    from ds4tp.bench import build_model
    from ds4tp.comm import SingleComm
    m = build_model(C.Shape(n_layer=4), 0, 1, SingleComm(), "cuda:0")
    toks = [(37 * i + 11) % m.shape.vocab for i in range(n_tok)]
    st = m.new_state()
    m.forward(toks[:n_prompt], st)
    return m, st, toks


def _stepped(m, st, toks, max_ctx, graphs=True):
    """Logits [len(toks), V] of a fresh StaticDecoder loaded with a copy of session st, stepping toks."""
    dec = StaticDecoder(m, max_ctx=max_ctx, use_graphs=graphs)
    dec.load_session(st.clone())
    return torch.stack([dec.step(t).clone() for t in toks])


def _states(m, st, toks):
    """Sessions st, st + toks[:1], st + toks[:2], ... (eager DS4Model.forward): one to start
    each of toks' steps from."""
    out = [st.clone()]
    for t in toks[:-1]:
        nxt = out[-1].clone()
        m.forward([t], nxt)
        out.append(nxt)
    return out


def _stepped_each(m, states, toks, max_ctx):
    """Logits [len(toks), V] of one StaticDecoder step with each token from its own session
    (_states): each step starts from the same state on every path, so a path's last-bit
    differences (another summation order) do not compound from step to step, where a near tie
    in the indexer's selection or an expert choice can flip."""
    dec = StaticDecoder(m, max_ctx=max_ctx)
    out = []
    for st, t in zip(states, toks):
        dec.load_session(st.clone())
        out.append(dec.step(t).clone())
    return torch.stack(out)


def _pdl_then_switched_off(m, st, toks, max_ctx, set_enabled, each: bool = False):
    """_stepped logits three times: PDL on, PDL off, then PDL on with a path switched off by
    `set_enabled(False)`; PDL and the path are on again afterwards. each: every step from its
    own session (_stepped_each)."""
    from ds4tp.kernels import pdl
    states = _states(m, st, toks) if each else None
    runs = []
    try:
        for on, path in ((True, True), (False, True), (True, False)):
            pdl.set_enabled(on)
            set_enabled(path)
            runs.append(_stepped_each(m, states, toks, max_ctx) if each
                        else _stepped(m, st, toks, max_ctx))
    finally:
        pdl.set_enabled(True)
        set_enabled(True)
    return runs


def _same_then_close(runs, rtol, atol_frac):
    """runs[0] and runs[1] bit-identical (PDL on and off), runs[2] close to them."""
    d = (runs[0] - runs[2]).abs().amax(-1)          # per step: shown with a failure
    print("per step max |dlogit| against the switched-off path:", [round(float(v), 4) for v in d],
          "same argmax:", (runs[0].argmax(-1) == runs[2].argmax(-1)).tolist())
    assert torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1])
    assert torch.allclose(runs[0], runs[2], rtol=rtol, atol=atol_frac * float(runs[2].abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs a CUDA GPU of compute capability 9.0+")
def test_pdl_is_bit_identical_on_cuda():
    """With programmatic dependent launch (ds4tp.kernels.pdl) a kernel starts before the one
    ahead of it has finished and waits (griddepcontrol.wait) before reading its output; a kernel
    that read an earlier kernel's output before its wait would see stale values. Graph-replayed
    logits of a 4-layer model of full width (so every CUDA C decode kernel runs where CuPy is
    here, and every Triton decode kernel; ratio 0, 4 and 128 layers, both streams) over 12
    tokens are bit-identical with PDL on and off, and both match eager steps to float32 noise."""
    from ds4tp.kernels import pdl
    m, st, toks = _full_width(13, 1)
    runs = []
    try:
        for on, graphs in ((True, True), (False, True), (True, False)):
            pdl.set_enabled(on)
            runs.append(_stepped(m, st, toks[1:], 64, graphs))
    finally:
        pdl.set_enabled(True)
    _same_then_close(runs, 1e-4, 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs a CUDA GPU of compute capability 9.0+")
def test_shared_expert_riding_in_the_routed_launches_on_cuda():
    """A decode token's shared expert riding in the routed experts' two CUDA C launches
    (model.ffn, cuda_experts.takes_shared) computes the same bits as its own launches on the
    side stream plus the add: graph-replayed logits of a 4-layer model of full width over 12
    tokens with PDL on, PDL off, and the shared expert in launches of its own, all equal."""
    from ds4tp.kernels import cuda_experts
    if not cuda_experts.available():
        pytest.skip("the CUDA C kernels need CuPy (pip install ds4tp[gpu])")
    m, st, toks = _full_width(13, 1)
    runs = _pdl_then_switched_off(m, st, toks[1:], 64, cuda_experts.set_shared_enabled)
    assert torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs a CUDA GPU of compute capability 9.0+")
def test_expert_choice_in_the_gate_up_launch_on_cuda():
    """The expert choice made in the routed gate/up launch (cuda_experts.swiglu_routed) against
    its own launch (triton_route), whose arithmetic it repeats op for op: graph-replayed logits
    of a 4-layer full-width model (3 hash layers, 1 chosen by score) over 12 tokens bit-identical
    with PDL on, PDL off and the choice in its own launch. (Close is not enough here: every
    weight one ulp up moves these logits by ~1% after one step, bench/route_probe.py; the model
    rounds its KV rows to FP8, where a last-bit change can cross a rounding step.)"""
    from ds4tp.kernels import cuda_experts
    if not cuda_experts.available():
        pytest.skip("the CUDA C kernels need CuPy (pip install ds4tp[gpu])")
    m, st, toks = _full_width(13, 1)
    runs = _pdl_then_switched_off(m, st, toks[1:], 64, cuda_experts.set_route_enabled)
    assert torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[2]), \
        f"the choice in gate/up moved the logits by {float((runs[0] - runs[2]).abs().max())}"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs a CUDA GPU of compute capability 9.0+")
def test_sinkhorn_beside_the_sublayer_on_cuda():
    """The static decoder's HC mixers with Sinkhorn in its own launch on the side stream
    (StaticDecoder._update: hc_step without the mixer, then hc_mix beside the sublayer) against
    the one-launch hc_step: graph-replayed logits of a 4-layer full-width model over 12 tokens
    agree to float32 noise (the same operations; the 4-element sums may group differently in
    the other launch), with PDL on and off bit-identical."""
    from ds4tp import decode_graph
    m, st, toks = _full_width(13, 1)
    runs = _pdl_then_switched_off(m, st, toks[1:], 64, decode_graph.set_mix_side_enabled)
    print("beside vs one launch: max |dlogit|", float((runs[0] - runs[2]).abs().max()),
          "bit-identical" if torch.equal(runs[0], runs[2]) else "")
    _same_then_close(runs, 1e-4, 1e-3)


def test_listed_rows_of_a_mask():
    """decode_graph._listed_rows (the twin path's row list for a listed attention): the rows a
    mask allows, ascending, -1 past them, top_k long, as topk_mask lists them."""
    from ds4tp.decode_graph import _listed_rows
    gen = torch.Generator().manual_seed(5)
    for cap, k, n_set in ((40, 8, 8), (40, 8, 3), (40, 8, 0), (9, 8, 8)):
        mask = torch.zeros(1, cap, dtype=torch.bool)
        mask[0, torch.randperm(cap, generator=gen)[:n_set]] = True
        got = _listed_rows(mask, k)
        want = torch.cat([torch.nonzero(mask[0]).flatten(), torch.full((k - n_set,), -1)])
        assert got.dtype == torch.int32 and torch.equal(got, want.to(torch.int32)), (cap, k, n_set)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs a CUDA GPU of compute capability 9.0+")
@pytest.mark.parametrize("listed", [False, True])
@pytest.mark.parametrize("comp_join", ["attention", "step"])
def test_index_kernels_in_the_graph_on_cuda(listed, comp_join, monkeypatch):
    """The indexer's two launches (triton_attn.index_scores, topk_mask) inside graph-replayed
    steps of a 4-layer full-width model past 2048 tokens (more than 512 rows visible, so the
    selection is active), in a decoder sized for 16384 tokens (most rows never written): with
    programmatic dependent launch on and off bit-identical, and close to the same steps with the
    torch twins (a GEMM over every row, a stable sort), each step from the same session.
    listed: the attention walks the selection's row list (triton_attn.ATTN_ROWS) instead of the
    mask, on both paths (the twins' rows listed from their mask: decode_graph._listed_rows).
    Until session 39 the twins' path walked the mask: the listed walk's other summation order
    moved this random model's logits by up to 1.2% of the largest (s39b: 0.13-0.16 of 13.8-14.8
    over three runs, every pick the same), at the tolerance's edge, so [listed] failed or passed
    with the run's weights (s37f failed it, s39b two of three). Chained steps compound such
    last-bit differences: s36g's run, after a change to the first HC update's summation order,
    failed the closeness where every kernel's twin held. comp_join: where the compressors join
    on a token that ends none of their windows (decode_graph.COMP_JOIN)."""
    from ds4tp import decode_graph
    from ds4tp.kernels import triton_attn
    monkeypatch.setattr(triton_attn, "ATTN_ROWS", listed)
    monkeypatch.setattr(decode_graph, "COMP_JOIN", comp_join)
    m, st0, toks = _full_width(2100, 2090)
    runs = _pdl_then_switched_off(m, st0, toks[2090:], 16384, triton_attn.set_index_enabled,
                                  each=True)
    _same_then_close(runs, 1e-3, 1e-2)


def test_warm_up_runs_every_variant_and_leaves_the_decoder_as_it_was(tiny):
    """StaticDecoder.warm_up runs each variant once at its first position (graphs on CUDA) and
    restores the buffers: the decoder then gives bit-identical logits to a fresh one. Its
    variant table holds every variant of every position below max_ctx."""
    s = tiny.shape
    max_ctx = 4 * s.indexer_top_k + 300          # every variant reachable, the indexer on
    dec = StaticDecoder(tiny, max_ctx=max_ctx, use_graphs=False)
    table = dec.variants()
    assert len(table) == 5      # tiny: the indexer is on (p >= 67) before the first 128 ends
    assert set(table) == {dec._variant(p) for p in range(max_ctx)}
    assert all(dec._variant(p) == v for v, p in table.items())
    assert len(StaticDecoder(tiny, max_ctx=64, use_graphs=False).variants()) == 2
    assert sorted(dec.warm_up()) == sorted(table)
    st = tiny.new_state()
    tiny.forward([3, 1, 4, 1, 5], st)
    fresh = StaticDecoder(tiny, max_ctx=max_ctx, use_graphs=False)
    for d in (dec, fresh):
        d.load_session(st)
    for t in [(9 * i + 2) % 3000 for i in range(8)]:
        assert torch.equal(dec.step(t).clone(), fresh.step(t))
    with pytest.raises(RuntimeError, match="empty decoder"):
        dec.warm_up()


def test_runtime_warm_up_changes_no_result(tiny):
    """Runtime.warm_up prefills scratch states and warms the decoder; the requests after it get
    exactly what a runtime without it gives, and it refuses to run beside live sequences."""
    from ds4tp.comm import SingleComm
    from ds4tp.worker.runtime import Runtime
    from ds4tp.worker.sampling import SamplingParams
    runs = []
    for warm in (True, False):
        rt = Runtime(tiny, SingleComm(), ctx=40, fast_decode=True)
        if warm:
            done = rt.warm_up(lengths=(2, 17, 60))
            assert done["prefill"] == [2, 17, 40] and done["decode_variants"] == 2  # 60: ctx
            assert done["decoders"] == len(rt.lanes) == 2
            assert all(lane.dec.n == 0 for lane in rt.lanes)
            assert not rt.live and not rt.cached and rt.digest == 0
        toks = [rt.prefill(1, "a", [5, 6, 7], params=SamplingParams()).sample.token]
        for k in range(1, 9):
            toks.append(rt.decode(1 + k, "a", [toks[-1]], k).sample.token)
        logits = rt.live["a"].logits.clone()
        runs.append((toks, logits))
        with pytest.raises(RuntimeError, match="before any sequence"):
            rt.warm_up(lengths=(2,))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


def test_warm_up_lengths_cover_the_kernels_launch_shape_changes():
    """The prompt lengths a worker prefills at start sit on both sides of every token count at
    which a kernel changes launch shape, and include the gateway's prefill chunk."""
    from ds4tp import kernels
    from ds4tp.gateway.scheduler import SchedulerConfig
    from ds4tp.kernels import cuda_experts, triton_matvec
    from ds4tp.worker.runtime import WARM_PREFILL_LENGTHS as L
    for edge in (triton_matvec.FMA_MAX_T, cuda_experts.MAX_T, triton_matvec.TQ_MAX,
                 kernels.GEMM_MIN_T - 1):
        assert edge in L and edge + 1 in L, edge
    assert 1 in L and SchedulerConfig().prefill_chunk in L


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (a runtime on cuda:1)")
def test_runtime_on_a_second_gpu_serves_from_any_thread(tmp_path):
    """The gRPC servicer calls the runtime from its own threads, whose current CUDA device is
    cuda:0. A runtime on cuda:1 still runs there (kernels, streams, graphs) and gives the tokens
    it gives when called from a thread bound to cuda:1. Without binding, a served prefill on the
    second GPU of a host failed in a Triton launch (pointer not accessible)."""
    import threading

    from ds4tp.comm import SingleComm
    from ds4tp.worker.runtime import Runtime
    from ds4tp.worker.sampling import SamplingParams
    p = tmp_path / "tiny.gguf"
    write_synthetic(p, C.TINY, seed=5)
    m = DS4Model.load(p, device="cuda:1")
    outs = []
    for bind in (False, True):
        rt = Runtime(m, SingleComm(), ctx=160, device="cuda:1")
        got = {}

        def serve():
            try:
                if bind:
                    torch.cuda.set_device(1)
                rt.warm_up(lengths=(3, 40))
                prompt = [(13 * i + 1) % 3000 for i in range(70)]
                toks = [rt.prefill(1, "a", prompt, params=SamplingParams()).sample.token]
                for k in range(1, 12):
                    toks.append(rt.decode(1 + k, "a", [toks[-1]], k).sample.token)
                got["toks"] = toks
            except Exception as e:      # reported below, not lost in the thread
                got["error"] = e
        t = threading.Thread(target=serve)
        t.start()
        t.join()
        assert "error" not in got, got.get("error")
        outs.append(got["toks"])
    assert outs[0] == outs[1]
