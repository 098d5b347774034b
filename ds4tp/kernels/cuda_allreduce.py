"""The within-host all-reduce: two ranks on one host sum a float32 tensor through each other's
memory (allreduce.cu, one kernel launch), where NCCL takes a kernel of its own plus its protocol.

This is the option beside NCCL for two GPUs of one machine (peer access over NVLink or PCIe). Two
nodes (two Sparks over RoCE) keep NCCL: a CUDA IPC handle means nothing on another host.
ds4tp.comm.DistComm uses it for the tensors `PeerAllReduce.takes` (float32, contiguous, a
multiple of 4 elements, at most SLOT_BYTES: a decode step's all-reduces) and NCCL for the rest
(a prefill's [T, 4096] outputs), a choice both ranks make alike from the shape alone.

Its twin is NCCL's all-reduce: for two ranks both compute one addition per element, a + b on one
rank and b + a on the other, which IEEE arithmetic makes equal, so the results are the same bits
(tests/test_tp.py, with two GPUs).

The kernel launches like the other CUDA C kernels (cuda_c.launch: torch's current stream, so CUDA
graphs capture it; a programmatic dependent launch on sm_90, so the kernel after it starts its
weight loads while it waits for the peer). `connect` sets it up collectively: every rank
allocates its buffer and exports an IPC handle, all exchange them, each opens its peer's, and it
is used only if that worked on both ranks (otherwise both keep NCCL, with the reason).

The same exchange also rides inside a consumer's launch (`PeerAllReduce.fused`): the decode
graphs' HC step (triton_hc.hc_step with `peer=`) takes a sublayer's output as this rank's part,
and each of its programs swaps its own columns with the peer's program of the same index through
the same slots, one flag word per program, before it uses them. That saves the all-reduce's own
launch and its output's round trip through memory. It shares the all-reduce counter `ctr` with
`ar2_sum`, so the two kinds interleave in any order and the slot argument below holds for both.
"""
from __future__ import annotations

import socket
from typing import NamedTuple

import numpy as np
import torch

from ds4tp.kernels import cuda_c

SLOT_BYTES = 256 << 10     # the largest tensor taken (a decode step's all-reduces: 16 KB; the
                           # indexer's scores: 4 bytes per compressed row, 64 KB at 65,536 tokens)
_FLAGS = 2 * SLOT_BYTES    # byte offset of the two flag words in a rank's buffer
FUSED_FLAGS = 64           # flag words per slot for the fused exchange (one per program)
_PFLAGS = _FLAGS + 256     # byte offset of those: [2, FUSED_FLAGS] int64
_BYTES = _PFLAGS + 2 * FUSED_FLAGS * 8
_THREADS_WARPS = 16        # one block of 512 threads
_IPC_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


def host_id() -> str:
    """This host's identity for 'same machine': hostname and boot id (containers on two nodes
    may share a hostname, not a boot id)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class _Addr:
    """A device address as a Triton pointer argument (Triton takes anything with data_ptr() and
    a dtype): the peer's buffer is mapped memory that no torch tensor owns."""

    def __init__(self, addr: int, dtype: torch.dtype):
        self.addr, self.dtype = addr, dtype

    def data_ptr(self) -> int:
        return self.addr


class PeerSum(NamedTuple):
    """What a consumer launch needs to make the exchange itself (triton_hc.hc_step's `peer`):
    the two ranks' slots [2 * cap] float32 and fused flag words [2, FUSED_FLAGS] int64 (peer's,
    own), this rank's all-reduce counter, the slot size and the wait's timeout."""
    peer_slots: object
    my_slots: object
    peer_flags: object
    my_flags: object
    ctr: torch.Tensor
    cap: int
    timeout_ns: int


class PeerAllReduce:
    """One rank's side of the within-host all-reduce of two ranks (see the module docstring).
    `on` switches it off for an A/B timing in the same run (both ranks must switch alike), and
    `fuse` the exchange inside consumer launches (`fused`) alone."""

    def __init__(self, rank: int, device: torch.device, mine: int, peer: int, timeout_s: float,
                 own: torch.Tensor | None = None):
        self.rank, self.device = rank, device
        self._mine, self._peer = mine, peer            # buffer addresses: own, peer's (mapped)
        self._own = own                                # loopback: the torch buffer at both
        self.ctr = torch.zeros(1, dtype=torch.int64, device=device)   # all-reduces made so far
        self.timeout_ns = np.uint64(int(timeout_s * 1e9))
        self.on = True
        self.fuse = True
        self.fn = cuda_c.kernel("allreduce.cu", "ar2_sum", device.index) if device.type == "cuda" else None

    @classmethod
    def loopback(cls, device: torch.device, timeout_s: float = 10.0) -> "PeerAllReduce":
        """One rank paired with itself (its buffer is also its peer's): every all-reduce gives
        x + x = 2x exactly. For tests of the protocol on one GPU, and of the fused exchange in
        Triton's CPU interpreter."""
        own = torch.zeros(_BYTES, dtype=torch.uint8, device=device)
        return cls(0, own.device, own.data_ptr(), own.data_ptr(), timeout_s, own=own)   # ("cuda" -> "cuda:0")

    def takes(self, x: torch.Tensor) -> bool:
        """Whether x goes through peer memory. Decided from x's dtype, layout and size alone, which
        are the same on both ranks (an address's alignment need not be: one rank here and the
        other on NCCL would wait on each other until the trap)."""
        return (self.on and self.fn is not None and x.is_cuda and x.device == self.device
                and x.dtype == torch.float32 and x.is_contiguous() and x.numel() % 4 == 0
                and 0 < 4 * x.numel() <= SLOT_BYTES)

    def fused(self, x: torch.Tensor) -> PeerSum | None:
        """The exchange's arguments for a consumer launch that sums x itself (None: x goes by
        all_reduce). The same choice on both ranks: x's shape and dtype alone."""
        if not (self.on and self.fuse and x.device == self.device and x.dtype == torch.float32
                and x.is_contiguous() and 0 < 4 * x.numel() <= SLOT_BYTES):
            return None
        f32, i64 = torch.float32, torch.int64
        return PeerSum(self._at(self._peer, 0, f32), self._at(self._mine, 0, f32),
                       self._at(self._peer, _PFLAGS, i64), self._at(self._mine, _PFLAGS, i64),
                       self.ctr, SLOT_BYTES // 4, int(self.timeout_ns))

    def _at(self, base: int, offset: int, dtype: torch.dtype):
        """A Triton pointer argument `offset` bytes into the buffer at `base`: for the loopback
        pairing a torch view of its buffer (Triton's interpreter takes only tensors), else the
        address."""
        if self._own is not None:
            return self._own[offset:].view(dtype)
        return _Addr(base + offset, dtype)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over both ranks, in place (takes(x) holds)."""
        y = x if x.data_ptr() % 16 == 0 else x.clone()      # (the kernel's 16-byte accesses)
        u64 = np.uint64
        args = (cuda_c.ptr(y), np.int64(y.numel()), u64(self._peer), u64(self._mine),
                np.int64(SLOT_BYTES // 4), u64(self._peer + _FLAGS), u64(self._mine + _FLAGS),
                cuda_c.ptr(self.ctr), self.timeout_ns)
        cuda_c.launch(self.fn, self.device, (1,), _THREADS_WARPS, args)
        if y is not x:
            x.copy_(y)
        return x

    def close(self) -> None:
        cp = cuda_c._cupy()
        if self._own is not None:
            self._own = self._mine = self._peer = None
        if cp is None or self._mine is None:
            return
        try:
            with cp.cuda.Device(self.device.index):
                torch.cuda.synchronize(self.device)
                cp.cuda.runtime.ipcCloseMemHandle(self._peer)
                cp.cuda.runtime.free(self._mine)
        except Exception:
            pass
        self._mine = self._peer = None


def connect(rank: int, world: int, device: torch.device, gather, timeout_s: float):
    """(PeerAllReduce or None, why not). Collective: every rank calls it, and `gather(obj)`
    returns every rank's obj in rank order (torch.distributed.all_gather_object)."""
    cp = cuda_c._cupy()
    why = None
    if device.type == "cuda" and device.index is None:     # "cuda": the current device, by index
        device = torch.device("cuda", torch.cuda.current_device())     # (takes compares devices)
    if world != 2:
        why = f"{world} ranks (it takes two)"
    elif device.type != "cuda" or cp is None:
        why = "no CUDA or no CuPy"
    elif cuda_c.kernel("allreduce.cu", "ar2_sum", device.index) is None:
        why = "allreduce.cu did not compile"
    mine, handle = None, None
    if why is None:
        try:
            with cp.cuda.Device(device.index):
                mine = cp.cuda.runtime.malloc(_BYTES)
                cp.cuda.runtime.memset(mine, 0, _BYTES)
                cp.cuda.runtime.deviceSynchronize()
                handle = bytes(cp.cuda.runtime.ipcGetMemHandle(mine))
        except Exception as e:
            why = f"IPC export failed: {e}"
    infos = gather((host_id(), handle, why))
    hosts = {h for h, _, _ in infos}
    bad = [f"rank {r}: {w}" for r, (_, _, w) in enumerate(infos) if w]
    if not bad and len(hosts) > 1:
        bad = [f"ranks on {len(hosts)} hosts"]
    peer = None
    if not bad:
        try:
            with cp.cuda.Device(device.index):
                peer = cp.cuda.runtime.ipcOpenMemHandle(infos[1 - rank][1], _IPC_LAZY_PEER_ACCESS)
        except Exception as e:
            bad = [f"rank {rank}: IPC open failed: {e}"]
    oks = gather(bad[0] if bad else None)
    bad = [w for w in oks if w] or bad
    if bad:
        if cp is not None:
            with cp.cuda.Device(device.index):
                if peer is not None:
                    cp.cuda.runtime.ipcCloseMemHandle(peer)
                if mine is not None:
                    cp.cuda.runtime.free(mine)
        return None, "; ".join(bad)
    return PeerAllReduce(rank, device, mine, peer, timeout_s), None
