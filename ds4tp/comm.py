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

    def close(self) -> None:
        pass


class DistComm:
    """torch.distributed collectives over one process group (sum all-reduce, concat all-gather)."""

    def __init__(self, rank: int, world: int, backend: str, timeout_s: float):
        self.rank, self.world, self.backend = rank, world, backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.counter = Counter()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        self.counter.add("all_reduce")
        try:
            dist.all_reduce(x)
        except Exception as e:  # gloo: peer closed / timeout; nccl: watchdog / timeout
            raise CommError(f"rank {self.rank}: all_reduce failed: {e}") from e
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        import torch.distributed as dist
        self.counter.add("all_gather")
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        try:
            dist.all_gather(parts, x)
        except Exception as e:
            raise CommError(f"rank {self.rank}: all_gather failed: {e}") from e
        return torch.cat(parts, dim=dim)

    def close(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def init_dist(rank: int | None = None, world: int | None = None, *, device: str = "cpu",
              master_addr: str | None = None, master_port: int | None = None,
              timeout_s: float = 60.0):
    """Join the process group. Arguments default to the torchrun environment variables.

    Returns SingleComm for world 1. Raises CommError naming the problem if the rendezvous does
    not complete within timeout_s (a peer that never joins).
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
    return DistComm(rank, world, backend, timeout_s)
