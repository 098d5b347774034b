"""Choosing the next token from the logits, identically on every rank without talking.

All ranks hold identical logits (the model all-gathers them), so they agree on the token if the
choice is a pure function of (logits, params, step). Greedy is an argmax. Random sampling draws
one uniform number from a torch.Generator seeded from (seed, step) and inverts the cumulative
distribution of the kept candidates, computed in float64.

Order of the filters (as vLLM): logit_bias, temperature, then top-k, top-p on what top-k kept
(renormalised), then min-p relative to the most likely token. The kept set is ordered most likely
first (ties: lower id first). The logprob and top_logprobs are those of the raw logits.

Two twins compute that rule, and `sample` picks by where the logits are:
- `sample_numpy`, on the host (CPU logits; the plain reference): numpy, single-threaded, so the
  sums do not depend on a rank's thread count. It sorts only as much of the 129k-token
  vocabulary as the filters and the draw reach (a full stable sort took ~13 ms per token on a
  2-core x86 host).
- `sample_torch`, on the logits' device (CUDA logits): a full stable sort (~0.1 ms on a GPU),
  the filters as masks over it (no shapes that depend on the data), and one transfer of the
  result to the host at the end. It uses no operation whose result varies from run to run: in
  particular not torch.cumsum over a 1-D float CUDA tensor (see `_running_sums`). On CUDA its
  draw (`_draw_torch`) is replaced by two CUDA C launches after a float32 sort
  (kernels.cuda_sample: the same rule, the same every run), and `_draw_torch` is their twin. On
  an H200 a sampled token's GPU time fell from ~260 to ~84 us (temperature 0.7, top_p 0.9,
  peaked logits; 257 to 140 for flat ones: the draw walks further; bench/sampler_bench.py, s27d).
The twins round differently (summation order, exp), so they may differ when u or top_p lies
within rounding of a cumulative boundary; each twin alone is the same on every rank.
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


def _log_norm(x: np.ndarray) -> float:
    """log(sum(exp(x))): the log-softmax of x is x - _log_norm(x)."""
    m = x.max()
    return float(m + math.log(np.exp(x - m).sum()))


def _descending(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """`ids` ordered by value, largest first, ties to the lower id (a stable sort's order)."""
    return ids[np.lexsort((ids, -values[ids]))]


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest values in _descending order, without sorting the rest."""
    n = values.size
    if k >= n:
        return _descending(values, np.arange(n))
    kth = np.partition(values, n - k)[n - k]                 # the k-th largest value
    return _descending(values, np.flatnonzero(values >= kth))[:k]


def _head(probs: np.ndarray, floor: float, enough) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, probabilities, running sums) of the most likely tokens in _descending order: all
    those at or above a threshold that starts near the top and drops until enough(running sums)
    holds or it reaches `floor` (0: the whole vocabulary). Each head is an exact prefix of the
    fully sorted vocabulary (ties at the threshold are all in), so its running sums are the
    sorted array's, without sorting 129k tokens when a few hundred carry the mass."""
    c = float(probs.max())
    for drop in (2.0 ** -12, 2.0 ** -12, 2.0 ** -16, 0.0):
        c = max(c * drop, floor)
        ids = _descending(probs, np.flatnonzero(probs >= c))
        pr = probs[ids]
        cum = np.cumsum(pr)
        if enough(cum) or c <= floor:
            break
    return ids, pr, cum


def _probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    x = logits / temperature
    probs = np.exp(x - x.max())
    return probs / probs.sum()


def candidates(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(ids, probabilities) of the tokens random sampling may pick, most likely first (ties:
    lower id first), probabilities renormalised over the kept set. Requires temperature > 0.
    With no filter on, that is the whole vocabulary, sorted (`sample` avoids building it)."""
    probs = _probs(logits, p.temperature)
    if p.top_k > 0:
        ids = _top(probs, p.top_k)
        pr = probs[ids]
        if 0 < p.top_p < 1:
            pr = pr / pr.sum()
            before = np.concatenate(([0.0], np.cumsum(pr)[:-1]))
            keep = before < p.top_p
            ids, pr = ids[keep], pr[keep]
        if p.min_p > 0:
            keep = pr >= p.min_p * pr[0]
            ids, pr = ids[keep], pr[keep]
        return ids, pr / pr.sum()
    floor = p.min_p * float(probs.max()) if p.min_p > 0 else 0.0
    top_p = p.top_p if 0 < p.top_p < 1 else None
    # keep the smallest head whose mass reaches top_p (always at least one token), and only
    # tokens at or above min_p x the most likely one's probability: both keep a prefix
    ids, pr, cum = _head(probs, floor, (lambda cum: cum[-1] >= top_p) if top_p else (lambda cum: False))
    if top_p:
        before = np.concatenate(([0.0], cum[:-1]))
        keep = before < top_p
        ids, pr = ids[keep], pr[keep]
    return ids, pr / pr.sum()


def _draw(logits: np.ndarray, p: SamplingParams, u: float) -> int:
    """Invert the kept set's cumulative distribution at u (most likely first)."""
    if p.top_k > 0 or 0 < p.top_p < 1 or p.min_p > 0:
        ids, pr = candidates(logits, p)
        i = int(np.searchsorted(np.cumsum(pr), u, side="right"))
        return int(ids[min(i, len(ids) - 1)])            # min(): u within rounding of the total
    # no filter: every token is a candidate; grow the sorted head only as far as u reaches
    probs = _probs(logits, p.temperature)
    target = u * float(probs.sum())
    ids, _, cum = _head(probs, 0.0, lambda cum: cum[-1] > target)
    i = int(np.searchsorted(cum, target, side="right"))
    return int(ids[min(i, len(ids) - 1)])


def sample_numpy(logits: torch.Tensor, p: SamplingParams, step: int) -> Sample:
    """`sample` on the host with numpy (the reference twin)."""
    raw = logits.detach().to("cpu", torch.float64).reshape(-1).numpy()
    x = raw
    if p.logit_bias:
        x = raw.copy()
        for t, b in p.logit_bias.items():
            x[t] += b
    if p.temperature <= 0 or p.top_k == 1:
        token = int(np.argmax(x))     # first maximum: ties go to the lower id
    else:
        token = _draw(x, p, uniform(p.seed, step))
    norm = _log_norm(raw)
    top = [(int(t), float(raw[t] - norm)) for t in _top(raw, p.top_logprobs)] if p.top_logprobs else []
    return Sample(token, float(raw[token] - norm), top)


# ---- on the logits' device ----------------------------------------------------------------------
_ROW = 512     # _running_sums sums within rows of this many, then adds the rows before


def _running_sums(w: torch.Tensor) -> torch.Tensor:
    """Inclusive running sums of the 1-D float64 `w`, with the same bits on every run.

    torch.cumsum of a 1-D float CUDA tensor is a single-pass scan whose additions group
    differently from run to run (pytorch#75240), so two ranks could split at a boundary. The
    scan along the last dimension of a 2-D tensor runs each row in a fixed order, and a sum is a
    fixed reduction: running sums within rows of _ROW (two rows at least, since torch scans a
    lone row with the 1-D kernel), plus the totals of the rows before. At a row's start the
    rounding may differ from a sequential sum's by an ulp (the running sums may even dip by one
    there), which matters only for a u or top_p within an ulp of a running sum."""
    n = w.numel()
    rows = max(2, -(-n // _ROW))
    within = torch.cat([w, w.new_zeros(rows * _ROW - n)]).view(rows, _ROW).cumsum(1)
    earlier = torch.ones(rows, rows, dtype=torch.bool, device=w.device).tril_(-1)
    before = torch.where(earlier, within[:, -1], 0.0).sum(1)      # [r]: totals of rows < r
    return (within + before[:, None]).view(-1)[:n]


def _draw_torch(x: torch.Tensor, p: SamplingParams, u: float) -> torch.Tensor:
    """`_draw` on x's device: the drawn id as a 1-element tensor. The filters each keep a prefix
    of the sorted vocabulary; they are masks over it here, so no shape depends on the data."""
    z = x / p.temperature
    probs = torch.exp(z - z.max())
    probs = probs / probs.sum()
    pr, ids = torch.sort(probs, descending=True, stable=True)      # ties: lower id first
    if p.top_k > 0:
        pr, ids = pr[:p.top_k], ids[:p.top_k]
    keep = torch.ones_like(pr, dtype=torch.bool)
    if 0 < p.top_p < 1:
        if p.top_k > 0:
            pr = pr / pr.sum()                                     # renormalised over top-k
        before = torch.cat([pr.new_zeros(1), _running_sums(pr)[:-1]])
        keep &= before < p.top_p                                   # the smallest head reaching top_p
    if p.min_p > 0:
        keep &= pr >= p.min_p * pr[0]
    cum = _running_sums(torch.where(keep, pr, 0.0))
    i = (cum <= u * cum[-1]).sum()            # as searchsorted(cum, u * total, side="right")
    # min: u within rounding of the total. A 1-element index, not a 0-dim one: torch reads a
    # 0-dim index tensor on the host, which waits for the device
    return ids[torch.minimum(i, keep.sum() - 1).reshape(1)]


_FEW_BIASES = 8    # logit_bias entries sample_torch adds one by one (and the decode graphs' pick takes)


def greedy_pick(logits: torch.Tensor, bias_ids: torch.Tensor, bias_vals: torch.Tensor,
                out: torch.Tensor | None = None, token: torch.Tensor | None = None) -> torch.Tensor:
    """[token, logprob] (float64, on the logits' device): the first maximum of the float64
    logits plus a logit_bias table (bias_table: ids, values) and the log-softmax of the raw
    logits there: sample_torch's greedy choice. The decode graphs make it after the output head
    (decode_graph.StaticDecoder.pick), so a greedy step's token is known on the device without a
    separate sampling pass. out / token: buffers to write the pick and the token (int64 [1]) to.
    On CUDA one launch (kernels.triton_pick; its norm is log_norm's); the twin:
    greedy_pick_torch."""
    if _pick_launch(logits):
        from ds4tp.kernels import triton_pick
        return triton_pick.pick(logits, bias_ids, bias_vals, out, token)[0]
    raw = logits.detach().reshape(-1).to(torch.float64)
    res = greedy_pick_torch(raw, raw.index_add(0, bias_ids, bias_vals))
    if out is not None:
        res = out.copy_(res)
    if token is not None:
        token.copy_(res[:1].long())
    return res


def _pick_launch(logits: torch.Tensor) -> bool:
    """greedy_pick and log_norm take the one-launch kernel (CUDA float32 logits, switched on)."""
    from ds4tp import kernels
    if not (kernels.on_gpu(logits) and logits.dtype == torch.float32):
        return False
    from ds4tp.kernels import triton_pick
    return triton_pick.enabled()


def greedy_pick_torch(raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """greedy_pick of the float64 logits raw, x = raw plus the bias, in torch ops."""
    return _with_logprob(raw, _first_max(x), torch.logsumexp(raw, 0))


def log_norm(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp of the float64 logits (0-dim): on CUDA greedy_pick's launch (the same bits as
    the norm of a graph's pick), elsewhere torch.logsumexp."""
    if _pick_launch(logits):
        from ds4tp.kernels import triton_pick
        return triton_pick.pick(logits)[2][0]
    return torch.logsumexp(logits.detach().reshape(-1).to(torch.float64), 0)


def _first_max(x: torch.Tensor) -> torch.Tensor:
    return torch.argmax(x).reshape(1)         # the first maximum: ties go to the lower id


def _with_logprob(raw: torch.Tensor, token: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """[token, its logprob] in raw's dtype; norm = logsumexp(raw)."""
    return torch.cat([token.to(raw.dtype), raw[token] - norm])


def picks_on_device(p: SamplingParams) -> bool:
    """Whether the decode graphs' greedy pick is this request's sample: greedy, at most
    _FEW_BIASES logit_bias entries, no top_logprobs."""
    return (p.temperature <= 0 or p.top_k == 1) and not p.top_logprobs and queues_on_device(p)


def queues_on_device(p: SamplingParams) -> bool:
    """Whether sample_device queues this request's sample without waiting for the device (a
    logit_bias of at most _FEW_BIASES entries)."""
    return len(p.logit_bias) <= _FEW_BIASES


def bias_key(bias: dict) -> tuple:
    """A logit_bias as a comparable value (which bias a decode graph's pick was made with)."""
    return tuple(sorted(bias.items()))


def bias_table(bias: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A logit_bias of at most _FEW_BIASES entries as fixed-size (ids, values) for an index_add:
    the unused entries add 0.0 to token 0, which changes no logit (x + 0.0 == x)."""
    if len(bias) > _FEW_BIASES:
        raise ValueError(f"{len(bias)} logit_bias entries; the decode graphs take at most {_FEW_BIASES}")
    ids = torch.zeros(_FEW_BIASES, dtype=torch.int64)
    vals = torch.zeros(_FEW_BIASES, dtype=torch.float64)
    for i, (t, b) in enumerate(bias_key(bias)):
        ids[i], vals[i] = t, b
    return ids.to(device), vals.to(device)


def sample_device(logits: torch.Tensor, p: SamplingParams, step: int) -> torch.Tensor:
    """`sample_torch`'s numbers left on the logits' device, float64 [2 + 2k]: the token, its
    logprob, then k top_logprobs ids and their logprobs (ids are exact in float64; `unpack`
    reads them). Queues work without waiting for the device, unless the logit_bias has more than
    _FEW_BIASES entries (their copy to the device waits), so the runtime can feed the token to
    the next decode step before the host knows it."""
    raw = logits.detach().reshape(-1).to(torch.float64)
    x = raw
    if p.logit_bias:
        x = raw.clone()
        if len(p.logit_bias) <= _FEW_BIASES:  # the usual one (EOS banned: ignore_eos, min_tokens):
            for t, b in p.logit_bias.items():  # scalar adds, no host-to-device copy to wait for
                x[t] += b
        else:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.int64, device=raw.device)
            bias = torch.tensor(list(p.logit_bias.values()), dtype=torch.float64, device=raw.device)
            x[ids] += bias                    # ids are distinct (dict keys): a plain indexed write
    greedy = p.temperature <= 0 or p.top_k == 1
    order = None                              # raw's descending order, where a sort made it
    if greedy:
        token = _first_max(x)
    else:
        token, order = _draw_device(x, p, uniform(p.seed, step), logits)
    norm = log_norm(logits)
    head = _with_logprob(raw, token, norm)    # greedy: greedy_pick's numbers, as the graphs pick
    if not p.top_logprobs:
        return head
    if order is None:
        order = _descending_ids(logits.detach().reshape(-1))
    top = order[:p.top_logprobs]                                  # ties: lower id
    return torch.cat([head, top.double(), raw[top] - norm])


def _descending_ids(v: torch.Tensor) -> torch.Tensor:
    """The ids of v in descending order, ties to the lower id (a stable sort)."""
    return torch.sort(v, descending=True, stable=True).indices


def _draw_device(x: torch.Tensor, p: SamplingParams, u: float, logits: torch.Tensor):
    """(the token drawn at u as a 1-element tensor, raw's descending order or None): on CUDA
    two launches after one sort (kernels.cuda_sample), elsewhere the twin `_draw_torch`. The
    sort is of float32 values where x holds float32 numbers exactly (float32 logits and a bias
    of only 0 and +-inf: half the radix passes of float64, the same order); with no bias, that
    order is also raw's, which top_logprobs reuses."""
    from ds4tp.kernels import cuda_sample
    if not (x.is_cuda and cuda_sample.available()):
        return _draw_torch(x, p, u), None
    exact32 = logits.dtype == torch.float32 and all(b == 0 or math.isinf(b) for b in p.logit_bias.values())
    ids = _descending_ids(x.float() if exact32 else x)
    token = cuda_sample.draw(x, ids, p.temperature, p.top_k, p.top_p, p.min_p, u)
    if token is None:
        return _draw_torch(x, p, u), None
    return token, (ids if exact32 and not p.logit_bias else None)


def unpack(out: list) -> Sample:
    """A Sample from sample_device's numbers, on the host."""
    n = (len(out) - 2) // 2
    return Sample(int(out[0]), out[1], [(int(t), lp) for t, lp in zip(out[2:2 + n], out[2 + n:])])


def sample_torch(logits: torch.Tensor, p: SamplingParams, step: int) -> Sample:
    """`sample` with torch on the logits' device (any device: the tests run it on the CPU).
    The host waits on the device once, for the final few numbers (and, with a logit_bias of
    more than _FEW_BIASES entries, for the copy of the bias to the device)."""
    return unpack(sample_device(logits, p, step).tolist())


def sample(logits: torch.Tensor, p: SamplingParams, step: int) -> Sample:
    """The token for step `step` (0 = the first generated token) from logits [vocab]: sampled
    where the logits are (CUDA: `sample_torch`; otherwise `sample_numpy`)."""
    if logits.is_cuda:
        return sample_torch(logits, p, step)
    return sample_numpy(logits, p, step)
