"""One scheduler issues every worker step, in one global order.

The model serves one sequence per step (no cross-sequence batching), and every rank must see
the same operations in the same order, so a single asyncio task owns the workers:

- Admission is FIFO into at most `max_active` live sequences (bounded by the workers' slots);
  the waiting queue is bounded too (`max_queue`); beyond it requests get 503 at once instead of
  waiting unboundedly.
- Active sequences take turns round-robin: one turn = one prefill chunk (`prefill_chunk` prompt
  tokens, or up to a quarter more to finish the prompt: `prefill_feed`) or one decode step.
  Every live stream gets an equal share of steps, and a long prompt delays the others by at
  most one (long) chunk per turn.

A `Generation` is one request: its prompt, sampling settings and limits, and what it produced.
The scheduler feeds each sampled token to the generation (`accept`), which decodes it, applies
stop strings and limits, and posts events to its queue for the HTTP handler. A generation the
client abandoned (`cancel`) is released at its next turn. When the workers fail, every active
and waiting generation ends with a 503 error event.
"""
from __future__ import annotations

import asyncio
import collections
import math
import time
import uuid
from dataclasses import dataclass

from ds4tp.gateway.pool import StepRejected, WorkersUnavailable
from ds4tp.gateway.textstream import Delta, TextStream
from ds4tp.rpc import pb


@dataclass
class Chunk:
    """Text made visible by `token_ids` (one or more tokens: text can be held back)."""
    delta: Delta
    token_ids: list[int]
    logprobs: list            # [(token, logprob, [(alt, logprob), ...])] per token


@dataclass
class Done:
    finish_reason: str        # stop | length | tool_calls
    tail: Delta
    tool_calls: list
    token_ids: list[int]
    logprobs: list


@dataclass
class Failed:
    status: int
    message: str
    code: str = "server_error"


@dataclass
class Limits:
    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False


class Generation:
    def __init__(self, prompt: list[int], sampling: pb.Sampling, limits: Limits, text: TextStream,
                 *, eos: int, want_logprobs: bool = False):
        self.seq_id = "gen-" + uuid.uuid4().hex
        self.prompt, self.sampling, self.limits, self.text = prompt, sampling, limits, text
        self.eos, self.want_logprobs = eos, want_logprobs
        self.events: asyncio.Queue = asyncio.Queue()
        self.generated: list[int] = []
        self.reused = 0
        self.fed = 0               # prompt tokens the workers' state holds (after a prefill)
        self.started = False       # the workers hold a sequence for it
        self.finished = False
        self.cancelled = False
        self.finish_reason = ""
        self.group_id = 0
        self.t_arrival = time.monotonic()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self._held_ids: list[int] = []
        self._held_lp: list = []

    # -- what the scheduler asks --------------------------------------------------------------
    @property
    def stop_tokens(self) -> list[int]:
        """Sampled tokens that end this generation by themselves (the workers do not feed them
        ahead, except a step chained before its token was known: worker.runtime)."""
        return [] if self.limits.ignore_eos else [self.eos]

    def may_look_ahead(self, step: int) -> bool:
        """Whether the workers may feed step `step`'s token before it comes back: not on the last
        step by max_tokens, and not with stop strings, where an ending by text would leave the
        extra token in the cached state and cost a follow-up turn its prefix reuse."""
        return step + 1 < self.limits.max_tokens and not self.text.stop

    def sampling_for(self, step: int) -> pb.Sampling:
        s = self.sampling
        if self.limits.ignore_eos or step < self.limits.min_tokens:
            s = pb.Sampling()
            s.CopyFrom(self.sampling)
            s.logit_bias[self.eos] = -math.inf
        return s

    def accept(self, reply) -> None:
        """One sampled token from the workers."""
        now = time.monotonic()
        self.t_first = self.t_first or now
        self.t_last = now
        tok = reply.token
        self.generated.append(tok)
        self._held_ids.append(tok)
        if self.want_logprobs:
            self._held_lp.append((tok, reply.logprob, [(a.token, a.logprob) for a in reply.top_logprobs]))
        if tok == self.eos and not self.limits.ignore_eos:
            return self._finish("stop")
        delta = self.text.push(tok)
        if self.text.stopped:
            return self._finish("stop", delta)
        if delta:
            self._post(Chunk(delta, self._held_ids, self._held_lp))
            self._held_ids, self._held_lp = [], []
        if len(self.generated) >= self.limits.max_tokens:
            self._finish("length")

    def _finish(self, reason: str, delta: Delta | None = None) -> None:
        final = self.text.finish()
        tail = Delta((delta.reasoning if delta else "") + final.delta.reasoning,
                     (delta.content if delta else "") + final.delta.content)
        if final.tool_calls:
            reason = "tool_calls" if reason == "stop" else reason
        self.finished, self.finish_reason = True, reason
        self._post(Done(reason, tail, final.tool_calls, self._held_ids, self._held_lp))

    def fail(self, status: int, message: str, code: str = "server_error") -> None:
        if not self.finished:
            self.finished = True
            self._post(Failed(status, message, code))

    def cancel(self) -> None:
        self.cancelled = True

    def _post(self, ev) -> None:
        self.events.put_nowait(ev)

    # -- stats ----------------------------------------------------------------------------------
    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_arrival

    @property
    def decode_rate(self) -> float | None:
        n = len(self.generated) - 1
        if n < 1 or self.t_last is None or self.t_last <= self.t_first:
            return None
        return n / (self.t_last - self.t_first)


class QueueFull(Exception):
    pass


@dataclass
class SchedulerConfig:
    max_active: int = 8
    max_queue: int = 64
    prefill_chunk: int = 2048
    lookahead: bool = True    # DecodeRequest.lookahead on every decode but the last (see proto)


def prefill_feed(left: int, chunk: int) -> int:
    """Prompt tokens to feed in one turn with `left` still to feed (at most: a prefix the
    workers reuse shortens it): one chunk, or all of them when the rest would be under a quarter
    chunk. Each forward pays a fixed cost for its launches (~0.2 s on an H200, as much as ~1,500
    tokens of a 2,048-token chunk), so a short tail rides with the chunk before it."""
    return left if left <= chunk + chunk // 4 else chunk


class Scheduler:
    def __init__(self, pool, cfg: SchedulerConfig):
        self.pool, self.cfg = pool, cfg
        self.waiting: collections.deque[Generation] = collections.deque()
        self.active: collections.deque[Generation] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._orphans: list[Generation] = []

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def max_active(self) -> int:
        return min(self.cfg.max_active, self.pool.max_sequences or self.cfg.max_active)

    def submit(self, gen: Generation) -> None:
        free = max(0, self.max_active - len(self.active))   # about to be admitted
        if len(self.waiting) >= self.cfg.max_queue + free:
            raise QueueFull(f"{len(self.waiting) - free} requests are already waiting")
        self.waiting.append(gen)
        self._wake.set()

    def cancel(self, gen: Generation) -> None:
        gen.cancel()
        if gen in self.waiting:
            self.waiting.remove(gen)
            gen.fail(499, "client disconnected")
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for g in list(self.active) + list(self.waiting):
            g.fail(503, "the server is shutting down", "shutting_down")

    async def run(self) -> None:
        while True:
            if self._orphans and self.pool.healthy:
                await self._release_orphans()
            if not self.active and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self.pool.healthy:
                self._fail_all(self.pool.reason)
                continue
            while self.waiting and len(self.active) < self.max_active:
                g = self.waiting.popleft()
                g.group_id = self.pool.group_id
                self.active.append(g)
            gen = self.active[0]          # stays counted as active during its turn
            try:
                await self._turn(gen)
            except WorkersUnavailable as e:
                gen.fail(503, f"workers unavailable: {e}", "workers_unavailable")
                self._fail_all(str(e))
                continue
            if gen.finished or gen.cancelled:
                self.active.remove(gen)
                await self._release(gen)
            else:
                self.active.rotate(-1)    # round-robin: to the back of the line

    def _fail_all(self, reason: str) -> None:
        for g in list(self.active) + list(self.waiting):
            g.fail(503, f"workers unavailable: {reason}", "workers_unavailable")
            if g.started:
                self._orphans.append(g)
        self.active.clear()
        self.waiting.clear()

    async def _release_orphans(self) -> None:
        """Sequences of requests failed while the pool was unhealthy: if their group is still
        the one serving (it was a blip, not a restart), the workers still hold them."""
        orphans, self._orphans = self._orphans, []
        for g in orphans:
            await self._release(g)

    async def _turn(self, gen: Generation) -> None:
        if gen.cancelled or gen.finished:
            return
        if gen.group_id != self.pool.group_id:   # its state died with the previous group
            gen.fail(503, "workers unavailable: the worker group restarted", "workers_unavailable")
            return
        try:
            if not gen.generated and not gen.finished:
                first = not gen.started
                gen.started = True
                reply = await self.pool.prefill(pb.PrefillRequest(
                    seq_id=gen.seq_id, tokens=gen.prompt if first else [], resume=not first,
                    max_feed=prefill_feed(len(gen.prompt) - gen.fed, self.cfg.prefill_chunk),
                    sampling=gen.sampling_for(0)))
                gen.fed = reply.n_past
                if first:
                    gen.reused = reply.reused
                if reply.sampled:
                    gen.accept(reply)
            else:
                step = len(gen.generated)
                reply = await self.pool.decode(pb.DecodeRequest(
                    seq_id=gen.seq_id, tokens=[gen.generated[-1]], step=step,
                    sampling=gen.sampling_for(step), stop_tokens=gen.stop_tokens,
                    lookahead=self.cfg.lookahead and gen.may_look_ahead(step)))
                gen.accept(reply)
        except StepRejected as e:
            client = e.client_error
            gen.fail(400 if client else 500, str(e), "invalid_request_error" if client else "server_error")

    async def _release(self, gen: Generation) -> None:
        if not gen.started or gen.group_id != self.pool.group_id or not self.pool.healthy:
            return
        try:
            # a finished sequence stays cached for prefix reuse; an abandoned one too (its
            # consumed tokens are still a valid prefix)
            await self.pool.release(pb.ReleaseRequest(seq_id=gen.seq_id))
        except (WorkersUnavailable, StepRejected):
            pass
