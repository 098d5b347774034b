"""Choosing the next token from the logits, identically on every rank without talking.

All ranks hold identical logits (the model all-gathers them), so they agree on the token if the
choice is a pure function of (logits, params, step). Greedy is an argmax. Random sampling draws
one uniform number from a torch.Generator seeded from (seed, step) and inverts the cumulative
distribution of the kept candidates, computed in float64 with numpy (single-threaded, so the
sums do not depend on a rank's thread count).

Order of the filters (as vLLM): logit_bias, temperature, then top-k, top-p on what top-k kept
(renormalised), then min-p relative to the most likely token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

MAX_TOP_LOGPROBS = 20
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0     # <= 0: greedy
    top_p: float = 1.0           # 0 or >= 1: off
    top_k: int = 0               # <= 0: off
    min_p: float = 0.0           # <= 0: off
    seed: int = 0
    top_logprobs: int = 0        # alternatives to report (0..20)
    logit_bias: dict = field(default_factory=dict)   # token id -> added to its logit

    def check(self, vocab: int) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("temperature", "top_p", "min_p"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        for t, b in self.logit_bias.items():
            if not 0 <= t < vocab:
                raise ValueError(f"logit_bias token {t} is outside the vocabulary [0, {vocab})")
            if math.isnan(b):
                raise ValueError(f"logit_bias for token {t} is NaN")


@dataclass(frozen=True)
class Sample:
    token: int
    logprob: float                      # log-softmax of the raw logits at `token`
    top: list[tuple[int, float]]        # the top_logprobs most likely (token, logprob), best first


def step_seed(seed: int, step: int) -> int:
    """A 64-bit generator seed from (seed, step): splitmix64 of a combination of both, so
    neighbouring steps and seeds give unrelated streams."""
    z = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + (step & _MASK64) + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniform(seed: int, step: int) -> float:
    """The one uniform number in [0, 1) that step `step` of a request with `seed` draws."""
    g = torch.Generator(device="cpu")
    g.manual_seed(step_seed(seed, step))
    return float(torch.rand((), generator=g, dtype=torch.float64))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - (m + math.log(np.exp(x - m).sum()))


def candidates(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(ids, probabilities) of the tokens random sampling may pick, most likely first (ties:
    lower id first), probabilities renormalised over the kept set. Requires temperature > 0."""
    x = logits / p.temperature
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    ids, pr = order, probs[order]
    if p.top_k > 0:
        ids, pr = ids[:p.top_k], pr[:p.top_k]
    if 0 < p.top_p < 1:
        pr = pr / pr.sum()
        # keep the smallest head whose mass reaches top_p (always at least one token)
        before = np.concatenate(([0.0], np.cumsum(pr)[:-1]))
        keep = before < p.top_p
        ids, pr = ids[keep], pr[keep]
    if p.min_p > 0:
        keep = pr >= p.min_p * pr[0]
        ids, pr = ids[keep], pr[keep]
    return ids, pr / pr.sum()


def sample(logits: torch.Tensor, p: SamplingParams, step: int) -> Sample:
    """The token for step `step` (0 = the first generated token) from logits [vocab]."""
    raw = logits.detach().to("cpu", torch.float64).reshape(-1).numpy()
    x = raw
    if p.logit_bias:
        x = raw.copy()
        for t, b in p.logit_bias.items():
            x[t] += b
    if p.temperature <= 0 or p.top_k == 1:
        token = int(np.argmax(x))     # first maximum: ties go to the lower id
    else:
        ids, pr = candidates(x, p)
        u = uniform(p.seed, step)
        i = int(np.searchsorted(np.cumsum(pr), u, side="right"))
        token = int(ids[min(i, len(ids) - 1)])   # min(): u within rounding of the total
    lp = _log_softmax(raw)
    top = []
    if p.top_logprobs:
        n = p.top_logprobs
        head = np.argpartition(-lp, n - 1)[:n] if n < lp.size else np.arange(lp.size)
        head = head[np.lexsort((head, -lp[head]))]
        top = [(int(t), float(lp[t])) for t in head]
    return Sample(token, float(lp[token]), top)
