"""The decode attention of one token in CUDA C with a head's split blocks in one thread-block
cluster (attn.cu, compiled by NVRTC through CuPy; sm_90). Prepared in the thirty-second session
and off by default (ENABLED): the Triton kernel (triton_attn.attention) serves until a replay
A/B on the GPU says otherwise (`bash bench/device_run.sh s35a`; critical_path variant
`attn_cuda`).

`attention(...)` takes triton_attn.attention's arguments and returns None for what it does not
cover (switched off, no CuPy or no sm_90, a head dim that is not 128, 256 or 512, more than 8
blocks a head); the dispatch (decode_graph.decode_attention) then takes the Triton kernel. The
twin is decode_graph.decode_attention_torch (tests/kernel_cases.py: case_cuda_attention).
"""
from __future__ import annotations

import numpy as np
import torch

from ds4tp.kernels import cuda_c, triton_attn

ENABLED = False    # read at call time: benchmarks and the twin tests switch it on
SPLIT = 8          # blocks a head, one cluster (attn.cu AS; at most 8, the portable cluster size)
KEYS = 16          # keys a block step (attn.cu ABK)
MINB = 4           # blocks an SM its registers must allow (attn.cu AMINB)


def _kernel(device: torch.device, D: int, n_rot: int):
    return cuda_c.kernel("attn.cu", "attn_decode", device.index,
                         (("AD", D), ("ANROT", n_rot), ("ABK", KEYS), ("AS", SPLIT), ("AMINB", MINB)))


def attention(qb, ring, ring_pos, comp, ratio, mask, sinks, cos, sin, pos, eps,
              force: bool = False) -> torch.Tensor | None:
    """qb [1, H*D] -> o [1, H, D], as triton_attn.attention (the same argument checks); None
    where not covered. force: run even when ENABLED is off (the twin tests)."""
    if not ((ENABLED or force) and cuda_c.available() and qb.is_cuda
            and torch.cuda.get_device_capability(qb.device) >= (9, 0)):
        return None
    n_swa, D, H, n_rot = triton_attn.check_attention(qb, ring, ring_pos, comp, ratio, mask, sinks,
                                                      cos, sin, pos)
    if D not in (128, 256, 512) or not 0 < SPLIT <= 8:
        return None
    if any(t.data_ptr() % 16 for t in (qb, ring) + (() if comp is None else (comp,))):
        return None                   # (rows are read 16 bytes a thread)
    fn = _kernel(qb.device, D, n_rot)
    if fn is None:
        return None
    out = torch.empty(1, H, D, dtype=torch.float32, device=qb.device)
    comp_t = ring if comp is None else comp
    mask_t = ring_pos if mask is None else mask.view(torch.int8)
    cuda_c.launch(fn, qb.device, (SPLIT, H), D // 128,
                  (cuda_c.ptr(qb), cuda_c.ptr(ring), cuda_c.ptr(ring_pos), cuda_c.ptr(comp_t),
                   cuda_c.ptr(mask_t), cuda_c.ptr(sinks), cuda_c.ptr(cos), cuda_c.ptr(sin),
                   cuda_c.ptr(pos), cuda_c.ptr(out), np.int32(n_swa), np.int32(max(ratio, 1)),
                   np.int32(comp is not None), np.int32(mask is not None), np.float32(eps),
                   np.float32(1.0 / D ** 0.5)))
    return out
