"""Worker runtime: sampling rules, sequences, prefix reuse, chunked prefill, digests."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ds4tp.worker.runtime import RequestError, Runtime
from ds4tp.worker.sampling import SamplingParams, candidates, sample, step_seed
from toy_model import ToyModel


def fresh_logits(seed: int, vocab: int = 3072) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


# ---- sampling -----------------------------------------------------------------------------------
def test_greedy_is_argmax_with_ties_to_lower_id():
    x = fresh_logits(1)
    assert sample(x, SamplingParams(), 0).token == int(torch.argmax(x))
    x = torch.zeros(10)
    x[3] = x[7] = 5.0
    assert sample(x, SamplingParams(temperature=0), 0).token == 3
    assert sample(x, SamplingParams(temperature=1.0, top_k=1), 5).token == 3


def test_logprob_and_top_logprobs_are_the_raw_distribution():
    x = fresh_logits(2)
    s = sample(x, SamplingParams(temperature=0.7, seed=3, top_logprobs=5), 4)
    ref = torch.log_softmax(x.double(), -1)
    assert math.isclose(s.logprob, float(ref[s.token]), abs_tol=1e-9)
    want = torch.topk(ref, 5).indices.tolist()
    assert [t for t, _ in s.top] == want
    assert all(math.isclose(lp, float(ref[t]), abs_tol=1e-9) for t, lp in s.top)


def test_sampling_is_a_function_of_seed_and_step():
    x = fresh_logits(3)
    p = SamplingParams(temperature=1.0, seed=42)
    a = [sample(x, p, k).token for k in range(40)]
    assert a == [sample(x, p, k).token for k in range(40)]
    assert len(set(a)) > 5                                   # steps differ
    b = [sample(x, SamplingParams(temperature=1.0, seed=43), k).token for k in range(40)]
    assert a != b
    assert step_seed(1, 2) != step_seed(2, 1)


def test_filters_keep_the_documented_candidates():
    x = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)).numpy()
    ids, pr = candidates(x, SamplingParams(temperature=1.0, top_k=3))
    assert ids.tolist() == [0, 1, 2] and math.isclose(pr.sum(), 1.0)
    ids, _ = candidates(x, SamplingParams(temperature=1.0, top_p=0.7))
    assert ids.tolist() == [0, 1]                            # 0.5 + 0.2 reaches 0.7
    ids, _ = candidates(x, SamplingParams(temperature=1.0, top_p=0.71))
    assert ids.tolist() == [0, 1, 2]
    ids, _ = candidates(x, SamplingParams(temperature=1.0, min_p=0.3))
    assert ids.tolist() == [0, 1, 2]                         # >= 0.3 * 0.5
    ids, _ = candidates(x, SamplingParams(temperature=1.0, top_k=4, top_p=0.6))
    assert ids.tolist() == [0, 1]                            # top_p on the top-4 renormalised


def test_sampling_frequencies_follow_the_distribution():
    p = np.array([0.6, 0.3, 0.1])
    x = torch.tensor(np.log(p))
    n = 3000
    counts = np.bincount([sample(x, SamplingParams(temperature=1.0, seed=7), k).token
                          for k in range(n)], minlength=3)
    assert np.all(np.abs(counts / n - p) < 0.04), counts
    # temperature sharpens
    hot = np.bincount([sample(x, SamplingParams(temperature=0.3, seed=7), k).token
                       for k in range(1000)], minlength=3)
    assert hot[0] / 1000 > 0.8


def test_logit_bias_bans_and_params_are_checked():
    x = fresh_logits(4)
    top = int(torch.argmax(x))
    s = sample(x, SamplingParams(logit_bias={top: -math.inf}), 0)
    assert s.token != top
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5).check(3072)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SamplingParams(logit_bias={5000: 1.0}).check(3072)



def _reference_sample(logits: torch.Tensor, p: SamplingParams, step: int):
    """The documented rule on a full stable sort of the vocabulary (the worker's sampler sorts
    only the head it needs): (token, logprob, top ids)."""
    from ds4tp.worker.sampling import uniform
    raw = logits.double().numpy()
    x = raw.copy()
    for t, b in p.logit_bias.items():
        x[t] += b
    lp = raw - (raw.max() + np.log(np.exp(raw - raw.max()).sum()))
    top = list(np.argsort(-raw, kind="stable")[: p.top_logprobs])
    if p.temperature <= 0 or p.top_k == 1:
        return int(np.argmax(x)), float(lp[int(np.argmax(x))]), top
    pr = np.exp(x / p.temperature - (x / p.temperature).max())
    pr /= pr.sum()
    ids = np.argsort(-pr, kind="stable")
    pr = pr[ids]
    if p.top_k > 0:
        ids, pr = ids[: p.top_k], pr[: p.top_k]
        pr = pr / pr.sum()
    if 0 < p.top_p < 1:
        keep = np.concatenate(([0.0], np.cumsum(pr)[:-1])) < p.top_p
        ids, pr = ids[keep], pr[keep]
    if p.min_p > 0:
        keep = pr >= p.min_p * pr[0]
        ids, pr = ids[keep], pr[keep]
    i = int(np.searchsorted(np.cumsum(pr / pr.sum()), uniform(p.seed, step), side="right"))
    tok = int(ids[min(i, len(ids) - 1)])
    return tok, float(lp[tok]), top


def test_sampling_matches_a_full_sort_of_the_vocabulary():
    """The sampler sorts only as much of the vocabulary as its filters and the draw reach; on
    fresh random logits (peaked and flat, with ties, 129280 tokens too) it picks what a full
    stable sort picks, with the same logprob and the same top_logprobs (ties: lower id)."""
    rng = np.random.default_rng(1234)
    cases = 0
    for trial in range(60):
        v = int(rng.choice([64, 3000, 129280]))
        x = torch.from_numpy(rng.standard_normal(v).astype(np.float32) * float(rng.choice([0.5, 3, 12])))
        if trial % 4 == 0:
            x = torch.round(x)                   # many equal logits
        kw = dict(temperature=float(rng.choice([0.0, 0.4, 1.0, 1.6])), seed=int(rng.integers(1 << 31)),
                  top_logprobs=int(rng.choice([0, 4, 20])))
        pick = trial % 5
        if pick == 1:
            kw["top_p"] = float(rng.choice([0.3, 0.9, 0.995]))
        elif pick == 2:
            kw["top_k"] = int(rng.choice([2, 40, 5000]))
        elif pick == 3:
            kw["min_p"] = float(rng.choice([0.02, 0.3]))
        elif pick == 4:
            kw.update(top_p=0.85, top_k=200, min_p=0.01)
        p = SamplingParams(**kw)
        for step in range(3):
            s = sample(x, p, step)
            tok, lp, top = _reference_sample(x, p, step)
            assert s.token == tok, (v, kw, step)
            assert math.isclose(s.logprob, lp, rel_tol=0, abs_tol=1e-12)
            assert [t for t, _ in s.top] == [int(t) for t in top], (v, kw)
            cases += 1
    assert cases == 180

# ---- runtime ----------------------------------------------------------------------------------------
class _Op:
    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1
        return self.n


@pytest.fixture
def rt():
    m = ToyModel()
    from ds4tp.comm import SingleComm
    return Runtime(m, SingleComm(), ctx=64, max_sequences=3, max_cached=2)


def test_prefill_decode_matches_a_plain_run(rt):
    op = _Op()
    prompt = [0, 5, 9, 33, 7]
    r = rt.prefill(op(), "a", prompt)
    toks = [r.sample.token]
    for k in range(1, 6):
        toks.append(rt.decode(op(), "a", [toks[-1]], k).sample.token)
    # reference: greedy on a fresh toy model, token by token
    m = ToyModel()
    st = m.new_state()
    logits = m.forward(prompt, st)
    ref = []
    for _ in range(6):
        ref.append(int(torch.argmax(logits)))
        logits = m.forward([ref[-1]], st)
    assert toks == ref
    assert rt.live["a"].tokens == prompt + toks[:-1]


def test_chunked_prefill_feeds_in_pieces_and_samples_at_the_end(rt):
    op = _Op()
    prompt = list(range(1, 11))
    r1 = rt.prefill(op(), "a", prompt, max_feed=4)
    assert (r1.sample, r1.n_past) == (None, 4)
    r2 = rt.prefill(op(), "a", [], resume=True, max_feed=4)
    assert (r2.sample, r2.n_past) == (None, 8)
    r3 = rt.prefill(op(), "a", [], resume=True, max_feed=4)
    assert r3.sample is not None and r3.n_past == 10
    assert rt.model.calls == [prompt[:4], prompt[4:8], prompt[8:]]
    with pytest.raises(RequestError) as e:
        rt.prefill(op(), "a", [], resume=True)
    assert e.value.code == "FAILED_PRECONDITION"


def test_prefix_reuse_feeds_only_the_suffix(rt):
    op = _Op()
    p1 = [0, 1, 2, 3, 4, 5]
    r = rt.prefill(op(), "a", p1)
    t1 = r.sample.token
    t2 = rt.decode(op(), "a", [t1], 1).sample.token
    rt.release(op(), "a")                                   # cached: p1 + [t1]
    assert not rt.live and len(rt.cached) == 1
    rt.model.calls.clear()
    p2 = p1 + [t1, t2, 50, 51]                               # a longer conversation
    r2 = rt.prefill(op(), "b", p2)
    assert r2.reused == len(p1) + 1
    assert rt.model.calls == [[t2, 50, 51]]
    assert not rt.cached                                     # taken over, not copied
    # same logits as a cold start
    cold = Runtime(ToyModel(), rt.comm, ctx=64)
    assert cold.prefill(1, "x", p2).sample.token == r2.sample.token


def test_a_live_prefix_is_cloned_and_both_continue_independently(rt):
    op = _Op()
    rt.prefill(op(), "a", [0, 1, 2, 3])
    rb = rt.prefill(op(), "b", [0, 1, 2, 3, 4])
    assert rb.reused == 4
    assert rt.live["a"].state is not rt.live["b"].state
    assert rt.live["a"].state.n == 4 and rt.live["b"].state.n == 5


def test_identical_prompt_reuses_the_cached_logits(rt):
    op = _Op()
    ra = rt.prefill(op(), "a", [0, 7, 8])
    rt.release(op(), "a")
    rt.model.calls.clear()
    rb = rt.prefill(op(), "b", [0, 7, 8])
    assert rb.reused == 3 and rt.model.calls == [] and rb.sample.token == ra.sample.token


def test_cache_is_lru_bounded_and_only_exact_prefixes_count(rt):
    op = _Op()
    for i, sid in enumerate("abc"):
        rt.prefill(op(), sid, [0, 100 + i, 1])
        rt.release(op(), sid)
    assert len(rt.cached) == 2                               # max_cached
    assert rt.prefill(op(), "d", [0, 100, 1, 5]).reused == 0  # "a" was evicted
    assert rt.prefill(op(), "e", [0, 102, 1, 5]).reused == 3
    assert rt.prefill(op(), "f", [0, 101, 2, 5]).reused == 0  # diverges inside "b"


def test_request_errors_change_nothing(rt):
    op = _Op()
    rt.prefill(op(), "a", [0, 1])
    before = (dict(rt.live), rt.digest)
    cases = [
        (lambda: rt.prefill(op(), "a", [0, 1]), "ALREADY_EXISTS"),
        (lambda: rt.prefill(op(), "z", []), "INVALID_ARGUMENT"),
        (lambda: rt.prefill(op(), "z", [0, 99999]), "INVALID_ARGUMENT"),
        (lambda: rt.prefill(op(), "z", list(range(65))), "OUT_OF_RANGE"),
        (lambda: rt.decode(op(), "nope", [1], 1), "NOT_FOUND"),
        (lambda: rt.decode(op(), "a", [1], 1, SamplingParams(temperature=-1)), "INVALID_ARGUMENT"),
        (lambda: rt.decode(op(), "a", list(range(63)), 1), "OUT_OF_RANGE"),
    ]
    for fn, code in cases:
        with pytest.raises(RequestError) as e:
            fn()
        assert e.value.code == code
    assert (dict(rt.live), rt.digest) == before
    rt.prefill(op(), "b", [0, 2])
    rt.prefill(op(), "c", [0, 3])
    with pytest.raises(RequestError) as e:
        rt.prefill(op(), "d", [0, 4])
    assert e.value.code == "RESOURCE_EXHAUSTED"


def test_digest_tracks_the_operation_history():
    from ds4tp.comm import SingleComm

    def run(ops):
        r = Runtime(ToyModel(), SingleComm(), ctx=64)
        for k, fn in enumerate(ops, 1):
            fn(r, k)
        return r.digest

    a = [lambda r, k: r.prefill(k, "a", [0, 1, 2]), lambda r, k: r.release(k, "a")]
    assert run(a) == run(a)
    assert run(a) != run(a[:1])
    assert run(a) != run([lambda r, k: r.prefill(k, "a", [0, 1, 3]), a[1]])


def test_release_all_and_drop(rt):
    op = _Op()
    rt.prefill(op(), "a", [0, 1])
    rt.prefill(op(), "b", [0, 2])
    assert rt.release(op(), all=True) == 2
    assert len(rt.cached) == 2 and not rt.live
    assert rt.release(op(), "unknown") == 0
    rt.release(op(), all=True, drop=True)
    assert not rt.cached
