"""Apply a shard plan: read one rank's bytes of every tensor from the memory-mapped GGUF.

This is the one place a plan's ranges become byte ranges. A rows/experts split takes whole
encoded rows; a cols split takes a block-aligned byte range out of every row; a split by
channel takes the same range out of each of its blocks. Only those bytes
are copied out of the mmap (never the whole tensor, never another rank's slice).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ds4tp import config as C
from ds4tp.gguf_file import DS4File
from ds4tp.qtensor import QTensor
from ds4tp.shard.plan import ShardPlan, TensorPlan

# Tensors used as plain tables/vectors rather than multiplied as matrices.
_TABLES = ("token_embd.weight",)


def _is_matrix(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name not in _TABLES and "compressor_ape" not in name \
        and not name.endswith("tid2eid.weight")


def rank_bytes_view(f: DS4File, tp: TensorPlan, rank: int) -> np.ndarray:
    """The rank's encoded bytes of one tensor as a (possibly strided) view of the mmap,
    shaped [*local_rows, local_row_bytes]."""
    shape = tp.shape
    epb, bpb = C.BLOCK[tp.qtype]
    row_bytes = shape[-1] // epb * bpb
    v = f.tensor_bytes(tp.name).reshape(*shape[:-1], row_bytes)
    if tp.dim is None:
        return v
    a, b = tp.ranges[rank]
    if tp.dim == len(shape) - 1:       # input columns: a byte range inside every row
        if tp.blocks > 1:              # (a channel split: the same range of every block)
            blk = v.reshape(*v.shape[:-1], tp.blocks, -1)[..., a // epb * bpb: b // epb * bpb]
            return blk.reshape(*v.shape[:-1], -1)
        return v[..., a // epb * bpb: b // epb * bpb]
    d = tp.dim
    v = v.reshape(*v.shape[:d], tp.blocks, v.shape[d] // tp.blocks, *v.shape[d + 1:])
    idx = [slice(None)] * v.ndim
    idx[d + 1] = slice(a, b)           # the same rows of every block (one block but for channels)
    sub = v[tuple(idx)]
    return sub.reshape(*sub.shape[:d], -1, *sub.shape[d + 2:])


def _to_tensor(name: str, qtype: int, local_shape, raw: np.ndarray, device):
    """Copy a rank's bytes out of the mmap into a tensor on `device` (only those bytes)."""
    with warnings.catch_warnings():          # the mmap is read-only; we copy before any write
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(raw)           # a strided view of the mmap, no copy yet
    t = src.to(device, copy=True) if torch.device(device).type != "cpu" else src.clone()
    t = t.contiguous()
    if _is_matrix(name, local_shape):
        return QTensor(qtype, tuple(local_shape), t)
    if qtype == C.F32:
        return t.view(torch.float32).reshape(local_shape)
    if qtype == C.F16:
        return t.view(torch.float16).reshape(local_shape)
    if qtype == C.I32:
        return t.view(torch.int32).reshape(local_shape).to(torch.int64)
    raise ValueError(f"{name}: cannot use a {C.type_name(qtype)} tensor as a table")


def load_rank(f: DS4File, plan: ShardPlan, rank: int, device="cpu", threads: int = 8) -> dict:
    """name -> QTensor (matrices) or torch.Tensor (vectors, tables) for one rank.

    Tensors are copied in parallel threads (page-cache reads and host-to-device copies release
    the GIL), which is what makes a full-size load fast."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [tp for tp in plan.tensors if tp.name in f.tensors]

    def one(tp):
        raw = rank_bytes_view(f, tp, rank)
        return tp.name, _to_tensor(tp.name, tp.qtype, tp.local_shape(rank), raw, device)

    if threads <= 1 or len(todo) < 2:
        return dict(map(one, todo))
    # biggest first, so the pool stays busy to the end
    todo.sort(key=lambda tp: -tp.rank_bytes[rank])
    with ThreadPoolExecutor(threads) as ex:
        return dict(ex.map(one, todo))


def held_bytes(tensors: dict) -> int:
    """Weight bytes a rank holds (encoded bytes for matrices, element bytes otherwise)."""
    n = 0
    for t in tensors.values():
        n += t.nbytes if isinstance(t, QTensor) else t.numel() * (4 if t.dtype == torch.int64 else t.element_size())
    return n
