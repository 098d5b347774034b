"""The gateway's view of the worker ranks: health, the process group, and broadcasting steps.

Health. A background loop probes every rank (Health RPC) every `health_interval_s`. The pool is
healthy when every rank answers READY with the same group id (the random id rank 0 drew when the
group formed), and that group passed the Info checks (protocol version, rank order, world size,
one model shape, vocabulary = the tokenizer's).

Recovery. A torch.distributed group cannot lose a member and go on. When a step fails, or a
rank of the group has been gone (or is back in another group, i.e. it restarted) for longer than
`dead_after_s`, the group is marked broken and every rank still in it is told to Shutdown with
restart=True: it exits with status 75, its supervisor (ds4tp launch, or systemd with
Restart=on-failure) starts it again, and the restarted ranks rendezvous into a fresh group. When
that group is READY everywhere the pool validates it, releases every sequence a previous gateway
may have left on the workers, and reports healthy again.

Steps. `prefill/decode/release` send the same request, with the next operation number, to every
rank at once, under a deadline. Replies must agree (token, positions, operation digest). The
first transport error fails the step at once (a dead rank answers UNAVAILABLE right away; a hung
one hits the deadline), breaks the group and raises WorkersUnavailable.
"""
from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

import grpc

from ds4tp.gateway import PREFILL_S_PER_TOKEN, STEP_TIMEOUT_S
from ds4tp.rpc import PROTOCOL_VERSION, WorkerStub, pb

# Worker-side refusals of a request; the step did not run on any rank.
REQUEST_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED}
CLIENT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE}

CHANNEL_OPTIONS = [
    # reconnect quickly to a restarted worker (gRPC's default backoff grows to 2 minutes)
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


class WorkersUnavailable(Exception):
    """The workers cannot serve (not ready, or the group just failed)."""


class StepRejected(Exception):
    """Every rank refused the request (nothing ran)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.client_error = code in CLIENT_CODES


@dataclass
class PoolConfig:
    step_timeout_s: float = STEP_TIMEOUT_S              # deadline of a decode step / release
    prefill_s_per_token: float = PREFILL_S_PER_TOKEN    # added to the deadline per token fed
    health_interval_s: float = 0.5
    health_timeout_s: float = 2.0
    dead_after_s: float = 2.0            # a rank gone (refused) this long breaks its group
    hung_after_s: float = 30.0           # a rank whose probes time out this long counts as gone


@dataclass
class Rank:
    rank: int
    address: str
    stub: object = None
    reachable: bool = False
    error: str = "not probed yet"
    slow_since: float | None = None       # probes time out since then (still counted reachable)
    health: object = None                 # last HealthReply
    member_at: dict = field(default_factory=dict)   # group id -> last time seen in it
    shutdown_sent: dict = field(default_factory=dict)  # boot id -> time of the last Shutdown
    step_s: float = 0.0                   # sum of forward times (metrics)
    sample_s: float = 0.0                 # sum of sampling times (metrics)
    steps: int = 0
    decode_steps: int = 0                 # decode steps only (metrics): how many,
    decode_forward_s: float = 0.0         # their forward times (GPU time included)
    decode_sample_s: float = 0.0          # and their sampling times

    @property
    def group_id(self) -> int:
        return self.health.group_id if self.reachable and self.health else 0

    @property
    def state(self) -> str:
        if not self.reachable:
            return "UNREACHABLE"
        return pb.LoadState.Name(self.health.state)

    def describe(self) -> dict:
        h = self.health if self.reachable else None
        return {"rank": self.rank, "address": self.address, "state": self.state,
                "group_id": f"{h.group_id:x}" if h else None, "pid": h.pid if h else None,
                "boot_id": h.boot_id if h else None,
                "message": (h.message if h else self.error) or None,
                "live_sequences": h.live_sequences if h else None,
                "cached_sequences": h.cached_sequences if h else None}


class WorkerPool:
    def __init__(self, addresses: list[str], cfg: PoolConfig = PoolConfig(), *,
                 vocab: int | None = None, log=print):
        if not addresses:
            raise ValueError("no worker addresses")
        self.cfg, self.vocab, self.log = cfg, vocab, log
        self.ranks = [Rank(i, a) for i, a in enumerate(addresses)]
        self.decode_round_trip = [0, 0.0]     # decode steps, seconds from broadcast to replies
        self.channels = []
        self.healthy = False
        self.reason = "starting"
        self.group_id = 0                 # the group serving now (0: none)
        self.info: pb.InfoReply | None = None       # rank 0's Info of the serving group
        self.last_info: pb.InfoReply | None = None
        self.broken: collections.OrderedDict[int, str] = collections.OrderedDict()
        self._seen: dict[int, float] = {}  # group id -> first time seen
        self._op = 0
        self._task = None
        self._changed = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        for r in self.ranks:
            ch = grpc.aio.insecure_channel(r.address, options=CHANNEL_OPTIONS)
            self.channels.append(ch)
            r.stub = WorkerStub(ch)
        self._task = asyncio.get_running_loop().create_task(self._health_loop(), name="health")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for ch in self.channels:
            await ch.close()

    @property
    def world(self) -> int:
        return len(self.ranks)

    @property
    def ctx(self) -> int:
        """Tokens per sequence (of the last group served; 0 before any)."""
        return self.last_info.ctx if self.last_info else 0

    @property
    def max_sequences(self) -> int:
        return self.last_info.max_sequences if self.last_info else 0

    async def wait_healthy(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not self.healthy and time.monotonic() < end:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.01, end - time.monotonic()))
            except asyncio.TimeoutError:
                pass
        return self.healthy

    def describe(self) -> dict:
        return {"healthy": self.healthy, "reason": None if self.healthy else self.reason,
                "group_id": f"{self.group_id:x}" if self.group_id else None,
                "workers": [r.describe() for r in self.ranks]}

    # -- health and recovery --------------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as e:   # never let the monitor die
                self.log(f"health check error: {type(e).__name__}: {e}")
            await asyncio.sleep(self.cfg.health_interval_s)

    async def poll(self) -> None:
        """Probe every rank once, then act on what was seen."""
        await asyncio.gather(*(self._probe(r) for r in self.ranks))
        now = time.monotonic()
        for r in self.ranks:
            if r.group_id:
                r.member_at[r.group_id] = now
                self._seen.setdefault(r.group_id, now)
        live = {r.group_id for r in self.ranks if r.group_id and r.group_id not in self.broken}
        for g in live:
            self._check_members(g, now)
        await self._shutdown_broken(now)
        await self._update(live)

    async def _probe(self, r: Rank) -> None:
        try:
            r.health = await r.stub.Health(pb.HealthRequest(), timeout=self.cfg.health_timeout_s)
            r.reachable, r.error, r.slow_since = True, "", None
        except grpc.aio.AioRpcError as e:
            now = time.monotonic()
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and r.reachable:
                # a busy (or hung) rank: keep its last answer until it has been silent for
                # hung_after_s, so one slow probe does not take the service down
                r.slow_since = r.slow_since or now
                if now - r.slow_since < self.cfg.hung_after_s:
                    return
            r.reachable = False
            r.error = f"unreachable: {e.code().name}: {e.details()}"

    def _check_members(self, g: int, now: float) -> None:
        for r in self.ranks:
            if r.group_id == g:
                if r.health.state == pb.FAILED:
                    self.mark_broken(g, f"rank {r.rank} ({r.address}) failed: {r.health.message}")
                    return
                continue
            gone = now - max(r.member_at.get(g, 0.0), self._seen[g])
            limit = self.cfg.dead_after_s
            if gone > limit:
                what = r.error if not r.reachable else (
                    f"restarted ({r.state}, group {r.group_id:x})" if r.group_id else f"restarted ({r.state})")
                self.mark_broken(g, f"rank {r.rank} ({r.address}) {what}")
                return

    def mark_broken(self, g: int, why: str) -> None:
        if not g or g in self.broken:
            return
        self.broken[g] = why
        while len(self.broken) > 64:
            self.broken.popitem(last=False)
        self.log(f"worker group {g:x} is broken: {why}; restarting its ranks")
        if g == self.group_id:
            self._set(False, f"restarting the workers: {why}")
            self.group_id, self.info = 0, None

    async def _shutdown_broken(self, now: float) -> None:
        """Ask every rank still in a broken group to exit and be restarted (again every 3 s
        until it is gone)."""
        calls = []
        for r in self.ranks:
            g = r.group_id
            if g in self.broken and now - r.shutdown_sent.get(r.health.boot_id, -1e9) > 3.0:
                r.shutdown_sent[r.health.boot_id] = now
                calls.append(r.stub.Shutdown(pb.ShutdownRequest(
                    restart=True, group_id=g, reason=f"process group broken: {self.broken[g]}"),
                    timeout=self.cfg.health_timeout_s))
        for res in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(res, Exception) and not isinstance(res, grpc.aio.AioRpcError):
                raise res

    async def _update(self, live: set[int]) -> None:
        ready = [g for g in live if all(r.group_id == g and r.health.state == pb.READY for r in self.ranks)]
        if ready:
            g = ready[0]
            if g != self.group_id:
                await self._adopt(g)
            elif not self.healthy:       # back after a blip; the group itself is intact
                self._set(True, "")
            return
        if self.group_id and self.group_id not in live:
            self.group_id, self.info = 0, None
        self._set(False, self._why_not())

    def _why_not(self) -> str:
        if self.broken and any(r.group_id in self.broken for r in self.ranks):
            return "restarting the workers: " + next(reversed(self.broken.values()))
        bad = [r for r in self.ranks if not r.reachable or r.health.state != pb.READY]
        if bad:
            return "; ".join(f"rank {r.rank} ({r.address}) " + (
                r.error if not r.reachable else f"{r.state}: {r.health.message}".rstrip(": "))
                for r in bad)
        return "the ranks are not in one process group yet"

    async def _adopt(self, g: int) -> None:
        """A group is READY on every rank: check it, clear leftovers, serve it."""
        try:
            infos = await asyncio.gather(*(r.stub.Info(pb.InfoRequest(), timeout=self.cfg.health_timeout_s)
                                           for r in self.ranks))
        except grpc.aio.AioRpcError as e:
            self._set(False, f"Info failed: {e.code().name}: {e.details()}")
            return
        problem = self._check_infos(infos, g)
        if problem:
            self._set(False, problem)
            return
        self.info, self.last_info, self.group_id = infos[0], infos[0], g
        try:   # before any step: sequences a previous gateway left behind
            await self._broadcast("Release", pb.ReleaseRequest(all=True, drop=True),
                                  self.cfg.step_timeout_s, adopting=True)
        except (WorkersUnavailable, StepRejected) as e:
            self.mark_broken(g, f"initial release failed: {e}")
            return
        self._set(True, "")
        self.log(f"workers ready: group {g:x}, {self.world} ranks, ctx {self.ctx}")

    def _check_infos(self, infos, g: int) -> str:
        for r, info in zip(self.ranks, infos):
            where = f"rank {r.rank} ({r.address})"
            if info.protocol_version != PROTOCOL_VERSION:
                return f"{where} speaks protocol v{info.protocol_version}, the gateway v{PROTOCOL_VERSION}"
            if info.rank != r.rank or info.world != self.world:
                return (f"{where} is rank {info.rank} of {info.world}; the gateway expects rank "
                        f"{r.rank} of {self.world} (--workers must list the ranks in order)")
            if info.group_id != g:
                return f"{where} changed group while being checked"
            if dict(info.shape) != dict(infos[0].shape) or info.ctx != infos[0].ctx:
                return f"{where} loaded a different model shape or context than rank 0"
        vocab = infos[0].shape.get("vocab")
        if self.vocab is not None and vocab != self.vocab:
            return f"the workers' model has a vocabulary of {vocab}, the tokenizer {self.vocab}"
        return ""

    def _set(self, healthy: bool, reason: str) -> None:
        changed = healthy != self.healthy
        self.healthy, self.reason = healthy, reason
        if changed:
            if not healthy:
                self.log(f"workers unavailable: {reason}")
            self._changed.set()

    # -- steps ----------------------------------------------------------------------------------
    async def prefill(self, req: pb.PrefillRequest) -> pb.StepReply:
        n = req.max_feed if req.resume else min(len(req.tokens), req.max_feed or len(req.tokens))
        return await self._broadcast("Prefill", req,
                                     self.cfg.step_timeout_s + self.cfg.prefill_s_per_token * n)

    async def decode(self, req: pb.DecodeRequest) -> pb.StepReply:
        t = time.monotonic()
        rep = await self._broadcast("Decode", req, self.cfg.step_timeout_s)
        self.decode_round_trip[0] += 1
        self.decode_round_trip[1] += time.monotonic() - t
        return rep

    async def release(self, req: pb.ReleaseRequest) -> pb.ReleaseReply:
        return await self._broadcast("Release", req, self.cfg.step_timeout_s)

    async def _broadcast(self, method: str, req, timeout: float, *, adopting: bool = False):
        if not self.healthy and not adopting:
            raise WorkersUnavailable(self.reason)
        g = self.group_id
        self._op += 1
        req.op = self._op
        calls = [asyncio.ensure_future(getattr(r.stub, method)(req, timeout=timeout)) for r in self.ranks]
        pending = set(calls)
        failure = None
        while pending and failure is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for c in done:
                e = c.exception()
                if e is not None and not (isinstance(e, grpc.aio.AioRpcError) and e.code() in REQUEST_CODES):
                    failure = e
        if failure is not None:
            for c in pending:
                c.cancel()
            what = (f"{failure.code().name}: {failure.details()}" if isinstance(failure, grpc.aio.AioRpcError)
                    else f"{type(failure).__name__}: {failure}")
            self.mark_broken(g, f"{method} failed: {what}")
            raise WorkersUnavailable(f"{method} failed: {what}")
        errors = [c.exception() for c in calls if c.exception() is not None]
        if errors:
            codes = {(e.code(), e.details()) for e in errors}
            if len(errors) == len(calls) and len({c for c, _ in codes}) == 1:
                code, details = next(iter(codes))
                raise StepRejected(code, details)
            self.mark_broken(g, f"{method}: the ranks answered differently: {sorted(str(c) for c in codes)}")
            raise WorkersUnavailable(f"{method}: the ranks answered differently")
        replies = [c.result() for c in calls]
        self._check_agree(method, replies, g)
        if method != "Release":
            for r, rep in zip(self.ranks, replies):
                r.step_s += rep.forward_s
                r.sample_s += rep.sample_s
                r.steps += 1
                if method == "Decode":
                    r.decode_steps += 1
                    r.decode_forward_s += rep.forward_s
                    r.decode_sample_s += rep.sample_s
        return replies[0]

    def _check_agree(self, method: str, replies, g: int) -> None:
        if method == "Release":
            keys = [(r.released, r.digest) for r in replies]
        else:
            keys = [(r.sampled, r.token, r.n_past, r.reused, r.digest) for r in replies]
        if len(set(keys)) != 1:
            self.mark_broken(g, f"{method}: ranks disagree: {keys}")
            raise WorkersUnavailable(f"{method}: the ranks disagree ({keys})")
