"""The two sampling twins: `sample_torch` (on the logits' device) against `sample_numpy` (the
host reference), on CPU tensors; and `sample`'s choice between them."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ds4tp.worker import sampling
from ds4tp.worker.sampling import (SamplingParams, _running_sums, sample, sample_numpy,
                                   sample_torch, uniform)

VOCABS = (50, 3000, 129280)
KINDS = ("peaked", "flat", "ties", "banned")
FILTERS = {                                   # each filter combination the random draw supports
    "none": {},
    "top_k": dict(top_k=40),
    "top_p": dict(top_p=0.9),
    "min_p": dict(min_p=0.05),
    "top_k+top_p": dict(top_k=500, top_p=0.7),
    "all three": dict(top_k=200, top_p=0.95, min_p=0.02),
    "logit_bias": dict(top_p=0.98, bias=True),
}


def logits(kind: str, vocab: int, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
    """float32 logits [vocab] of one kind of distribution, and a logit_bias for it."""
    x = rng.standard_normal(vocab).astype(np.float32)
    if kind == "peaked":
        x *= 12
    elif kind == "flat":
        x *= 0.5
    elif kind == "ties":                                   # many exactly equal logits
        x = np.round(x * 2)
    elif kind == "banned":                                 # the best ones set to -inf by the bias
        x *= 3
    order = np.argsort(-x, kind="stable")
    bias = {int(t): 2.5 for t in rng.choice(vocab, size=min(5, vocab), replace=False)}
    if kind == "banned":
        bias.update({int(t): -math.inf for t in order[:vocab // 10]})
    return torch.from_numpy(x), bias


def params(kw: dict, bias: dict, kind: str = "", **more) -> SamplingParams:
    """SamplingParams of FILTERS' `kw`; the bias applies where kw asks, or the kind bans."""
    kw = dict(kw)
    use = kw.pop("bias", False) or kind == "banned"
    return SamplingParams(logit_bias=bias if use else {}, **kw, **more)


def boundary_distance(x: torch.Tensor, p: SamplingParams, u: float) -> float:
    """How close the draw at u comes to a decision boundary of the rule, computed on a full
    stable sort in float64: u against the kept set's running sums, top_p against the running
    sums of what top-k kept, min_p x the most likely against each probability (relative)."""
    z = x.double().numpy().copy()
    for t, b in p.logit_bias.items():
        z[t] += b
    z = z / p.temperature
    pr = np.exp(z - z.max())
    pr = np.sort(pr / pr.sum(), kind="stable")[::-1]
    if p.top_k > 0:
        pr = pr[:p.top_k] / pr[:p.top_k].sum()
    near = []
    keep = np.ones(pr.size, bool)
    if 0 < p.top_p < 1:
        before = np.concatenate(([0.0], np.cumsum(pr)[:-1]))
        near.append(np.abs(before - p.top_p).min())
        keep &= before < p.top_p
    if p.min_p > 0:
        near.append(np.abs(pr / pr[0] - p.min_p).min())
        keep &= pr >= p.min_p * pr[0]
    cum = np.cumsum(pr[keep] / pr[keep].sum())
    near.append(np.abs(cum - u).min())
    return float(min(near))


def assert_same_sample(a, b, what):
    assert a.token == b.token, what
    assert math.isclose(a.logprob, b.logprob, rel_tol=0, abs_tol=1e-9), what
    assert [t for t, _ in a.top] == [t for t, _ in b.top], what
    assert all(math.isclose(la, lb, rel_tol=0, abs_tol=1e-9) for (_, la), (_, lb) in zip(a.top, b.top)), what


# ---- the running sums ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 511, 512, 513, 1024, 3000, 129280])
def test_running_sums_are_the_cumulative_sums(n):
    rng = np.random.default_rng(n)
    w = rng.random(n)
    got = _running_sums(torch.from_numpy(w)).numpy()
    assert got.shape == (n,)
    np.testing.assert_allclose(got, np.cumsum(w), rtol=1e-13, atol=0)
    ints = rng.integers(0, 1000, n).astype(np.float64)     # exact in any order of addition
    assert np.array_equal(_running_sums(torch.from_numpy(ints)).numpy(), np.cumsum(ints))


# ---- greedy and the logprobs --------------------------------------------------------------------
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_and_logprobs_match_the_numpy_twin(vocab, kind):
    rng = np.random.default_rng([vocab, KINDS.index(kind)])
    for trial in range(3):
        x, bias = logits(kind, vocab, rng)
        for p in (SamplingParams(top_logprobs=20, logit_bias=bias),
                  params({}, bias, kind, top_logprobs=5),
                  SamplingParams(temperature=0.7, top_k=1, top_logprobs=3, logit_bias=bias)):
            a, b = sample_numpy(x, p, trial), sample_torch(x, p, trial)
            assert_same_sample(a, b, (vocab, kind, trial, p))
            assert len(b.top) == min(p.top_logprobs, vocab)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("kind", KINDS)
def test_the_decode_graphs_pick_is_the_torch_twins_greedy_sample(vocab, kind):
    """The pick the decode graphs make after the head (greedy_pick over the logits plus a
    fixed-size bias table, decode_graph.StaticDecoder) is sample_torch's greedy sample, to the
    bit, for every request picks_on_device accepts."""
    rng = np.random.default_rng([vocab, KINDS.index(kind), 1])
    for trial in range(3):
        x, bias = logits(kind, vocab, rng)
        few = dict(list(bias.items())[:sampling._FEW_BIASES])
        if kind == "ties":
            few[0] = 0.0                     # a real entry on token 0, beside the padding's zeros
        for p in (SamplingParams(), SamplingParams(logit_bias=few),
                  SamplingParams(temperature=0.9, top_k=1, logit_bias=few)):
            assert sampling.picks_on_device(p)
            pick = sampling.greedy_pick(x, *sampling.bias_table(p.logit_bias, "cpu"))
            want = sample_torch(x, p, trial)
            assert pick.tolist() == [want.token, want.logprob], (vocab, kind, trial, p)
    assert not sampling.picks_on_device(SamplingParams(top_logprobs=1))
    assert not sampling.picks_on_device(SamplingParams(temperature=0.5))
    assert not sampling.picks_on_device(SamplingParams(logit_bias={t: 1.0 for t in range(9)}))
    with pytest.raises(ValueError, match="at most 8"):
        sampling.bias_table({t: 1.0 for t in range(9)}, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the pick's Triton launch)")
@pytest.mark.parametrize("kind", KINDS)
def test_the_pick_launch_is_its_twins_pick_and_sample_devices_on_cuda(kind):
    """On CUDA greedy_pick is one launch (kernels.triton_pick) over DS4's 129,280 logits: the
    token of its torch twin, the logprob to float64 rounding; and sample_device's greedy sample
    (argmax in torch, the norm from the same launch: log_norm) is the launch's pick to the bit,
    with top_logprobs too, so a chained step and a sampled one report the same logprob."""
    rng = np.random.default_rng([KINDS.index(kind), 2])
    for trial in range(3):
        x, bias = logits(kind, 129280, rng)
        few = dict(list(bias.items())[:sampling._FEW_BIASES])
        for p in (SamplingParams(), SamplingParams(logit_bias=few)):
            pick = sampling.greedy_pick(x.cuda(), *sampling.bias_table(p.logit_bias, "cuda")).cpu()
            want = sampling.greedy_pick(x, *sampling.bias_table(p.logit_bias, "cpu"))   # the twin (CPU)
            assert pick[0] == want[0], (kind, trial, p)
            assert abs(float(pick[1] - want[1])) <= 1e-12 * max(1.0, abs(float(want[1]))), (pick, want)
            for q in (p, SamplingParams(logit_bias=p.logit_bias, top_logprobs=5)):
                assert sampling.sample_device(x.cuda(), q, trial)[:2].cpu().tolist() == pick.tolist()


def test_torch_twin_breaks_ties_to_the_lower_id():
    x = torch.zeros(10)
    x[[7, 3, 5]] = 2.0
    s = sample_torch(x, SamplingParams(top_logprobs=4), 0)
    assert s.token == 3
    assert [t for t, _ in s.top] == [3, 5, 7, 0]
    assert sample_torch(x, SamplingParams(temperature=1.0, top_k=1), 9).token == 3
    assert sample_torch(x, SamplingParams(logit_bias={3: -math.inf}), 0).token == 5
    # among equal probabilities the kept set runs lower id first: with two equal tokens a
    # draw below 1/2 picks the lower one
    y = torch.full((6,), -50.0)
    y[[4, 1]] = 0.0
    p = SamplingParams(temperature=1.0, seed=5)
    for step in range(40):
        assert sample_torch(y, p, step).token == (1 if uniform(5, step) < 0.5 else 4)


def test_torch_twin_filters_keep_the_documented_candidates():
    x = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64))
    for kw, want in ((dict(top_k=3), {0, 1, 2}), (dict(top_p=0.7), {0, 1}),
                     (dict(top_p=0.71), {0, 1, 2}), (dict(min_p=0.3), {0, 1, 2}),
                     (dict(top_k=4, top_p=0.6), {0, 1}), ({}, {0, 1, 2, 3, 4})):
        p = SamplingParams(temperature=1.0, seed=11, **kw)
        assert {sample_torch(x, p, k).token for k in range(400)} == want, kw


# ---- random sampling ----------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("kind", KINDS)
def test_random_draws_match_the_numpy_twin(vocab, kind):
    """The same token for many (seed, step) pairs under each filter combination. Both twins work
    in float64 but round differently (summation order, exp), so a disagreement is allowed only
    where the rule itself is within rounding of a boundary (none has been seen)."""
    rng = np.random.default_rng([vocab, KINDS.index(kind), 7])
    steps = 4 if vocab > 10_000 else 25
    drawn, differ = set(), []
    for name, kw in FILTERS.items():
        x, bias = logits(kind, vocab, rng)
        p = params(kw, bias, kind, temperature=float(rng.choice([0.6, 1.0, 1.5])),
                   seed=int(rng.integers(1 << 62)), top_logprobs=2)
        for step in rng.integers(0, 1 << 20, steps):
            a, b = sample_numpy(x, p, int(step)), sample_torch(x, p, int(step))
            drawn.add(b.token)
            if a.token != b.token:
                differ.append((name, int(step), boundary_distance(x, p, uniform(p.seed, int(step)))))
                continue
            assert_same_sample(a, b, (vocab, kind, name, step))
    assert all(d < 1e-12 for *_, d in differ), differ
    assert len(differ) <= 1, differ
    assert len(drawn) > len(FILTERS), drawn            # the draws did vary


def test_a_draw_exactly_on_a_boundary_takes_the_next_token():
    """Where the sums are exact (equal probabilities of 1/4), u on a running sum picks the next
    token in both twins (searchsorted side="right"), and top_p on one keeps the tokens before."""
    x = torch.full((10,), -math.inf, dtype=torch.float64)
    x[[9, 2, 5, 7]] = 1.0                                  # kept order: 2, 5, 7, 9
    for kw, us, want in ((dict(), (0.0, 0.25, 0.5, 0.75, 1 - 2 ** -53), (2, 5, 7, 9, 9)),
                         (dict(top_p=0.5), (0.0, 0.49, 0.5, 0.99), (2, 2, 5, 5)),
                         (dict(min_p=1.0, top_k=3), (0.0, 0.5, 0.7), (2, 5, 7))):
        p = SamplingParams(temperature=1.0, **kw)
        for u, t in zip(us, want):
            assert sampling._draw(x.numpy(), p, u) == t, (kw, u)
            assert int(sampling._draw_torch(x, p, u)) == t, (kw, u)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (kernels.cuda_sample)")
@pytest.mark.parametrize("vocab", (3000, 129280))
@pytest.mark.parametrize("kind", KINDS)
def test_the_cuda_draw_matches_its_torch_twin(vocab, kind):
    """kernels.cuda_sample's draw (two CUDA C launches after one sort) against its twin
    _draw_torch on the same device, for fresh logits, every filter combination and many u: the
    same token, except where the rule is within rounding of a boundary; the same token again on
    a second call. The exact-boundary cases of the test above pick the same tokens."""
    from ds4tp.kernels import cuda_sample
    rng = np.random.default_rng([vocab, KINDS.index(kind), 11])
    differ, n, drawn = [], 0, set()
    for name, kw in FILTERS.items():
        x, bias = logits(kind, vocab, rng)
        p = params(kw, bias, kind, temperature=float(rng.choice([0.6, 1.0, 1.5])))
        xb = x.double().clone()
        for t, b in p.logit_bias.items():
            xb[t] += b
        xc = xb.cuda()
        for u in np.concatenate([rng.random(12), [0.0, 1 - 2 ** -53]]):
            got, _ = sampling._draw_device(xc, p, float(u), x.cuda())
            assert cuda_sample.draw(xc, torch.sort(xc, descending=True, stable=True).indices,
                                    p.temperature, p.top_k, p.top_p, p.min_p, float(u)) is not None
            want = int(sampling._draw_torch(xc, p, float(u)))
            again, _ = sampling._draw_device(xc, p, float(u), x.cuda())
            assert int(got) == int(again)
            n += 1
            drawn.add(int(got))
            if int(got) != want:
                differ.append((name, float(u), boundary_distance(x, p, float(u))))
    assert all(d < 1e-12 for *_, d in differ), differ
    assert len(differ) <= 2, differ
    assert len(drawn) > len(FILTERS), drawn
    x = torch.full((10,), -math.inf, dtype=torch.float64)
    x[[9, 2, 5, 7]] = 1.0
    for kw, us, want in ((dict(), (0.0, 0.25, 0.5, 0.75, 1 - 2 ** -53), (2, 5, 7, 9, 9)),
                         (dict(top_p=0.5), (0.0, 0.49, 0.5, 0.99), (2, 2, 5, 5)),
                         (dict(min_p=1.0, top_k=3), (0.0, 0.5, 0.7), (2, 5, 7))):
        p = SamplingParams(temperature=1.0, **kw)
        for u, t in zip(us, want):
            got, _ = sampling._draw_device(x.cuda(), p, u, x.float().cuda())
            assert int(got) == t, (kw, u)


def test_boundary_distance_sees_a_draw_on_a_boundary():
    """The allowance above is not vacuous: away from boundaries the distance is large, and u on
    a running sum gives ~0."""
    x = torch.log(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    p = SamplingParams(temperature=1.0)
    assert boundary_distance(x, p, 0.6) > 0.09
    assert boundary_distance(x, p, 0.75) < 1e-15


# ---- which twin runs ----------------------------------------------------------------------------
def test_sample_runs_the_numpy_twin_for_cpu_logits(monkeypatch):
    def boom(*a):
        raise AssertionError("sample_torch ran for CPU logits")
    monkeypatch.setattr(sampling, "sample_torch", boom)
    assert sample(torch.tensor([0.0, 3.0, 1.0]), SamplingParams(), 0).token == 1


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: checks that CUDA logits are sampled on the GPU")
def test_sample_runs_the_torch_twin_on_cuda(monkeypatch):
    rng = np.random.default_rng(5)
    x, bias = logits("flat", 129280, rng)
    ps = [params(kw, bias, temperature=0.8, seed=3, top_logprobs=5) for kw in FILTERS.values()]
    want = [[sample_numpy(x, p, k) for k in range(3)] for p in ps]

    def boom(*a):
        raise AssertionError("sample_numpy ran for CUDA logits")
    monkeypatch.setattr(sampling, "sample_numpy", boom)
    xc = x.cuda()
    for p, ref in zip(ps, want):
        for k in range(3):
            got = sample(xc, p, k)
            assert got == sample(xc, p, k)                           # the same on every run
            if got.token != ref[k].token:
                assert boundary_distance(x, p, uniform(p.seed, k)) < 1e-12, (p, k)
                continue
            assert_same_sample(got, ref[k], (p, k))
    ties = torch.zeros(129280, device="cuda")
    ties[[90000, 4097, 70000]] = 1.0
    assert sample(ties, SamplingParams(), 0).token == 4097        # argmax: the first maximum
    w = torch.rand(129280, dtype=torch.float64, device="cuda")
    first = _running_sums(w)
    assert all(torch.equal(first, _running_sums(w)) for _ in range(50))
    np.testing.assert_allclose(first.cpu().numpy(), np.cumsum(w.cpu().numpy()), rtol=1e-13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (asynchronous work)")
@pytest.mark.parametrize("name", ["greedy", "banned", "top_p", "all three", "top_logprobs"])
def test_sample_device_queues_without_waiting_for_the_device(name):
    """sample_device only queues work (the runtime feeds its token to the next decode step
    before reading it): it returns while a long kernel queued before it is still running, and
    its numbers are then sample_torch's."""
    rng = np.random.default_rng(3)
    x, bias = logits("flat", 129280, rng)
    p = {"greedy": SamplingParams(logit_bias={5: -math.inf}),
         "banned": SamplingParams(temperature=0.8, logit_bias={5: -math.inf, 6: 1.0}),
         "top_p": SamplingParams(temperature=0.8, top_p=0.95, seed=1),
         "all three": SamplingParams(temperature=0.7, top_k=200, top_p=0.9, min_p=0.02, seed=2),
         "top_logprobs": SamplingParams(temperature=0.9, top_logprobs=5, seed=3)}[name]
    xc = x.cuda()
    sampling.sample_device(xc, p, 4)                  # allocator and kernels warm
    torch.cuda.synchronize()
    torch.cuda._sleep(1 << 30)                        # ~0.5 s of GPU time
    busy = torch.cuda.Event()
    busy.record()
    out = sampling.sample_device(xc, p, 4)
    assert not busy.query(), "sample_device waited for the device"
    assert sampling.unpack(out.tolist()) == sample_torch(xc, p, 4)

