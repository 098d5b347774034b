"""`ds4tp worker`: one tensor-parallel rank serving the ds4tp.v1 gRPC protocol.

The gRPC server starts first (so health probes see JOINING/LOADING), then a loader thread joins
the process group, agrees on a group id, loads this rank's shard and turns READY. The main thread
only waits for the exit request: SIGTERM/SIGINT (status 0), a Shutdown RPC, or a fatal error
(status 75, "restart me": ds4tp launch and systemd's Restart=on-failure start the worker again and
it re-joins a fresh process group with the other restarted ranks).

The process leaves with os._exit: a thread stuck in a collective with a dead peer must not keep
it alive.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import sys
import threading
import time
import traceback
from concurrent import futures

import grpc
import torch

from ds4tp.rpc import RESTART_EXIT_CODE, add_worker_servicer
from ds4tp.worker.runtime import Runtime
from ds4tp.worker.service import WorkerNode, WorkerServicer

# Bounds a collective with a dead or hung peer and the rendezvous with a missing one. A worker
# whose rendezvous times out exits with the restart status and tries again.
PG_TIMEOUT_S = 60.0


def log(msg: str) -> None:
    print(f"[ds4tp worker {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def resolve_device(device: str, rank: int) -> str:
    """auto: one GPU per rank (LOCAL_RANK, else rank modulo the GPU count) if CUDA is there,
    else cpu."""
    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        local = int(os.environ.get("LOCAL_RANK", rank))
        return f"cuda:{local % torch.cuda.device_count()}"
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % max(1, torch.cuda.device_count())}"
    return device


def agree_group_id(comm, device: str) -> int:
    """A random id for this process group: rank 0 draws it, an all-reduce hands it to everyone.
    Ranks reporting the same id are in the same group (the gateway checks this)."""
    if comm.world == 1:
        return secrets.randbits(62) or 1
    mine = (secrets.randbits(62) or 1) if comm.rank == 0 else 0
    t = torch.tensor([mine], dtype=torch.int64, device=device)
    return int(comm.all_reduce(t).item())


def load(node: WorkerNode, args, device: str) -> None:
    """Join, load, serve; any failure is fatal (exit with the restart status)."""
    from ds4tp.comm import init_dist
    try:
        comm = init_dist(node.rank, node.world, device=device, master_addr=args.master_addr,
                         master_port=args.master_port, timeout_s=PG_TIMEOUT_S)
        node.backend = getattr(comm, "backend", "")
        if comm.world > 1:
            log(f"rank {node.rank}: small all-reduces "
                + ("through peer memory (one host; in the decode graphs, inside the HC steps)"
                   if getattr(comm, "peer", None) is not None
                   else f"on {node.backend} (peer memory: {getattr(comm, 'peer_why', None)})"))
        node.joined(agree_group_id(comm, device))
        log(f"rank {node.rank}/{node.world}: joined group {node.group_id:x}, loading {args.model}")
        from ds4tp.model import DS4Model
        t = time.perf_counter()
        model = DS4Model.load(args.model, rank=node.rank, world=node.world, comm=comm, device=device)
        runtime = Runtime(model, comm, ctx=args.ctx, device=device, decoders=args.decoders)
        if torch.device(device).type == "cuda" and not args.no_warm_up:
            node.message = "warming up: compiling kernels, capturing the decode graphs"
            log(f"rank {node.rank}: loaded in {time.perf_counter() - t:.1f}s; warming up")
            w = time.perf_counter()
            done = runtime.warm_up()
            log(f"rank {node.rank}: warm-up {done} in {time.perf_counter() - w:.1f}s")
        node.ready(runtime, {k: int(v) for k, v in dataclasses.asdict(model.shape).items()})
        log(f"rank {node.rank}: ready in {time.perf_counter() - t:.1f}s")
    except Exception as e:
        log(traceback.format_exc())
        node.fail(f"{type(e).__name__}: {e}")


def main(args) -> int:
    env = os.environ
    rank = args.rank if args.rank is not None else int(env.get("RANK", 0))
    world = args.world if args.world is not None else int(env.get("WORLD_SIZE", 1))
    args.master_addr = args.master_addr or env.get("MASTER_ADDR", "127.0.0.1")
    args.master_port = args.master_port or int(env.get("MASTER_PORT", 29500))
    if not 0 <= rank < world:
        print(f"ds4tp worker: rank {rank} is not in [0, world={world})", file=sys.stderr)
        return 2
    if not os.path.exists(args.model):
        print(f"ds4tp worker: model file {args.model} not found", file=sys.stderr)
        return 2
    device = resolve_device(args.device, rank)
    node = WorkerNode(rank=rank, world=world, device=device, model_path=os.path.abspath(args.model),
                      ctx=args.ctx)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.max_receive_message_length", 64 << 20),
                                  ("grpc.max_send_message_length", 64 << 20)])
    add_worker_servicer(server, WorkerServicer(node, log))
    address = f"{args.grpc_host}:{args.grpc_port}"
    if server.add_insecure_port(address) == 0:
        print(f"ds4tp worker: cannot listen on {address}", file=sys.stderr)
        return 2
    server.start()
    log(f"rank {rank}/{world} pid {os.getpid()} serving gRPC on {address}, device {device}, "
        f"rendezvous {args.master_addr}:{args.master_port}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: node.request_exit(0))
    threading.Thread(target=load, args=(node, args, device), daemon=True, name="loader").start()
    while not node.wait_exit(0.5):   # wake up regularly so signal handlers run
        pass
    code = node.exit_code or 0
    log(f"rank {rank}: exiting with status {code}" + (" (restart)" if code == RESTART_EXIT_CODE else ""))
    server.stop(grace=0.5).wait(2)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)
