"""In-process serving stack for fast gateway tests: N worker ranks (real gRPC servicers over
`Runtime` + the toy model, each its own gRPC server on localhost) and the real gateway app under
uvicorn in a thread. Nothing is mocked between the HTTP request and the model call; only the
model is the toy and the ranks do not share a process group (each computes the full logits).

`ToyRank.crash()` stops a rank's server like a dead process; `ToySupervisor` plays ds4tp launch:
it restarts a crashed rank, and a rank the gateway told to Shutdown, with a fresh group id once
every rank has restarted (as a real re-rendezvous would)."""
from __future__ import annotations

import secrets
import socket
import threading
import time
from concurrent import futures

import grpc
import httpx

from ds4tp.comm import SingleComm
from ds4tp.gateway.api import GatewayConfig, create_app
from ds4tp.gateway.pool import PoolConfig, WorkerPool
from ds4tp.rpc import add_worker_servicer
from ds4tp.worker.runtime import Runtime
from ds4tp.worker.service import WorkerNode, WorkerServicer
from toy_model import TOY_SHAPE, ToyModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ToyRank:
    def __init__(self, rank: int, world: int, *, ctx: int, delay_s: float, port: int = 0,
                 make_model=None, runtime_kw: dict | None = None):
        self.rank, self.world, self.ctx, self.delay_s = rank, world, ctx, delay_s
        self.make_model, self.runtime_kw = make_model, runtime_kw or {}
        self.node = WorkerNode(rank=rank, world=world, device="cpu", model_path="toy", ctx=ctx)
        self.model = make_model() if make_model else ToyModel(delay_s=delay_s)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        add_worker_servicer(self.server, WorkerServicer(self.node, log=lambda m: None))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ready(self, group_id: int) -> None:
        import dataclasses
        self.node.joined(group_id)
        rt = Runtime(self.model, SingleComm(), ctx=self.ctx, max_sequences=8, **self.runtime_kw)
        shape = getattr(self.model, "shape", TOY_SHAPE)
        self.node.ready(rt, {k: int(v) for k, v in dataclasses.asdict(shape).items()})

    def crash(self) -> None:
        self.server.stop(0).wait()

    def serve_again(self) -> None:
        """A new gRPC server for the same (still running) rank: a network blip, not a restart."""
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        add_worker_servicer(self.server, WorkerServicer(self.node, log=lambda m: None))
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()


class ToySupervisor:
    """Restarts ranks that crashed or exited; regroups them once all are back."""

    def __init__(self, world: int, *, ctx: int = 256, delay_s: float = 0.0, make_model=None,
                 runtime_kw: dict | None = None):
        self.ranks = [ToyRank(r, world, ctx=ctx, delay_s=delay_s, make_model=make_model,
                              runtime_kw=runtime_kw) for r in range(world)]
        group = secrets.randbits(62) or 1
        for r in self.ranks:
            r.ready(group)
        self.crashed: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.ranks]

    def crash(self, rank: int) -> None:
        self.ranks[rank].crash()
        self.crashed.add(rank)

    def _watch(self) -> None:
        pending = set()
        while not self._stop.wait(0.05):
            for i, r in enumerate(self.ranks):
                exited = r.node.wait_exit(0)
                if (i in self.crashed or exited) and i not in pending:
                    if exited:
                        r.crash()
                    self.crashed.discard(i)
                    time.sleep(0.2)
                    self.ranks[i] = ToyRank(i, r.world, ctx=r.ctx, delay_s=r.delay_s, port=r.port,
                                            make_model=r.make_model, runtime_kw=r.runtime_kw)
                    pending.add(i)
            if pending and len(pending) == len(self.ranks):
                group = secrets.randbits(62) or 1
                for r in self.ranks:
                    r.ready(group)
                pending.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for r in self.ranks:
            r.crash()


class GatewayThread:
    def __init__(self, addresses, tokenizer, cfg: GatewayConfig,
                 pool_cfg: PoolConfig = PoolConfig(health_interval_s=0.1, dead_after_s=0.5)):
        import uvicorn
        self.pool = WorkerPool(addresses, pool_cfg, vocab=tokenizer.n_vocab, log=lambda m: None)
        self.app = create_app(cfg, self.pool, tokenizer)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_healthy(30)

    def wait_healthy(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                last = r.json()
                if r.status_code == 200:
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"gateway not healthy after {timeout}s: {last}")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
