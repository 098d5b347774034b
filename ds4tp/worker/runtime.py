"""The worker's sequences: model states keyed by sequence id, prefix reuse, and the step loop.

Every rank holds one `Runtime` and receives the same operations in the same order from the
gateway, so every rank makes the same decisions (which cached state to reuse, how many tokens
to feed) and calls `model.forward` with identical arguments, as the collectives inside the
model require. Steps are serialized by a lock.

Each operation extends a running digest (a hash of every operation this rank executed). Before
a forward pass the ranks all-gather the digest they are about to reach; if it differs, the
ranks have diverged (a lost or reordered operation) and the step fails as `DesyncError` before
the model can mix inconsistent collectives. Decode steps queued ahead (lookahead, chaining) skip
that all-gather: their collectives are the same whatever the token, and no eager collective may
run beside a decode graph. The gateway compares the digests of every reply.

Errors: `RequestError` is a bad request, raised before anything changes, identically on every
rank. Anything else raised by a step (a failed collective, a desync, a model error) leaves the
ranks in unknown states: the caller must treat it as fatal and restart the whole group.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ds4tp.worker import DECODERS
from ds4tp.worker.sampling import (Sample, SamplingParams, bias_key, picks_on_device,
                                   queues_on_device, sample, sample_device, unpack)


class RequestError(ValueError):
    """A request the runtime refuses; `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class DesyncError(RuntimeError):
    """The ranks reached different operation digests."""


@dataclass
class Slot:
    """One model state and the tokens it has consumed."""
    state: object
    tokens: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None   # after the last consumed token
    pending: list[int] = field(default_factory=list)   # prompt tokens not fed yet
    lane: "_Lane | None" = None     # the fast decoder holding its decode state, if any (then
                                   # `state` is stale until Runtime._unbind writes it back)
    parked: object | None = None   # its decode state set aside by a fast decoder (likewise)
    ahead: int | None = None       # a sampled token already fed by lookahead (in `tokens`), which
                                   # the gateway has not sent back yet
    pick: tuple | None = None      # the fast decoder's greedy pick after `tokens` (Runtime._fast_step):
                                   # (its copy, a CUDA event or None, the logit_bias's bias_key)


@dataclass(eq=False)
class _Lane:
    """One static decoder (decode_graph.StaticDecoder) and the slot bound to it."""
    dec: object
    slot: Slot | None = None
    used: int = 0                  # when it last stepped (the least recently used one is parked)


@dataclass(frozen=True)
class StepResult:
    seq_id: str
    n_past: int
    reused: int
    sample: Sample | None
    forward_s: float
    sample_s: float
    wait_s: float
    digest: int


def _digest(prev: int, *parts) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(prev.to_bytes(8, "little"))
    for p in parts:
        if isinstance(p, (list, tuple)):
            h.update(array("q", p).tobytes())
        else:
            h.update(str(p).encode())
        h.update(b"|")
    return int.from_bytes(h.digest(), "little") >> 1   # 63 bits: fits a signed int64 tensor


# Prompt lengths a worker prefills at start (Runtime.warm_up): 1 and 16 (Triton specialises an
# integer argument equal to 1 or divisible by 16), both sides of the token counts where kernels
# change launch shape (FMA_MAX_T = 2, the CUDA C experts' MAX_T = 4, TQ_MAX = 16 and GEMM_MIN_T =
# 17), and the gateway's 2048-token prefill chunk; a test keeps them in step with those constants.
# Also every length that compiled new Triton specialisations in bench/warm_profile.py (an H200,
# one rank of TP=2's shapes, lengths 1-20 and up: 6, 8 and 9 as well; integer arguments derived
# from the token count hit the divisible-by-16 specialisation at other counts), and a few
# multiples of 8 and 16 beyond the chunked range.
WARM_PREFILL_LENGTHS = (1, 2, 3, 4, 5, 6, 8, 9, 16, 17, 24, 32, 48, 64, 100, 2048)


class Runtime:
    """Sequences of one rank. `max_sequences` live sequences at most; released states are kept
    (up to `max_cached`, least recently used evicted first) so a request whose prompt extends one
    of them only feeds the new suffix."""

    def __init__(self, model, comm, *, ctx: int, device="cpu", max_sequences: int = 16,
                 max_cached: int = 4, fast_decode: bool | None = None, lookahead: bool | None = None,
                 decoders: int = DECODERS, graph_feed: int = 0):
        self.model, self.comm, self.ctx = model, comm, int(ctx)
        self.device = torch.device(device)
        # One-token decode steps on CUDA go through static-buffer decoders (CUDA graphs), each
        # bound to one slot at a time (a lane): `decoders` sequences decode without touching
        # each other's state, so their steps queue back to back. A sequence without a lane takes
        # a free one or parks the least recently used lane's slot (a few copies); a slot's
        # SessionState is written back only before something eager (prefill, cloning, the prefix
        # cache) touches it.
        if fast_decode is None:
            fast_decode = self.device.type == "cuda"
        if decoders < 1:
            raise ValueError(f"decoders must be at least 1, got {decoders}")
        self.lanes: list[_Lane] = []
        if fast_decode:
            from ds4tp.decode_graph import StaticDecoder
            self.lanes = [_Lane(StaticDecoder(model, max_ctx=self.ctx)) for _ in range(decoders)]
        self._ticks = 0
        # Prompts (or prompt chunks) of at most `graph_feed` tokens are fed one decode step each
        # through a lane's graphs instead of one eager forward: an eager forward of a few tokens
        # costs its launches (~0.2 s on an H200), a graph step ~5 ms. warm_up measures both on
        # CUDA and sets it (the same on every rank); 0: every prompt goes eager.
        self.graph_feed = int(graph_feed) if self.lanes else 0
        # Lookahead (proto: DecodeRequest.lookahead): a decode step's sampled token is fed to the
        # fast decoder before the reply goes out, so the GPU runs the next step while the reply
        # and the gateway's next request travel. Only where the decoder runs asynchronously
        # (CUDA); elsewhere the reply would wait for the next step.
        self.lookahead = bool(self.lanes) and bool(
            self.device.type == "cuda" if lookahead is None else lookahead)
        self._in_flight = False      # a lookahead step may still be running on the GPU
        # Chaining (requests with lookahead): the next step is queued before the host knows the
        # token it consumes, so the GPU does not wait for the host between steps. Its token is
        # the greedy pick the decode graph left in the lane's token buffer (every step on a lane
        # is its slot's, so the buffer holds the pick of that slot's last step while the slot
        # keeps the lane), or else sampled on the device (sampling.sample_device) and copied there.
        self.chained = 0             # steps queued that way (tests, metrics)
        self.vocab = int(model.shape.vocab)
        self.max_sequences, self.max_cached = max_sequences, max_cached
        self.live: dict[str, Slot] = {}
        self.cached: OrderedDict[int, Slot] = OrderedDict()   # oldest first
        self._next_key = 0
        self.digest = 0
        self.steps = 0
        self._lock = threading.Lock()

    def warm_up(self, lengths=WARM_PREFILL_LENGTHS) -> dict:
        """Compile kernels and capture the decode graphs before the first request: on a cold GPU
        the first prefill or decode step would otherwise spend seconds to minutes compiling, past
        the gateway's step deadline. Prefills of each of `lengths` tokens (at most ctx) on scratch
        states, the longest continued by a second chunk and by a few more tokens (later chunks,
        the indexer on), then every decode-graph variant. Runs collectives: every rank calls it
        with the same arguments. Leaves no sequence state behind. Returns what ran."""
        with self._lock, self._on_device():
            if self.live or any(lane.slot is not None for lane in self.lanes):
                raise RuntimeError("warm_up runs before any sequence")
            lengths = sorted({min(int(n), self.ctx) for n in lengths if n > 0})
            ctxs = self._gathered(self.ctx)   # different contexts: different collectives, a hang
            if len(set(ctxs)) != 1:
                raise RuntimeError(f"the ranks were started with different --ctx: {ctxs}")

            ran, secs, st = [], [], None

            def feed(st, n, name):
                t = time.perf_counter()
                self.model.forward([(7 * (st.n + i) + 3) % self.vocab for i in range(n)], st)
                ran.append(name)
                secs.append(round(time.perf_counter() - t, 2))

            for n in lengths:
                st = self.model.new_state()
                feed(st, n, n)
            if st is not None:
                second = min(st.n, self.ctx - st.n - 3)     # leaves room for a short third
                for more in (second, 3):
                    more = min(more, self.ctx - st.n)
                    if more > 0:
                        feed(st, more, f"+{more}")
            t = time.perf_counter()
            variants = [lane.dec.warm_up() for lane in self.lanes]
            done = {"prefill": ran, "prefill_s": secs, "decoders": len(self.lanes),
                    "decode_variants": len(variants[0]) if variants else 0,
                    "decode_s": round(time.perf_counter() - t, 2)}
            if self.device.type == "cuda":    # the sampler's kernels compiled (kernels.cuda_sample)
                t = time.perf_counter()
                p = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.01, top_logprobs=1)
                sample_device(torch.zeros(self.vocab, device=self.device), p, 0).tolist()   # (waits)
                done["sampler_s"] = round(time.perf_counter() - t, 2)
            if self.lanes and self.device.type == "cuda":
                done.update(self._graph_feed_limit())
            return done

    def _graph_feed_limit(self, n: int = 8) -> dict:
        """Time an eager forward of n tokens and n graph steps (scratch states, kernels already
        compiled and graphs captured), and feed prompts of at most eager / step tokens through
        the graphs from now on: the smallest such count over the ranks, at most 64."""
        toks = [(5 * i + 1) % self.vocab for i in range(n)]
        sync = (torch.cuda.current_stream(self.device).synchronize if self.device.type == "cuda"
                else (lambda: None))
        sync()
        t = time.perf_counter()
        self.model.forward(toks, self.model.new_state())
        sync()
        eager = time.perf_counter() - t
        dec = self.lanes[0].dec
        saved = dec.park()                       # an empty decoder: restored below
        dec.load_session(self.model.new_state())
        sync()
        t = time.perf_counter()
        for tok in toks:
            dec.step(tok)
        sync()
        step = (time.perf_counter() - t) / n
        dec.resume(saved)
        self.graph_feed = min(self._gathered(min(64, int(eager / step))))
        return {"graph_feed": self.graph_feed, "eager_forward_s": round(eager, 4),
                "graph_step_s": round(step, 5)}

    def _on_device(self):
        """This runtime's GPU as the calling thread's current CUDA device. The gRPC servicer calls
        in from its own threads, whose current device is cuda:0 (torch.cuda.set_device holds per
        thread): without this, rank 1 of a two-GPU host launched its kernels on cuda:0's streams
        against cuda:1's memory."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    # ---- operations ---------------------------------------------------------------------
    def prefill(self, op: int, seq_id: str, tokens: list[int], *, resume: bool = False,
                max_feed: int = 0, params: SamplingParams = SamplingParams()) -> StepResult:
        """Start `seq_id` from the prompt `tokens` (resume=False) or continue feeding the prompt
        given at start (resume=True, tokens empty). Feeds at most max_feed tokens (0: all);
        samples step 0 once the whole prompt is in."""
        t0 = time.perf_counter()
        with self._lock, self._on_device():
            wait = time.perf_counter() - t0
            self._check_params(params)
            if resume:
                if tokens:
                    raise RequestError("INVALID_ARGUMENT", "a resumed prefill carries no tokens")
                slot = self._live(seq_id)
                if not slot.pending:
                    raise RequestError("FAILED_PRECONDITION", f"sequence {seq_id!r} has no prompt left to feed")
                reused = 0
            else:
                self._check_new(seq_id, tokens)
                slot = self._start(seq_id, tokens)
                reused = len(slot.tokens)
            feed = slot.pending[:max_feed] if max_feed > 0 else slot.pending
            fwd = self._feed(op, "prefill", seq_id, slot, feed, params)
            slot.pending = slot.pending[len(feed):]
            t1 = time.perf_counter()
            s = None if slot.pending else (self._picked(slot, params) or sample(slot.logits, params, 0))
            return self._result(seq_id, slot, reused, s, fwd, time.perf_counter() - t1, wait)

    def decode(self, op: int, seq_id: str, tokens: list[int], step: int,
               params: SamplingParams = SamplingParams(), *, lookahead: bool = False,
               stop_tokens=()) -> StepResult:
        """Append `tokens` (normally the token sampled last) to `seq_id` and sample step `step`.
        With `lookahead` (and self.lookahead), the sampled token, unless at the context's end, is
        fed to the model before returning (asynchronously on the GPU); the sequence's next decode
        must then carry exactly that token. When this decode's token was itself fed ahead, the
        next step is queued before the sample is known (`_chain`), so a sampled stop token is fed
        too; otherwise a token in `stop_tokens` is not."""
        t0 = time.perf_counter()
        with self._lock, self._on_device():
            wait = time.perf_counter() - t0
            self._check_params(params)
            slot = self._live(seq_id)
            if slot.pending:
                raise RequestError("FAILED_PRECONDITION", f"sequence {seq_id!r} still has "
                                   f"{len(slot.pending)} prompt tokens to prefill")
            self._check_tokens(tokens)
            if slot.ahead is not None:
                if list(tokens) != [slot.ahead]:
                    raise RequestError("FAILED_PRECONDITION", f"sequence {seq_id!r} already consumed "
                                       f"token {slot.ahead} by lookahead; its next decode must carry "
                                       f"exactly that token, not {list(tokens)}")
                if lookahead and self._chainable(slot, params):
                    s, fwd, smp = self._chain(op, seq_id, slot, params, step)
                    return self._result(seq_id, slot, 0, s, fwd, smp, wait)
                fwd = self._settle(op, seq_id, slot)
            else:
                if len(slot.tokens) + len(tokens) > self.ctx:
                    raise RequestError("OUT_OF_RANGE", f"sequence {seq_id!r} would exceed the "
                                       f"context of {self.ctx} tokens")
                fwd = self._feed(op, "decode", seq_id, slot, list(tokens), params)
            t1 = time.perf_counter()
            s = self._picked(slot, params) or sample(slot.logits, params, step)
            smp = time.perf_counter() - t1
            if (lookahead and self.lookahead and s.token not in stop_tokens
                    and len(slot.tokens) < self.ctx):
                self._look_ahead(op, seq_id, slot, s.token, params)
            return self._result(seq_id, slot, 0, s, fwd, smp, wait)

    def release(self, op: int, seq_id: str = "", *, all: bool = False, drop: bool = False) -> int:
        """End `seq_id` (or every live sequence). Unless `drop`, a state that consumed tokens is
        kept for prefix reuse. With all and drop the cache is emptied too. Returns how many
        live sequences ended; an unknown id is not an error (releasing is idempotent)."""
        with self._lock, self._on_device():
            ids = list(self.live) if all else ([seq_id] if seq_id in self.live else [])
            for sid in ids:
                slot = self.live.pop(sid)
                slot.pending = []
                slot.ahead = None          # its lookahead token stays in its tokens
                if not drop and slot.tokens and slot.logits is not None:
                    self.cached[self._next_key] = slot
                    self._next_key += 1
                else:
                    self._forget(slot)
            if all and drop:
                for slot in self.cached.values():
                    self._forget(slot)
                self.cached.clear()
            while len(self.cached) > self.max_cached:
                self._forget(self.cached.popitem(last=False)[1])
            self.digest = _digest(self.digest, op, "release", seq_id, int(all), int(drop))
            return len(ids)

    # ---- internals ----------------------------------------------------------------------
    def _check_params(self, params: SamplingParams) -> None:
        try:
            params.check(self.vocab)
        except ValueError as e:
            raise RequestError("INVALID_ARGUMENT", str(e)) from None

    def _check_tokens(self, tokens) -> None:
        for t in tokens:
            if not 0 <= t < self.vocab:
                raise RequestError("INVALID_ARGUMENT", f"token id {t} is outside the vocabulary "
                                   f"[0, {self.vocab})")

    def _check_new(self, seq_id: str, tokens: list[int]) -> None:
        if not seq_id:
            raise RequestError("INVALID_ARGUMENT", "empty sequence id")
        if seq_id in self.live:
            raise RequestError("ALREADY_EXISTS", f"sequence {seq_id!r} is already live")
        if not tokens:
            raise RequestError("INVALID_ARGUMENT", "empty prompt")
        if len(tokens) > self.ctx:
            raise RequestError("OUT_OF_RANGE", f"prompt of {len(tokens)} tokens exceeds the "
                               f"context of {self.ctx} tokens")
        self._check_tokens(tokens)
        if len(self.live) >= self.max_sequences:
            raise RequestError("RESOURCE_EXHAUSTED", f"{len(self.live)} sequences are live "
                               f"(at most {self.max_sequences})")

    def _live(self, seq_id: str) -> Slot:
        slot = self.live.get(seq_id)
        if slot is None:
            raise RequestError("NOT_FOUND", f"no live sequence {seq_id!r}")
        return slot

    def _start(self, seq_id: str, tokens: list[int]) -> Slot:
        """A slot for a new sequence: the longest state (cached or live) whose tokens are a
        prefix of `tokens`; a cached one is taken over, a live one cloned. A state that holds the
        whole prompt is usable only with its logits (a state cannot be rewound)."""
        best, best_key, best_live = None, None, False
        for key, slot, live in ([(k, s, False) for k, s in self.cached.items()]
                                + [(k, s, True) for k, s in self.live.items()]):
            n = len(slot.tokens)
            if (slot.pending or n == 0 or n > len(tokens) or (best and n <= len(best.tokens))
                    or (n == len(tokens) and slot.logits is None) or slot.tokens != tokens[:n]):
                continue
            best, best_key, best_live = slot, key, live
        if best is None:
            slot = Slot(self.model.new_state())
        elif best_live:
            self._unbind(best)
            slot = Slot(best.state.clone(), list(best.tokens), best.logits)
        else:
            slot = self.cached.pop(best_key)
            self._unbind(slot)
        slot.pending = list(tokens[len(slot.tokens):])
        self.live[seq_id] = slot
        return slot

    def _feed(self, op: int, kind: str, seq_id: str, slot: Slot, feed: list[int],
              params: SamplingParams | None = None) -> float:
        """Agree with the other ranks on this operation, then run the model on `feed`."""
        self._agree_on(op, kind, seq_id, len(slot.tokens), feed)
        t = time.perf_counter()
        if feed:
            if self.lanes and kind == "decode" and len(feed) == 1:
                self._fast_step(slot, feed[0], params)
            elif self.lanes and kind == "prefill" and len(feed) <= self.graph_feed:
                for tok in feed:                    # one graph step per token (see graph_feed)
                    self._fast_step(slot, tok, params)
            else:
                self._unbind(slot)
                slot.logits = self.model.forward(feed, slot.state)
                slot.pick = None
            slot.tokens.extend(feed)
            if self.device.type == "cuda":   # the step's GPU time counts as forward, not sampling
                torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter() - t

    def _agree_on(self, op: int, kind: str, seq_id: str, n_past: int, feed: list[int]) -> None:
        """Extend the digest by this operation, once every rank reached the same one. First
        waits for a lookahead step still running: with NCCL's graph mixing support off
        (comm.NCCL_DEFAULTS) no eager collective may be issued while a graph runs."""
        if self._in_flight:
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            self._in_flight = False
        nxt = _digest(self.digest, op, kind, seq_id, n_past, feed)
        self._agree(nxt)
        self.digest = nxt
        self.steps += 1

    def _settle(self, op: int, seq_id: str, slot: Slot) -> float:
        """This decode's token was fed by lookahead: wait for that step and agree on the
        operation as if it had just run (same digest as _feed's)."""
        t = time.perf_counter()
        self._agree_on(op, "decode", seq_id, len(slot.tokens) - 1, [slot.ahead])
        slot.ahead = None
        return time.perf_counter() - t

    def _look_ahead(self, op: int, seq_id: str, slot: Slot, token: int, params: SamplingParams) -> None:
        """Feed `token` to the fast decoder without waiting for the GPU. No agreement here (the
        step's collectives are the same whatever the token); the next operation's digest covers
        it, since every rank folds it into its digest."""
        self._fast_step(slot, token, params)
        self._fed_ahead(op, seq_id, slot, token)

    def _fed_ahead(self, op: int, seq_id: str, slot: Slot, token: int) -> None:
        """`token` is consumed by the step just queued for `slot`, before the gateway has it."""
        self.digest = _digest(self.digest, op, "ahead", seq_id, len(slot.tokens), [token])
        slot.tokens.append(token)
        slot.ahead = token
        self._in_flight = True

    def _chainable(self, slot: Slot, params: SamplingParams) -> bool:
        """Whether `slot`'s next step can be queued before the host knows its token: lookahead
        on, room in the context, and a sample the device computes without waiting."""
        return self.lookahead and len(slot.tokens) < self.ctx and queues_on_device(params)

    def _pick_is_fed(self, slot: Slot, params: SamplingParams) -> bool:
        """Whether its lane's token buffer holds this request's sample after `slot`'s last step:
        that step's greedy pick is the sample (_pick_fits), and the slot kept its lane since (a
        lane steps only its own slot; a slot parked or written back loses it)."""
        return slot.lane is not None and self._pick_fits(slot, params)

    @staticmethod
    def _pick_fits(slot: Slot, params: SamplingParams) -> bool:
        """Whether the greedy pick of `slot`'s last step is this request's sample: a greedy
        request with the logit_bias that pick was made with."""
        return (slot.pick is not None and picks_on_device(params)
                and slot.pick[2] == bias_key(params.logit_bias))

    def _chain(self, op: int, seq_id: str, slot: Slot, params: SamplingParams,
               step: int) -> tuple[Sample, float, float]:
        """Settle the token fed ahead and look ahead again without a host round trip: queue
        this step's sample on the device (or take the graph's greedy pick already there), the
        next step fed from it, then wait for the sample (the step just queued runs meanwhile).
        The settled operation gets no agreement: a decode graph is running, and with NCCL's
        graph mixing support off no eager collective may run beside it; the gateway compares
        every reply's digest. The sample may be a stop token: the state then holds it, as a
        cancelled request's token fed ahead. Returns the sample, the wait and the time spent
        queueing the sampling."""
        t = time.perf_counter()
        self.digest = _digest(self.digest, op, "decode", seq_id, len(slot.tokens) - 1, [slot.ahead])
        self.steps += 1
        if self._pick_is_fed(slot, params):
            this, fed = slot.pick, None
        else:
            out = sample_device(slot.logits, params, step)
            this, fed = self._hold(out), out[:1]
        smp = time.perf_counter() - t
        self._fast_step(slot, None, params, fed)
        self.chained += 1
        s = unpack(self._read(this))
        slot.lane.dec.confirm(s.token)
        self._fed_ahead(op, seq_id, slot, s.token)
        return s, time.perf_counter() - t - smp, smp

    def _fast_step(self, slot: Slot, token: int | None, params: SamplingParams | None,
                   device_token: torch.Tensor | None = None) -> None:
        """One step of `slot`'s fast decoder, fed `token`, or `device_token` (a tensor on the
        device), or with both None the pick its last step left in the token buffer; keeps the
        logits and the step's greedy pick for the slot."""
        dec = self._bind(slot).dec
        if device_token is not None:
            dec.token.copy_(device_token)
        if params is not None and picks_on_device(params):
            dec.set_bias(params.logit_bias)
        slot.logits = dec.step(token).clone()
        slot.pick = (*self._hold(dec.pick), dec.bias_key)

    def _hold(self, t: torch.Tensor) -> tuple:
        """(copy, event) of a small device tensor as of now, kept past later steps: on CUDA a
        copy to pinned host memory queued behind the work so far, with an event to wait on."""
        if self.device.type != "cuda":
            return t.clone(), None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        return host, ev

    @staticmethod
    def _read(held: tuple) -> list:
        """The numbers of a _hold copy, once the device has written them."""
        copy, ev = held[:2]
        if ev is not None:
            ev.synchronize()
        return copy.tolist()

    def _picked(self, slot: Slot, params: SamplingParams) -> Sample | None:
        """The sample of a greedy request from the pick its slot's last step made (the same
        function as sampling.sample_torch's greedy choice), or None to sample the logits."""
        return unpack(self._read(slot.pick)) if self._pick_fits(slot, params) else None

    def _bind(self, slot: Slot) -> _Lane:
        """The lane holding `slot`'s decode state: its own, else a free one, else the least
        recently used one, whose slot is parked."""
        lane = slot.lane
        if lane is None:
            lane = min(self.lanes, key=lambda ln: (ln.slot is not None, ln.used))
            if lane.slot is not None:
                lane.slot.parked = lane.dec.park()
                lane.slot.lane = None
            if slot.parked is not None:
                lane.dec.resume(slot.parked)
                slot.parked = None
            else:
                lane.dec.load_session(slot.state)
            lane.slot, slot.lane = slot, lane
        self._ticks += 1
        lane.used = self._ticks
        return lane

    def _unbind(self, slot: Slot) -> None:
        """Make `slot.state` current (its lane's state written back) before it is used eagerly;
        the slot then has no lane."""
        if slot.parked is not None:
            self._bind(slot)
        lane = slot.lane
        if lane is not None:
            lane.dec.store_session(slot.state)
            lane.slot = slot.lane = None

    @staticmethod
    def _forget(slot: Slot) -> None:
        """A slot no longer kept: its lane (if any) is free again, nothing parked or written back."""
        lane = slot.lane
        if lane is not None:
            lane.slot = slot.lane = None
        slot.parked = None

    def _gathered(self, value: int) -> list[int]:
        """Every rank's `value` (an int64), in rank order."""
        if self.comm.world == 1:
            return [value]
        got = self.comm.all_gather(torch.tensor([value], dtype=torch.int64, device=self.device), dim=0)
        return [int(v) for v in got.cpu()]

    def _agree(self, digest: int) -> None:
        values = self._gathered(digest)
        if len(set(values)) != 1:
            raise DesyncError(f"rank {self.comm.rank}: operation digests differ across ranks: {values}")

    def _result(self, seq_id, slot, reused, s, fwd, smp, wait) -> StepResult:
        n_past = len(slot.tokens) - (slot.ahead is not None)     # as the gateway counts them
        return StepResult(seq_id, n_past, reused, s, fwd, smp, wait, self.digest)
