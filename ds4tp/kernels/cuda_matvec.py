"""The Q8_0 and F16 matvecs of one decode token in CUDA C (matvec.cu, compiled by NVRTC through
CuPy).

`q8_0(w, x, groups, norm, eps)` covers the three one-token Q8_0 entry points of the dispatch:
linear, grouped_linear (attn_output_a) and linear_normed (attn_q_b after its RMS norm). It reads
the same split layout as the Triton kernel (triton_matvec.q8_0_split), quantises the input in
its prologue bit-identically to numerics.q8_0_act, and sums each 32-block exactly in integers,
so results differ from the torch twins only by float32 rounding (tests/kernel_cases.py:
case_cuda_q8_0). One warp per row, no split K: no workspace, no second pass.

It returns None for what it does not cover (no CuPy, T > 1, other weight types, inputs that are
not 512 * 2^i <= MAX_K wide); the dispatch in ds4tp.kernels then takes the Triton kernel.

`f16(w, x)` is the one-token F16 linear (the MoE router's 4096 -> 256 on the decode path): float32
FMAs of the weights converted to float32 against x as is (the twin: ops.linear_torch, up to
float32 summation order), its weight loads issued before the PDL wait (case_cuda_f16).
"""
from __future__ import annotations

import numpy as np
import torch

from ds4tp.config import F16, Q8_0
from ds4tp.kernels import cuda_c

# Launch constants (H200 sweep, bench/results/kernels_h200_s7_q8c2_20261129.json: 16 warps and 4
# loads per lane were fastest or within 0.4 us on every DS4 Q8_0 shape; 8 loads need 88
# registers, 4 need 60, so more warps fit)
WARPS = 16         # warps per block
LOADS = 4          # 16-byte loads in flight per lane (matvec.cu LOADS)
MINB = 0           # blocks per SM the register allocation must allow (0: ptxas chooses)
Q_PRE = 1          # steps of a warp's first rows prefetched into L2 before the PDL wait (0: all;
                   # matvec.cu Q_PRE)
MAX_K = 16384      # inputs per row (matvec.cu MAX_K)
_WIDTHS = tuple(512 << i for i in range(6) if 512 << i <= MAX_K)   # whole 16-byte pieces per lane
_switch = cuda_c.Switch()
set_enabled = _switch.set          # benchmarks time the Triton kernel in the same run
available = _switch.available


def _kernel(device: torch.device, warps: int | None = None, loads: int | None = None,
            minb: int | None = None, name: str = "q8_0_matvec"):
    """Kernel `name` of matvec.cu compiled per device and launch constants (None: the module's
    constants, read at call time, so that benchmarks can set other values)."""
    mix = cuda_c.mix_defines() if name == "q8_0_matvec_mix" else ()
    return cuda_c.kernel("matvec.cu", name, device.index,
                         (("WARPS", warps or WARPS), ("LOADS", loads or LOADS),
                          ("MINB", MINB if minb is None else minb), ("Q_PRE", Q_PRE)) + mix)


def default_rpb(fn, n_rows: int, device: torch.device, warps: int | None = None) -> int:
    """Rows per block: all blocks in one wave, the same number of rows for every warp."""
    warps = warps or WARPS
    per = -(-n_rows // cuda_c.wave_slots(fn, warps, device))
    return -(-per // warps) * warps


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.contiguous()


def q8_0(w, x: torch.Tensor, groups: int = 1, norm: torch.Tensor | None = None, eps: float = 0.0,
         rpb: int | None = None, warps: int | None = None, loads: int | None = None,
         minb: int | None = None, swiglu_clamp: float = 0.0, mix=None) -> torch.Tensor | None:
    """y [1, N] = w . x for one token and a 2-D Q8_0 weight (N, K). x [1, K]; with groups = G,
    x [1, G*K] and the N/G rows of group g take x's g-th slice of K; with norm [K] (one group),
    rms_norm(x, norm) with eps in place of x; with swiglu_clamp = c > 0 (one group, no norm),
    x [1, 2K] and swiglu_clamped(x[:, :K], x[:, K:], c) in place of x. None if not covered.
    mix: a cuda_c.MixJob that rides as one more block where it can (one group; mix.done says
    so)."""
    if not (available() and w.qtype == Q8_0 and len(w.shape) == 2 and x.dim() == 2
            and x.shape[0] == 1 and x.dtype == torch.float32 and x.is_cuda and w.raw.is_cuda
            and x.device == w.raw.device):
        return None
    N, K = w.shape
    act = swiglu_clamp > 0
    if K not in _WIDTHS or groups < 1 or N % groups or x.shape[1] != (2 if act else groups) * K:
        return None
    if act and (groups != 1 or norm is not None):
        return None
    if norm is not None and (groups != 1 or norm.shape != (K,) or norm.dtype != torch.float32
                             or norm.device != x.device):
        return None
    warps = warps or WARPS
    ride = mix is not None and groups == 1 and mix.takes(x.device)
    fn = _kernel(x.device, warps, loads, minb, "q8_0_matvec_mix" if ride else "q8_0_matvec")
    if fn is None:
        return None
    from ds4tp.kernels.triton_matvec import q8_0_split
    q, d = q8_0_split(w)
    x = _aligned16(x)
    nw = _aligned16(norm) if norm is not None else None
    y = torch.empty(1, N, dtype=torch.float32, device=x.device)
    rpg = N // groups
    rpb = rpb or default_rpb(fn, N, x.device, warps)
    cuda_c.launch(fn, x.device, (-(-rpg // rpb) + ride, groups), warps,
                  (cuda_c.ptr(q), cuda_c.ptr(d), cuda_c.ptr(x),
                   cuda_c.ptr(nw) if nw is not None else np.uint64(0), np.float32(eps),
                   np.float32(swiglu_clamp if act else 0.0),
                   cuda_c.ptr(y), np.int32(K), np.int32(rpg), np.int32(rpb))
                  + (mix.args() if ride else ()))
    return y


_f16_switch = cuda_c.Switch()
set_f16_enabled = _f16_switch.set   # benchmarks time the Triton kernel in the same run


def f16(w, x: torch.Tensor) -> torch.Tensor | None:
    """y [1, N] = w . x for one token and a 2-D F16 weight (N, K), K = 1024 * S with S <= 16
    (matvec.cu f16_matvec: S warps per row); None if not covered."""
    if not (_f16_switch.available() and w.qtype == F16 and len(w.shape) == 2 and x.dim() == 2
            and x.shape[0] == 1 and x.dtype == torch.float32 and x.is_cuda and w.raw.is_cuda
            and x.device == w.raw.device):
        return None
    N, K = w.shape
    raw = w.raw
    if (K % 1024 or K > 16 * 1024 or x.shape[1] != K or raw.stride(1) != 1 or raw.data_ptr() % 16
            or raw.stride(0) % 16):
        return None
    fn = _kernel(x.device, name="f16_matvec")      # (the module of the Q8_0 kernel's defaults)
    if fn is None:
        return None
    from ds4tp.kernels.triton_matvec import _sm_count
    S = K // 1024
    R = max(1, min(16 // S, -(-N // _sm_count(x.device))))     # rows per block: ~one block per SM
    x = _aligned16(x)
    y = torch.empty(1, N, dtype=torch.float32, device=x.device)
    cuda_c.launch(fn, x.device, (-(-N // R), 1), S * R,
                  (cuda_c.ptr(raw), np.int64(raw.stride(0) // 2), cuda_c.ptr(x), cuda_c.ptr(y),
                   np.int32(N), np.int32(K), np.int32(R)))
    return y

