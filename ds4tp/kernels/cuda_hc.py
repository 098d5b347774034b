"""The hyper-connection step of one decode token in CUDA C (hc.cu, compiled by NVRTC through
CuPy): the stream update of the sublayer just run, the next sublayer's mixer logits and its
normed input, in one launch whose blocks exchange their partial sums (tagged words, read by
every block) so that each forms its own columns of the input, instead of leaving the input to
the last block alone (triton_hc.hc_step; see hc.cu for why). Sinkhorn (post', M') stays
in triton_hc.hc_mix beside the sublayer, as with hc_step(mix=False).

`hc_step(...)` returns (new streams, x, z) like triton_hc.hc_step(mix=False), or None for what it
does not cover (no CuPy, not one token, n_hc != 4, E not a multiple of 128, more blocks than
SMs or 32); the caller then takes the Triton kernel. Twins: model.hc_post_torch, hc_logits_torch,
hc_combine_torch (tests/kernel_cases.py: case_cuda_hc_step).
"""
from __future__ import annotations

import numpy as np
import torch

from ds4tp.kernels import cuda_c

BE = 128            # stream columns per block (hc.cu HC_BE)
THREADS = 256
MAX_BLOCKS = 32     # hc.cu HC_MAXB (E <= 4096)
_WORDS = 24 + 2 * 16   # hc.cu HC_WORDS: a block's partials as 32-bit words
DEFINES: tuple = ()  # hc.cu's compile-time variant (benchmarks: (("HC_BARRIER", 1),))
_switch = cuda_c.Switch()
set_enabled = _switch.set          # benchmarks time the Triton kernel in the same run
available = _switch.available

_EXCHANGES: dict = {}   # (device index, stream handle) -> int32 [2 + 2 * MAX_BLOCKS * _WORDS]


def _exchange(device: torch.device) -> torch.Tensor:
    """The blocks' exchange (hc.cu `bar`: the last launch's tag, then the tagged partials) for
    launches on torch's current stream: each launch tags its words with the next number, so one
    zeroed buffer serves all launches on a stream, one at a time (each stream has its own, as
    the split matvecs' tickets do: triton_matvec._tickets). Kept for the process's life:
    captured graphs hold their addresses."""
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    buf = _EXCHANGES.get(key)
    if buf is None:
        buf = _EXCHANGES[key] = torch.zeros(2 + 2 * MAX_BLOCKS * _WORDS, dtype=torch.int32, device=device)
    return buf


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.contiguous()


def hc_step(f: torch.Tensor, hc: torch.Tensor, post: torch.Tensor, m: torch.Tensor,
            fn_raw: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm: torch.Tensor,
            n_hc: int, eps: float, rms_eps: float):
    """f [1, E], hc [1, n, E], post [1, n], M [1, n, n] float32, fn_raw the F16 mixer weight's
    bytes [N, 2nE], scale [3], base [N], norm [E] -> (the new streams [1, n, E], the normed
    sublayer input x [1, E], the mixer logits z [1, N]), or None where not covered. Shapes that
    do not fit together raise ValueError, as triton_hc.hc_step's do."""
    if not (available() and hc.is_cuda and hc.dim() == 3 and hc.shape[0] == 1):
        return None
    _, n, E = hc.shape
    N = 2 * n + n * n
    if n != n_hc or f.shape != (1, E) or post.shape != (1, n) or m.shape != (1, n, n):
        raise ValueError(f"hc_step: f {tuple(f.shape)}, hc {tuple(hc.shape)}, post {tuple(post.shape)}, "
                         f"M {tuple(m.shape)} do not match n_hc={n_hc}")
    if fn_raw.dtype != torch.uint8 or fn_raw.shape != (N, 2 * n * E) or not fn_raw.is_contiguous():
        raise ValueError(f"hc_step: F16 mixer weight bytes {tuple(fn_raw.shape)} do not match "
                         f"{N} logits of {n * E} inputs")
    if norm.shape != (E,) or scale.shape != (3,) or base.shape != (N,):
        raise ValueError(f"hc_step: norm {tuple(norm.shape)}, scale {tuple(scale.shape)}, base "
                         f"{tuple(base.shape)} do not match width {E}, {N} logits")
    tensors = (f, hc, post, m, scale, base, norm)
    if any(v.dtype != torch.float32 for v in tensors):
        return None
    if any(v.device != hc.device for v in tensors + (fn_raw,)):
        return None
    from ds4tp.kernels.triton_matvec import _sm_count
    dev = hc.device
    blocks = E // BE
    if n != 4 or E % BE or blocks > min(MAX_BLOCKS, _sm_count(dev)) or fn_raw.data_ptr() % 16:
        return None
    fn = cuda_c.kernel("hc.cu", "hc_step", dev.index, DEFINES)
    if fn is None:
        return None
    f, hc, post, m, norm = (_aligned(v) for v in (f, hc, post, m, norm))
    out = torch.empty(1, n, E, dtype=torch.float32, device=dev)
    x = torch.empty(1, E, dtype=torch.float32, device=dev)
    z = torch.empty(1, N, dtype=torch.float32, device=dev)
    ws_y = torch.empty(blocks, N, dtype=torch.float32, device=dev)
    ws_g = torch.empty(blocks, n * n, dtype=torch.float64, device=dev)
    p = cuda_c.ptr
    cuda_c.launch(fn, dev, (blocks, 1), THREADS // 32,
                  (p(f), p(hc), p(post), p(m), p(fn_raw), p(scale.contiguous()),
                   p(base.contiguous()), p(norm), p(out), p(x), p(z), p(ws_y), p(ws_g),
                   p(_exchange(dev)), np.int32(E), np.float32(eps), np.float32(rms_eps)))
    return out, x, z
