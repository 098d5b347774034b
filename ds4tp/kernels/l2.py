"""Weights of a later launch of the decode step, streamed into L2 ahead of it (l2.cu).

A decode step alternates launches that stream weights (the matvecs, bound by HBM bandwidth) with
short latency-bound ones (the KV store and attention, the HC step, the router's selection)
during which HBM mostly idles. `warm(ws, device)` queues one small launch that asks L2 for the
bytes the one-token kernels will read of ws (cp.async.bulk.prefetch.L2: a hint; nothing is
written, so no result depends on it), so they arrive during those idle stretches and the matvec
that reads them later finds them in L2. At most L2_SHARE of the device's L2 per call, in the
order given: ask for the first reader's bytes first.

Where it is called, and why there, is the static decoder's business (decode_graph.py); it is a
no-op without CuPy or CUDA, and `set_enabled(False)` turns it off for an A/B timing.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ds4tp.config import Q8_0
from ds4tp.kernels import cuda_c

L2_SHARE = 0.75        # of the device's L2 asked for by one call
MAX_RANGES = 6         # l2.cu's byte ranges per launch
CHUNK = 8 << 10        # bytes per prefetch instruction
THREADS = 128          # per block (l2.cu's launch bound); one block per SM
_switch = cuda_c.Switch()
set_enabled = _switch.set
available = _switch.available


def read_tensors(w) -> tuple[torch.Tensor, ...]:
    """The tensors the one-token kernels read for weight w: a 2-D Q8_0 weight's split layout
    (quants, scales: triton_matvec.q8_0_split), else its GGUF bytes as loaded."""
    if w.qtype == Q8_0 and len(w.shape) == 2:
        from ds4tp.kernels.triton_matvec import q8_0_split
        return q8_0_split(w)
    return (w.raw,)


def ranges(spans, budget: int) -> list[tuple[int, int]]:
    """(address, bytes) spans -> at most MAX_RANGES ranges of whole 16-byte units covering them
    (start rounded down, end up: CUDA allocations are 256-byte aligned and sized in whole 512-byte
    units, so the rounding stays inside the allocation), in order, cut off after `budget` bytes."""
    out = []
    for addr, n in spans:
        if n <= 0 or budget <= 0 or len(out) == MAX_RANGES:
            break
        a = addr - addr % 16
        size = -(-(addr + n - a) // 16) * 16
        size = min(size, budget - budget % 16)
        if size <= 0:
            break
        out.append((a, size))
        budget -= size
    return out


@functools.lru_cache(maxsize=8)
def _budget(device_index: int) -> int:
    return int(L2_SHARE * torch.cuda.get_device_properties(device_index).L2_cache_size)


def warm(ws, device: torch.device, mode: int = 0, chunk: int = CHUNK) -> None:
    """Queue the L2 prefetch of weights ws (QTensors, first reader first) on the current stream.
    mode: l2.cu's L2_MODE (bench/l2_probe.py times the others)."""
    if not available() or device.type != "cuda":
        return
    fn = cuda_c.kernel("l2.cu", "l2_prefetch", device.index, (("L2_MODE", mode),) if mode else ())
    if fn is None:
        return
    spans = [(t.data_ptr(), t.numel() * t.element_size()) for w in ws for t in read_tensors(w)
             if t.is_cuda and t.device == device]
    rs = ranges(spans, _budget(device.index))
    if not rs:
        return
    rs += [(0, 0)] * (MAX_RANGES - len(rs))
    args = [v for a, n in rs for v in (np.uint64(a), np.int64(n))] + [np.int64(chunk)]
    from ds4tp.kernels.triton_matvec import _sm_count
    cuda_c.launch(fn, device, (_sm_count(device),), THREADS // 32, tuple(args))
