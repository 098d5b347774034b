"""Apply a shard plan: read one rank's bytes of every tensor from the memory-mapped GGUF.

This is the one place a plan's ranges become byte ranges. A rows/experts split takes whole
encoded rows; a cols split takes a block-aligned byte range out of every row. Only those bytes
are copied out of the mmap (never the whole tensor, never another rank's slice).
"""
from __future__ import annotations

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
    info = f.tensors[tp.name]
    shape = tp.shape
    epb, bpb = C.BLOCK[tp.qtype]
    row_bytes = shape[-1] // epb * bpb
    v = f.tensor_bytes(tp.name).reshape(*shape[:-1], row_bytes)
    if tp.dim is None:
        return v
    a, b = tp.ranges[rank]
    if tp.dim == len(shape) - 1:       # input columns: a byte range inside every row
        return v[..., a // epb * bpb: b // epb * bpb]
    idx = [slice(None)] * v.ndim
    idx[tp.dim] = slice(a, b)
    return v[tuple(idx)]
    # (info kept for symmetry with callers that want offsets)


def _to_tensor(name: str, qtype: int, local_shape, raw: np.ndarray, device):
    raw = np.ascontiguousarray(raw)   # copies exactly the rank's bytes out of the mmap
    if raw.base is not None or isinstance(raw, np.memmap):
        raw = np.array(raw, copy=True)
    t = torch.from_numpy(raw)
    if _is_matrix(name, local_shape):
        return QTensor(qtype, tuple(local_shape), t.to(device))
    if qtype == C.F32:
        return t.view(torch.float32).reshape(local_shape).to(device)
    if qtype == C.F16:
        return t.view(torch.float16).reshape(local_shape).to(device)
    if qtype == C.I32:
        return t.view(torch.int32).reshape(local_shape).to(device=device, dtype=torch.int64)
    raise ValueError(f"{name}: cannot use a {C.type_name(qtype)} tensor as a table")


def load_rank(f: DS4File, plan: ShardPlan, rank: int, device="cpu") -> dict:
    """name -> QTensor (matrices) or torch.Tensor (vectors, tables) for one rank."""
    out = {}
    for tp in plan.tensors:
        if tp.name not in f.tensors:
            continue
        raw = rank_bytes_view(f, tp, rank)
        out[tp.name] = _to_tensor(tp.name, tp.qtype, tp.local_shape(rank), raw, device)
    return out


def held_bytes(tensors: dict) -> int:
    """Weight bytes a rank holds (encoded bytes for matrices, element bytes otherwise)."""
    n = 0
    for t in tensors.values():
        n += t.nbytes if isinstance(t, QTensor) else t.numel() * (4 if t.dtype == torch.int64 else t.element_size())
    return n
