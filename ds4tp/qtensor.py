"""A weight matrix kept in its GGUF encoding.

`raw` holds the encoded bytes with one row per output row: shape `[*shape[:-1], row_bytes]`,
uint8, where `shape` is the logical torch shape with the input (contiguous, GGUF ne0) dimension
last: `(out, in)` for a 2-D weight, `(experts, out, in)` for routed experts. A shard of a matrix
is again a QTensor (fewer rows, fewer experts, or a block-aligned range of input columns).

The dequantized float32 copy is built on first use and cached (`f32()`): this is what the plain
torch paths multiply with; fused GPU kernels read `raw` directly, or a re-laid-out copy of it
that a kernel builds once and keeps in `kernel_cache` (e.g. Q8_0 split into aligned int8 quants
and f16 scales, ds4tp.kernels.triton_matvec.q8_0_split).

`layout` says how `raw` orders each row's bytes: GGUF's, or (IQ2_XXS rows of 16 super-blocks)
IQ2_DECODE, the same bytes per row re-ordered in place at load for the decode kernel
(ds4tp.kernels.prepare_weights; the order: iq2_decode_rows). `gguf_raw()` gives GGUF's order
to every reader that wants it (the twins, the Triton kernels), as a copy where it differs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ds4tp.config import BLOCK, IQ2_XXS, type_name

GGUF = "gguf"
IQ2_DECODE = "iq2_decode"
_IQ2_ROW = 16 * 66          # an IQ2_XXS row of 16 super-blocks (4096 inputs)


def _iq2_decode_perm() -> list[int]:
    """The IQ2_DECODE order of an IQ2_XXS row of 16 super-blocks (66 bytes each: an f16 scale,
    then 8 sub-blocks of 8 bytes): byte i of a re-ordered row is byte perm[i] of GGUF's. First
    the 16 scales, super-blocks j, j+4, j+8, j+12 as 8 contiguous bytes (at 8j), then the 128
    sub-blocks in two halves of 512 bytes: sub-blocks l and l+32 as 16 contiguous bytes at 32 +
    16l, l+64 and l+96 at 544 + 16l. The decode kernel's lane l then reads its four sub-blocks
    by two 16-byte loads, each a warp's 512 contiguous bytes (every 32-byte sector whole), and
    lane group l/8 its four scales by one (kernels/experts.cu, A_DL). (The first decode order,
    until the thirtieth session, held lane l's four sub-blocks as 32 contiguous bytes at 32 +
    32l: a warp's 16-byte load spanned 1 KB and used half of each sector; the kernel alone was
    4-5% slower on it, s32d.)"""
    perm = []
    for j in range(4):
        for i in range(4):
            sb = j + 4 * i
            perm += [66 * sb, 66 * sb + 1]
    for g in (lane + 32 * (2 * h + j) for h in range(2) for lane in range(32) for j in range(2)):
        sb, k = divmod(g, 8)
        perm += range(66 * sb + 2 + 8 * k, 66 * sb + 10 + 8 * k)
    return perm


_PERM = torch.tensor(_iq2_decode_perm())
_INV = torch.argsort(_PERM)


def iq2_decode_rows(raw: torch.Tensor) -> torch.Tensor:
    """IQ2_XXS rows of 16 super-blocks [..., 1056] in GGUF's order -> the same rows in the
    IQ2_DECODE order (_iq2_decode_perm), a new tensor."""
    _check_iq2_rows(raw)
    return raw.index_select(-1, _PERM.to(raw.device))


def iq2_gguf_rows(raw: torch.Tensor) -> torch.Tensor:
    """The inverse of iq2_decode_rows."""
    _check_iq2_rows(raw)
    return raw.index_select(-1, _INV.to(raw.device))


def _check_iq2_rows(raw: torch.Tensor) -> None:
    if raw.shape[-1] != _IQ2_ROW or raw.dtype != torch.uint8:
        raise ValueError(f"IQ2_XXS rows of 16 super-blocks ({_IQ2_ROW} bytes) expected, got "
                         f"{raw.dtype} {tuple(raw.shape)}")


@dataclass(eq=False)
class QTensor:
    qtype: int
    shape: tuple[int, ...]
    raw: torch.Tensor
    _f32: torch.Tensor | None = field(default=None, repr=False)
    kernel_cache: dict = field(default_factory=dict, repr=False)
    layout: str = GGUF

    def __post_init__(self):
        epb, bpb = BLOCK[self.qtype]
        n_in = self.shape[-1]
        if n_in % epb:
            raise ValueError(f"{type_name(self.qtype)} row of {n_in} is not a whole number of blocks")
        want = (*self.shape[:-1], n_in // epb * bpb)
        if tuple(self.raw.shape) != want or self.raw.dtype != torch.uint8:
            raise ValueError(f"QTensor raw bytes {tuple(self.raw.shape)} {self.raw.dtype}, "
                             f"expected {want} uint8 for {type_name(self.qtype)} {self.shape}")
        self._check_layout(self.layout)

    def _check_layout(self, layout: str) -> None:
        if layout not in (GGUF, IQ2_DECODE) or (
                layout == IQ2_DECODE and (self.qtype != IQ2_XXS or self.raw.shape[-1] != _IQ2_ROW)):
            raise ValueError(f"layout {layout!r} does not apply to {type_name(self.qtype)} {self.shape}")

    @property
    def row_bytes(self) -> int:
        return self.raw.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def gguf_raw(self) -> torch.Tensor:
        """raw in GGUF's byte order (itself, or a re-ordered copy)."""
        return self.raw if self.layout == GGUF else iq2_gguf_rows(self.raw)

    def set_layout(self, layout: str) -> None:
        """Re-order raw's rows in place into `layout` (GGUF or IQ2_DECODE; a no-op if already)."""
        self._check_layout(layout)
        if layout == self.layout:
            return
        self.raw.copy_(iq2_decode_rows(self.raw) if layout == IQ2_DECODE else self.gguf_raw())
        self.layout = layout
        self.kernel_cache.clear()

    def f32(self) -> torch.Tensor:
        """Exact float32 dequantization, cached."""
        if self._f32 is None:
            from ds4tp.dequant import dequantize
            self._f32 = dequantize(self.gguf_raw(), self.qtype, self.shape[-1])
        return self._f32

    def drop_cache(self) -> None:
        self._f32 = None
        self.kernel_cache.clear()

    def to(self, device) -> "QTensor":
        return QTensor(self.qtype, self.shape, self.raw.to(device), layout=self.layout)

    def row_slice(self, start: int, stop: int) -> "QTensor":
        """Rows [start, stop) of a 2-D weight, sharing the bytes (no copy)."""
        if len(self.shape) != 2 or not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"row slice [{start}, {stop}) of a {self.shape} weight")
        return QTensor(self.qtype, (stop - start, self.shape[1]), self.raw[start:stop], layout=self.layout)

    @staticmethod
    def cat_rows(*ws: "QTensor") -> "QTensor":
        """One 2-D weight holding the rows of several with the same type and input width (so
        one launch serves matrices that multiply the same activation)."""
        q, n_in = ws[0].qtype, ws[0].shape[-1]
        if any(w.qtype != q or len(w.shape) != 2 or w.shape[1] != n_in or w.layout != GGUF for w in ws):
            raise ValueError(f"cat_rows needs 2-D weights of one type and width, got "
                             f"{[(type_name(w.qtype), w.shape) for w in ws]}")
        return QTensor(q, (sum(w.shape[0] for w in ws), n_in), torch.cat([w.raw for w in ws]))
