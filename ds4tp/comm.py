"""The small communication object the model math receives (it never imports torch.distributed).

`Comm` has rank, world and the two collectives the tensor-parallel model needs. `SingleComm` is
world 1 (identity). `DistComm` wraps a torch.distributed process group, created from the standard
torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): gloo on CPU, NCCL
on CUDA. A timeout bounds every collective, so a dead or missing peer becomes an error, not a hang.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch


class CommError(RuntimeError):
    """A collective or the rendezvous failed (peer dead, never joined, or timed out)."""


@dataclass
class Counter:
    """Counts collectives by kind; tests compare it with the shard plan."""
    counts: dict = field(default_factory=dict)

    def add(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def reset(self) -> None:
        self.counts.clear()


class SingleComm:
    rank = 0
    world = 1

    def __init__(self):
        self.counter = Counter()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return x

    def peer_sum(self, x: torch.Tensor):
        return None

    def close(self) -> None:
        pass


class DistComm:
    """torch.distributed collectives over one process group (sum all-reduce, concat all-gather).
    With `peer` (two ranks of one host, ds4tp.kernels.cuda_allreduce), the all-reduces it takes
    go through the ranks' memory in one kernel instead of NCCL; `peer_why` says why not if not."""

    def __init__(self, rank: int, world: int, backend: str, timeout_s: float, peer=None,
                 peer_why: str | None = None):
        self.rank, self.world, self.backend = rank, world, backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.counter = Counter()
        self.peer, self.peer_why = peer, peer_why

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        self.counter.add("all_reduce")
        if self.peer is not None and self.peer.takes(x):
            return self.peer.all_reduce(x)
        try:
            dist.all_reduce(x)
        except Exception as e:  # gloo: peer closed / timeout; nccl: watchdog / timeout
            raise CommError(f"rank {self.rank}: all_reduce failed: {e}") from e
        return x

    def peer_sum(self, x: torch.Tensor):
        """The all-reduce of x made inside the launch that consumes it (two ranks of one host:
        cuda_allreduce.PeerAllReduce.fused, the arguments for triton_hc.hc_step's peer), counted
        as an all-reduce; None where x goes by all_reduce. Both ranks choose alike."""
        got = self.peer.fused(x) if self.peer is not None else None
        if got is not None:
            self.counter.add("all_reduce")
        return got

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        import torch.distributed as dist
        self.counter.add("all_gather")
        x = x.contiguous()
        # every rank's x into one buffer, rank after rank (a list of outputs costs a tensor per
        # rank and a copy into each), then concatenated along dim: one copy, none for dim 0.
        # The buffer is [world * n, ...] (gloo takes no other shape), viewed as [world, *x.shape]
        out = x.new_empty((self.world * x.shape[0], *x.shape[1:]))
        try:
            dist.all_gather_into_tensor(out, x)
        except Exception as e:
            raise CommError(f"rank {self.rank}: all_gather failed: {e}") from e
        d = dim % x.dim()
        if d == 0:
            return out
        shape = (*x.shape[:d], self.world * x.shape[d], *x.shape[d + 1:])
        return out.view(self.world, *x.shape).movedim(0, d).reshape(shape)

    def close(self) -> None:
        import torch.distributed as dist
        if self.peer is not None:
            self.peer.close()
            self.peer = None
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


# NCCL settings this package relies on, applied before the communicator exists (NCCL reads them
# once) unless the environment already sets them.
#
# NCCL_GRAPH_MIXING_SUPPORT=0: no cross-stream ordering machinery around the all-reduces captured
# in the decode graphs. Two H200s, TP=2, same code: decode 187.0-187.7 tok/s with it on (NCCL's
# default), 199.4-200.1 off (bench/results/prefill_tp2_h200x2_s13_*). NCCL then requires that no
# graph launch is still running when an eager (non-captured) collective is issued. The worker
# keeps that: every operation waits for the GPU (Runtime._agree_on, also after a lookahead step)
# before its first act, an eager all-gather (Runtime._agree).
NCCL_DEFAULTS = {"NCCL_GRAPH_MIXING_SUPPORT": "0"}


def nccl_defaults(env=None) -> dict:
    """Set each of NCCL_DEFAULTS in `env` (default os.environ) that is not set; returns the
    settings now in effect."""
    env = os.environ if env is None else env
    for k, v in NCCL_DEFAULTS.items():
        env.setdefault(k, v)
    return {k: env[k] for k in NCCL_DEFAULTS}


def init_dist(rank: int | None = None, world: int | None = None, *, device: str = "cpu",
              master_addr: str | None = None, master_port: int | None = None,
              timeout_s: float = 60.0, peer_all_reduce: bool | None = None):
    """Join the process group. Arguments default to the torchrun environment variables.

    Returns SingleComm for world 1. Raises CommError naming the problem if the rendezvous does
    not complete within timeout_s (a peer that never joins). peer_all_reduce: two CUDA ranks of
    one host sum small tensors through each other's memory (ds4tp.kernels.cuda_allreduce)
    where that works on both; None: on unless DS4TP_PEER_ALLREDUCE=0.
    """
    import torch.distributed as dist

    env = os.environ
    rank = int(env.get("RANK", 0)) if rank is None else rank
    world = int(env.get("WORLD_SIZE", 1)) if world is None else world
    if world == 1:
        return SingleComm()
    addr = master_addr or env.get("MASTER_ADDR", "127.0.0.1")
    port = master_port or int(env.get("MASTER_PORT", 29500))
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        nccl_defaults(env)
        torch.cuda.set_device(torch.device(device))
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(addr, port, world, rank == 0, timeout=timeout,
                              wait_for_workers=True)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                **({"device_id": torch.device(device)} if backend == "nccl" else {}))
        # A first collective proves every rank is there (and builds the NCCL communicator).
        probe = torch.ones(1, device=device)
        dist.all_reduce(probe)
        if int(probe.item()) != world:
            raise CommError(f"rendezvous probe summed to {probe.item()}, expected {world}")
    except CommError:
        raise
    except Exception as e:
        raise CommError(f"rank {rank}/{world}: could not join the process group at {addr}:{port} "
                        f"within {timeout_s:.0f}s ({backend}): {e}") from e
    peer, why = None, "not a CUDA process group"
    if backend == "nccl":
        if peer_all_reduce is None:
            peer_all_reduce = env.get("DS4TP_PEER_ALLREDUCE", "1") != "0"
        why = "switched off (DS4TP_PEER_ALLREDUCE=0)"
        if peer_all_reduce:
            from ds4tp.kernels import cuda_allreduce

            def gather(obj):
                got = [None] * world
                dist.all_gather_object(got, obj)
                return got
            peer, why = cuda_allreduce.connect(rank, world, torch.device(device), gather, timeout_s)
    return DistComm(rank, world, backend, timeout_s, peer, why)


# ---- running N ranks on this host (eval --tp, tests) ----------------------------------------
def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(obj):
    """Tensors as numpy arrays: a torch tensor sent through a multiprocessing queue travels as a
    shared-memory handle that dies with the sending process."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _tensors(obj):
    import numpy as np
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors(v) for v in obj)
    return obj


def _rank_entry(rank, world, port, device, timeout_s, fn, args, queue):
    import traceback
    try:
        if device == "cpu":   # ranks share the host's cores: no oversubscription
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dev = f"cuda:{rank}" if device == "cuda" else device
        comm = init_dist(rank, world, device=dev, master_addr="127.0.0.1", master_port=port,
                         timeout_s=timeout_s)
        try:
            out = fn(comm, dev, *args)
        finally:
            comm.close()
        queue.put((rank, "ok", _plain(out) if rank == 0 else None))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def run_local_ranks(world: int, fn, *args, device: str = "cpu", timeout_s: float = 60.0,
                    wall_s: float = 3600.0):
    """Run fn(comm, device, *args) in `world` spawned processes (one rank each; gloo on CPU,
    NCCL with one GPU per rank for device="cuda") and return rank 0's result (tensors in it come
    back as CPU tensors). Any rank's failure raises CommError with its traceback; no rank is
    left running."""
    import multiprocessing as mp
    import queue as queue_mod
    import time

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world, port, device, timeout_s, fn, args, q),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    result, errors, done = None, [], set()
    deadline = time.monotonic() + wall_s
    try:
        while len(done) < world:
            try:
                rank, status, payload = q.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in done]
                if dead and not errors:
                    # a rank died without reporting (killed, segfault): fail, do not wait forever
                    time.sleep(1.0)
                    if q.empty():
                        raise CommError(f"rank(s) {dead} exited with code "
                                        f"{[procs[r].exitcode for r in dead]} without a result")
                if time.monotonic() > deadline:
                    raise CommError(f"ranks did not finish within {wall_s:.0f}s")
                continue
            done.add(rank)
            if status == "ok":
                if rank == 0:
                    result = _tensors(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
        if errors:
            raise CommError("\n".join(errors))
        return result
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
