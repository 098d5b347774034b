"""Exact dequantization of GGUF-encoded weight rows, in plain torch.

`dequantize(raw, qtype, n_in)` turns encoded rows (uint8 `[..., row_bytes]`) into float32
`[..., n_in]` (int32 for I32) on the device `raw` lives on. The arithmetic repeats
`gguf.quants.dequantize` (gguf 0.19.0) operation by operation, in float32 and in the same
order, so the results are bit-identical to it. Block layouts: spec section 5.1.

Everything is vectorized over blocks; large inputs are processed in slices of whole rows so
the float32 temporaries stay a small multiple of one slice.
"""
from __future__ import annotations

import functools

import torch

from ds4tp.config import BLOCK, F16, F32, I32, IQ2_XXS, Q2_K, Q4_K, Q8_0, type_name

# Rows per slice are chosen so that a slice holds about this many output elements.
_SLICE_ELEMENTS = 1 << 22


def dequantize(raw: torch.Tensor, qtype: int, n_in: int) -> torch.Tensor:
    """Dequantize `raw` (uint8 `[..., row_bytes]`, one encoded row per output row).

    Returns float32 `[..., n_in]`, or int32 for I32. For F32 and I32 the result may share
    memory with `raw`.
    """
    if qtype not in BLOCK:
        raise ValueError(f"cannot dequantize GGML type {type_name(qtype)}: supported are "
                         + ", ".join(type_name(t) for t in BLOCK))
    if raw.dtype != torch.uint8 or raw.dim() < 1:
        raise ValueError(f"encoded rows must be a uint8 tensor [..., row_bytes], "
                         f"got {raw.dtype} {tuple(raw.shape)}")
    epb, bpb = BLOCK[qtype]
    if n_in <= 0 or n_in % epb:
        raise ValueError(f"{type_name(qtype)} rows hold whole blocks of {epb} elements; "
                         f"n_in={n_in} is not a positive multiple")
    nb = n_in // epb
    if raw.shape[-1] != nb * bpb:
        raise ValueError(f"{type_name(qtype)} row of {n_in} elements takes {nb * bpb} bytes, "
                         f"but the encoded rows are {raw.shape[-1]} bytes")
    lead = tuple(raw.shape[:-1])

    if qtype in (F32, F16, I32):
        dt = {F32: torch.float32, F16: torch.float16, I32: torch.int32}[qtype]
        out = _reinterpret(raw, dt)
        return out.float() if qtype == F16 else out

    if raw.numel() == 0:
        return torch.empty(*lead, n_in, dtype=torch.float32, device=raw.device)
    rows = raw.reshape(-1, nb, bpb)
    decode = {Q8_0: _q8_0, Q2_K: _q2_k, Q4_K: _q4_k, IQ2_XXS: _iq2_xxs}[qtype]
    out = torch.empty(rows.shape[0], n_in, dtype=torch.float32, device=raw.device)
    step = max(1, _SLICE_ELEMENTS // n_in)
    for r0 in range(0, rows.shape[0], step):
        blk = rows[r0:r0 + step]
        out[r0:r0 + step] = decode(blk).reshape(blk.shape[0], n_in)
    return out.reshape(*lead, n_in)


# ---- helpers ----------------------------------------------------------------------------------
def _reinterpret(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """View the bytes of the last axis of uint8 `b` as `dtype` (little-endian, as GGUF)."""
    size = torch.empty((), dtype=dtype).element_size()
    if not b.is_contiguous() or b.storage_offset() % size:
        b = b.clone(memory_format=torch.contiguous_format)
    return b.view(dtype)


def _f16_field(blk: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte `at` of each block of `blk` [R, nb, bpb], as float32 [R, nb, 1]."""
    return _reinterpret(blk[..., at:at + 2], torch.float16).float()


# ---- per-type decoders: blk is uint8 [R, nb, bytes_per_block], result float32 [R, nb, epb] --
def _q8_0(blk: torch.Tensor) -> torch.Tensor:
    d = _f16_field(blk, 0)
    q = _reinterpret(blk[..., 2:], torch.int8).float()
    return q * d


def _q2_k(blk: torch.Tensor) -> torch.Tensor:
    # scales[16] | qs[64] | d | dmin. Element 128n + 32j + l is bits 2j of qs[32n + l], in
    # sub-block 8n + 2j + l//16, so (n, j, l) order is (sub-block, element) order.
    R, nb, _ = blk.shape
    scales = blk[..., :16]
    d = _f16_field(blk, 80)
    dmin = _f16_field(blk, 82)
    dl = (d * (scales & 0xF).float()).unsqueeze(-1)             # [R, nb, 16, 1]
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)
    shifts = _shifts(blk.device, (0, 2, 4, 6)).view(1, 1, 1, 4, 1)
    qs = blk[..., 16:80].reshape(R, nb, 2, 1, 32)
    q = ((qs >> shifts) & 3).reshape(R, nb, 16, 16).float()
    return (dl * q - ml).reshape(R, nb, 256)


def _q4_k(blk: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales[12] | qs[128]. Six-bit scale/min pairs, packed as in spec 5.1.
    R, nb, _ = blk.shape
    d = _f16_field(blk, 0)
    dmin = _f16_field(blk, 2)
    s = blk[..., 4:16]
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=-1)   # [R, nb, 8]
    mn = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    dl = (d * sc.float()).unsqueeze(-1)                          # [R, nb, 8, 1]
    ml = (dmin * mn.float()).unsqueeze(-1)
    shifts = _shifts(blk.device, (0, 4)).view(1, 1, 1, 2, 1)
    qs = blk[..., 16:144].reshape(R, nb, 4, 1, 32)
    q = ((qs >> shifts) & 0xF).reshape(R, nb, 8, 32).float()
    return (dl * q - ml).reshape(R, nb, 256)


def _iq2_xxs(blk: torch.Tensor) -> torch.Tensor:
    # d | 8 sub-blocks of (4 grid-index bytes, u32 t): t holds four 7-bit sign indices and a
    # 4-bit scale in its top bits. Group k of sub-block b covers elements 32b + 8k .. +7.
    R, nb, _ = blk.shape
    grid, signs = _iq2_xxs_tables(blk.device)
    d = _f16_field(blk, 0).unsqueeze(-1)                         # [R, nb, 1, 1]
    sub = blk[..., 2:].reshape(R, nb, 8, 8)
    t = _reinterpret(sub[..., 4:8], torch.int32)                 # [R, nb, 8, 1]
    # int32 shifts are arithmetic; the masks drop the sign-extended bits.
    scale = ((t >> 28) & 0xF).float()
    db = d * (0.5 + scale) * 0.25                                # [R, nb, 8, 1]
    sign_idx = (t >> _shifts(blk.device, (0, 7, 14, 21), torch.int32)) & 0x7F   # [R, nb, 8, 4]
    grid_idx = sub[..., 0:4].int()                               # [R, nb, 8, 4]
    w = db.unsqueeze(-1) * grid[grid_idx] * signs[sign_idx]      # [R, nb, 8, 4, 8]
    return w.reshape(R, nb, 256)


# ---- lookup tables, built once per device ------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _shifts(device: torch.device, values: tuple[int, ...], dtype=torch.uint8) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _iq2_xxs_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid float32 [256, 8], signs float32 [128, 8] of +-1), from gguf's own tables."""
    import numpy as np
    from gguf.quants import IQ2_XXS as GGUF_IQ2_XXS

    GGUF_IQ2_XXS.init_grid()
    grid = np.asarray(GGUF_IQ2_XXS.grid, dtype=np.float32).reshape(256, 8)
    ksigns = np.frombuffer(GGUF_IQ2_XXS.ksigns, dtype=np.uint8)
    bits = (ksigns[:, None] >> np.arange(8, dtype=np.uint8)[None, :]) & 1
    signs = np.where(bits == 0, np.float32(1), np.float32(-1)).astype(np.float32)
    return (torch.from_numpy(grid.copy()).to(device), torch.from_numpy(signs).to(device))
