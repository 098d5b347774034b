"""The exact small numerics of DS4: activation quantizers, FP8/FP4 emulation, norms, RoPE.

Everything here is plain float32 torch and runs on any device. Each function reproduces the
reference engine's rounding rule (spec sections 5.3, 9.2, 9.3, 9.6, 0) so that our values land on
the same grid as its; where a rule is "round half to even" we use torch.round, which is.
"""
from __future__ import annotations

import functools
import math

import torch

from ds4tp import kernels
from ds4tp.config import RMS_EPS
from ds4tp.fuse import fused


# ---- activation quantizers (round trips to float32) --------------------------------------------
def q8_0_act(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 activation round trip over 32-element blocks of the last dim.

    d = amax/127 kept in float32 (not rounded to f16), q = clamp(rint(x/d), -128, 127).
    """
    shp = x.shape
    b = x.reshape(*shp[:-1], shp[-1] // 32, 32)
    amax = b.abs().amax(-1, keepdim=True)
    # Divisions are tensor/tensor on purpose: torch computes `scalar / t` as reciprocal(t)*scalar
    # (two roundings) and, on CUDA, `t / scalar` as t*(1/scalar); the reference divides.
    d = amax / torch.full_like(amax, 127.0)
    inv = torch.where(d > 0, torch.ones_like(d) / d, torch.zeros_like(d))
    q = torch.round(b * inv).clamp_(-128, 127)
    return (q * d).reshape(shp)


def q8_k_act(x: torch.Tensor) -> torch.Tensor:
    """Q8_K activation round trip over 256-element blocks of the last dim.

    The scale comes from the signed element of largest magnitude m (first on ties):
    iscale = -127/m, q = clamp(rint(iscale*x), -128, 127), d = 1/iscale.
    """
    shp = x.shape
    b = x.reshape(*shp[:-1], shp[-1] // 256, 256)
    idx = b.abs().argmax(-1, keepdim=True)           # first maximal index
    m = torch.gather(b, -1, idx)
    nz = m != 0
    # correctly rounded divisions (see q8_0_act): `-127.0 / m` would be reciprocal(m) * -127
    iscale = torch.where(nz, torch.full_like(m, -127.0) / torch.where(nz, m, torch.ones_like(m)),
                         torch.zeros_like(m))
    q = torch.round(iscale * b).clamp_(-128, 127)
    d = torch.where(nz, torch.ones_like(iscale) / torch.where(nz, iscale, torch.ones_like(iscale)),
                    torch.zeros_like(iscale))
    return (q * d).reshape(shp)


# ---- low-precision grids ---------------------------------------------------------------------
def _pow2_ceil(y: torch.Tensor) -> torch.Tensor:
    """2**ceil(log2(y)) for y > 0, computed exactly from the binary exponent."""
    m, e = torch.frexp(y)                      # y = m * 2**e, 0.5 <= m < 1
    e = torch.where(m == 0.5, e - 1, e)        # exact powers of two stay put
    return torch.ldexp(torch.ones_like(y), e)


def _round_to_grid(v: torch.Tensor, min_exp: int, mant_bits: int) -> torch.Tensor:
    """Round to a float grid with `mant_bits` mantissa bits and subnormal quantum 2**min_exp,
    ties to even (the even integer multiple of the quantum has the even mantissa)."""
    _, e = torch.frexp(v)                      # |v| in [2**(e-1), 2**e)
    qexp = torch.clamp(e - 1 - mant_bits, min=min_exp)
    return torch.ldexp(torch.round(torch.ldexp(v, -qexp)), qexp)


@fused
def fp8_e4m3_blocks(x: torch.Tensor) -> torch.Tensor:
    """E4M3FN round trip over 64-element blocks of the last dim, power-of-two scale per block
    (amax floor 1e-4, scale 2**ceil(log2(amax/448)))."""
    shp = x.shape
    b = x.reshape(*shp[:-1], shp[-1] // 64, 64)
    amax = b.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    scale = _pow2_ceil(amax / 448.0)
    v = (b / scale).clamp(-448.0, 448.0)
    return (_round_to_grid(v, -9, 3) * scale).reshape(shp)


@fused
def fp4_e2m1_blocks(x: torch.Tensor) -> torch.Tensor:
    """E2M1 round trip over 32-element blocks, grid {0,.5,1,1.5,2,3,4,6}, power-of-two scale
    2**ceil(log2(amax/6)) with amax floor 7.052966104933725e-38."""
    shp = x.shape
    b = x.reshape(*shp[:-1], shp[-1] // 32, 32)
    amax = b.abs().amax(-1, keepdim=True).clamp_min(7.052966104933725e-38)
    scale = _pow2_ceil(amax / 6.0)
    v = (b / scale).clamp(-6.0, 6.0)
    return (_round_to_grid(v, -1, 1) * scale).reshape(shp)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh-Hadamard transform of the last dim (Sylvester order), float32 butterfly
    with strides 1, 2, 4, ... then one multiply by 1/sqrt(n)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    y = x
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(*lead, n) * torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32)


@fused
def hadamard_fp4(x: torch.Tensor) -> torch.Tensor:
    """The indexer's quantisation-aware step: Hadamard, then FP4 per 32-element block."""
    return fp4_e2m1_blocks(hadamard(x))


def f16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


# ---- norms and activations -------------------------------------------------------------------
def rms_scale_torch(x: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """1/sqrt(mean(x^2) + eps) over the last dim, sum of squares in float64 (keepdim)."""
    ms = (x.double().square().sum(-1, keepdim=True) / x.shape[-1]).float()
    return 1.0 / torch.sqrt(ms + eps)


def rms_scale(x: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """The dispatch point: several rows on CUDA outside compilation (an eager prefill) take one
    Triton launch (ds4tp.kernels.triton_norm); decode, compiled, runs the twin inside its graph."""
    if kernels.eager_rows(x):
        from ds4tp.kernels import triton_norm
        return triton_norm.rms_scale(x, eps)
    return rms_scale_torch(x, eps)


@fused
def rms_norm(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """x * rms_scale(x) (times w). The dispatch point: several rows on CUDA outside compilation
    (an eager prefill) take one Triton launch (triton_norm.rms_norm, the same products); decode,
    compiled, runs the twin below inside its graph."""
    if kernels.eager_rows(x):
        from ds4tp.kernels import triton_norm
        return triton_norm.rms_norm(x, w, RMS_EPS)
    y = x * rms_scale(x)
    return y * w if w is not None else y


@fused
def softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 20, x, torch.where(x < -20, torch.exp(x), torch.log1p(torch.exp(x))))


@fused
def swiglu_clamped(g: torch.Tensor, u: torch.Tensor, clamp: float) -> torch.Tensor:
    """silu(min(g, c)) * clamp(u, -c, c): the gate is clamped from above only."""
    g = g.clamp(max=clamp)
    u = u.clamp(-clamp, clamp)
    return g * torch.sigmoid(g) * u


# ---- RoPE (GPT-J adjacent pairs on the last n_rot dims, YaRN on compressed layers) -------------
# float32 constants base**(-2/64), rounded as the reference's powf rounds them (spec 9.2).
THETA_SCALE = {10000.0: float.fromhex("0x1.7ff222p-1"), 160000.0: float.fromhex("0x1.601474p-1")}


@functools.lru_cache(maxsize=8)
def _rope_params(n_rot: int, compressed: bool):
    from ds4tp.config import COMPRESS_ROPE_FREQ_BASE, ROPE_FREQ_BASE, ROPE_SCALE_FACTOR, Shape, yarn_corr_dims
    base = COMPRESS_ROPE_FREQ_BASE if compressed else ROPE_FREQ_BASE
    ts = THETA_SCALE.get(base)
    if ts is None or n_rot != 64:
        ts = float(torch.tensor(base ** (-2.0 / n_rot), dtype=torch.float32))
    if compressed:
        lo, hi = yarn_corr_dims(Shape(n_rot=n_rot))
        return ts, 1.0 / ROPE_SCALE_FACTOR, lo, hi
    return ts, 1.0, None, None


_ROPE_TABLE_MAX = 1 << 16


def rope_cos_sin(pos: torch.Tensor, n_rot: int, compressed: bool,
                 top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [len(pos), n_rot/2] float32 for these positions (tabulated up to 65536). top:
    pos.max() + 1 where the caller knows it (reading it from a GPU tensor waits for the GPU)."""
    if top is None:
        top = int(pos.max()) + 1 if pos.numel() else 1
    if top > _ROPE_TABLE_MAX:
        return _rope_compute(pos, n_rot, compressed)
    size = max(1024, 1 << (top - 1).bit_length())
    cos, sin = _rope_table(n_rot, compressed, size, str(pos.device))
    return cos[pos], sin[pos]


@functools.lru_cache(maxsize=16)
def _rope_table(n_rot: int, compressed: bool, size: int, device: str):
    return _rope_compute(torch.arange(size, device=device), n_rot, compressed)


def _rope_compute(pos: torch.Tensor, n_rot: int, compressed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's float32 angle recurrence: te starts at pos and is multiplied by the
    rounded theta_scale once per pair; YaRN blends the interpolated angle on the ramp."""
    ts, fscale, lo, hi = _rope_params(n_rot, compressed)
    f32 = torch.float32
    te = pos.to(f32)
    ts_t = torch.tensor(ts, dtype=f32, device=pos.device)
    cols = []
    for p in range(n_rot // 2):
        ti = te * torch.tensor(fscale, dtype=f32, device=pos.device)
        if lo is not None:
            ramp = 1.0 - min(max((p - lo) / max(0.001, hi - lo), 0.0), 1.0)
            theta = ti * torch.tensor(1.0 - ramp, dtype=f32) + te * torch.tensor(ramp, dtype=f32)
        else:
            theta = ti
        cols.append(theta)
        te = te * ts_t
    theta = torch.stack(cols, -1).double()
    return torch.cos(theta).float(), torch.sin(theta).float()


@fused
def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate adjacent pairs of the last n_rot dims of x [..., T, (H,) D].

    cos/sin are [T, n_rot/2]; they broadcast over the head dim when x has one (pass them already
    unsqueezed for that case).
    """
    n_rot = cos.shape[-1] * 2
    d = x.shape[-1]
    nope, tail = x[..., : d - n_rot], x[..., d - n_rot:]
    t = tail.reshape(*tail.shape[:-1], n_rot // 2, 2)
    x0, x1 = t[..., 0], t[..., 1]
    s = -sin if inverse else sin
    r0 = x0 * cos - x1 * s
    r1 = x0 * s + x1 * cos
    rot = torch.stack((r0, r1), -1).reshape(tail.shape)
    return torch.cat((nope, rot), -1)
