"""gRPC servicer of one worker: protocol messages in and out of `Runtime`; no math here.

`WorkerNode` is the process-level state the servicer reports (rank, load state, group id) and
the exit request the main thread waits for. A step that fails for any reason other than a bad
request is fatal: the node turns FAILED and asks to exit with the restart status, because the
process group (and this rank's sequence states) can no longer be trusted.
"""
from __future__ import annotations

import os
import threading
import traceback
import uuid

import grpc

import ds4tp
from ds4tp.rpc import PROTOCOL_VERSION, RESTART_EXIT_CODE, pb
from ds4tp.worker.runtime import RequestError, Runtime
from ds4tp.worker.sampling import SamplingParams


class WorkerNode:
    """What a worker process is doing, shared by the servicer threads and the main thread."""

    def __init__(self, *, rank: int, world: int, device: str, model_path: str, ctx: int,
                 backend: str = ""):
        self.rank, self.world, self.device = rank, world, str(device)
        self.model_path, self.ctx, self.backend = model_path, ctx, backend
        self.boot_id = uuid.uuid4().hex
        self.group_id = 0
        self.state = pb.JOINING
        self.message = "waiting for every rank at the rendezvous"
        self.runtime: Runtime | None = None
        self.shape: dict[str, int] = {}
        self.exit_code: int | None = None
        self._exit = threading.Event()

    # transitions (called by the main thread / the loader)
    def joined(self, group_id: int) -> None:
        self.group_id, self.state, self.message = group_id, pb.LOADING, "loading the model shard"

    def ready(self, runtime: Runtime, shape: dict[str, int]) -> None:
        self.runtime, self.shape = runtime, shape
        self.state, self.message = pb.READY, ""

    def fail(self, message: str) -> None:
        """Fatal: report FAILED and exit with the restart status."""
        self.state, self.message = pb.FAILED, message
        self.request_exit(RESTART_EXIT_CODE)

    def request_exit(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code
        if self.state != pb.FAILED:
            self.state = pb.STOPPING
        self._exit.set()

    def wait_exit(self, timeout: float | None = None) -> bool:
        return self._exit.wait(timeout)


def _params(s: pb.Sampling) -> SamplingParams:
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
                          seed=s.seed, top_logprobs=s.top_logprobs, logit_bias=dict(s.logit_bias))


class WorkerServicer:
    """One method per RPC of ds4tp.v1.Worker."""

    def __init__(self, node: WorkerNode, log=print):
        self.node, self.log = node, log

    def Info(self, request, context):
        n = self.node
        rt = n.runtime
        return pb.InfoReply(
            protocol_version=PROTOCOL_VERSION, rank=n.rank, world=n.world, state=n.state,
            model_path=n.model_path, shape=n.shape, ctx=n.ctx,
            max_sequences=rt.max_sequences if rt else 0, max_cached=rt.max_cached if rt else 0,
            device=n.device, backend=n.backend, boot_id=n.boot_id, group_id=n.group_id,
            pid=os.getpid(), version=ds4tp.__version__)

    def Health(self, request, context):
        n = self.node
        rt = n.runtime
        return pb.HealthReply(
            state=n.state, rank=n.rank, world=n.world, boot_id=n.boot_id, group_id=n.group_id,
            pid=os.getpid(), message=n.message,
            live_sequences=len(rt.live) if rt else 0, cached_sequences=len(rt.cached) if rt else 0,
            steps=rt.steps if rt else 0, busy=rt.busy if rt else False)

    def _runtime(self, context) -> Runtime:
        n = self.node
        if n.state != pb.READY or n.runtime is None:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"rank {n.rank} is not ready ({pb.LoadState.Name(n.state)}: {n.message})")
        return n.runtime

    def _step(self, context, fn):
        rt = self._runtime(context)
        try:
            r = fn(rt)
        except RequestError as e:
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
        except Exception as e:   # collective failure, desync, model error: the group is gone
            msg = f"rank {self.node.rank}: step failed, restarting: {type(e).__name__}: {e}"
            self.log(msg + "\n" + traceback.format_exc())    # the operator's copy has the stack
            self.node.fail(msg)
            context.abort(grpc.StatusCode.ABORTED, msg)
        s = r.sample
        return pb.StepReply(
            seq_id=r.seq_id, n_past=r.n_past, reused=r.reused, sampled=s is not None,
            token=s.token if s else 0, logprob=s.logprob if s else 0.0,
            top_logprobs=[pb.TokenLogprob(token=t, logprob=lp) for t, lp in (s.top if s else [])],
            forward_s=r.forward_s, sample_s=r.sample_s, wait_s=r.wait_s, digest=r.digest)

    def Prefill(self, request, context):
        reply = self._step(context, lambda rt: rt.prefill(
            request.op, request.seq_id, list(request.tokens), resume=request.resume,
            max_feed=request.max_feed, params=_params(request.sampling)))
        reply.op = request.op
        return reply

    def Decode(self, request, context):
        reply = self._step(context, lambda rt: rt.decode(
            request.op, request.seq_id, list(request.tokens), request.step, _params(request.sampling),
            lookahead=request.lookahead, stop_tokens=frozenset(request.stop_tokens)))
        reply.op = request.op
        return reply

    def Release(self, request, context):
        rt = self._runtime(context)
        n = rt.release(request.op, request.seq_id, all=request.all, drop=request.drop)
        return pb.ReleaseReply(released=n, digest=rt.digest)

    def Shutdown(self, request, context):
        n = self.node
        if request.group_id and request.group_id != n.group_id:
            return pb.ShutdownReply(accepted=False)
        self.log(f"rank {n.rank}: shutdown requested ({'restart' if request.restart else 'stop'}): "
                 f"{request.reason}")
        n.request_exit(RESTART_EXIT_CODE if request.restart else 0)
        return pb.ShutdownReply(accepted=True)
