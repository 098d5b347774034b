"""A weight matrix kept in its GGUF encoding.

`raw` holds the encoded bytes with one row per output row: shape `[*shape[:-1], row_bytes]`,
uint8, where `shape` is the logical torch shape with the input (contiguous, GGUF ne0) dimension
last: `(out, in)` for a 2-D weight, `(experts, out, in)` for routed experts. A shard of a matrix
is again a QTensor (fewer rows, fewer experts, or a block-aligned range of input columns).

The dequantized float32 copy is built on first use and cached (`f32()`): this is what the plain
torch paths multiply with; fused GPU kernels read `raw` directly, or a re-laid-out copy of it
that a kernel builds once and keeps in `kernel_cache` (e.g. Q8_0 split into aligned int8 quants
and f16 scales, ds4tp.kernels.triton_matvec.q8_0_split).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ds4tp.config import BLOCK, type_name


@dataclass(eq=False)
class QTensor:
    qtype: int
    shape: tuple[int, ...]
    raw: torch.Tensor
    _f32: torch.Tensor | None = field(default=None, repr=False)
    kernel_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        epb, bpb = BLOCK[self.qtype]
        n_in = self.shape[-1]
        if n_in % epb:
            raise ValueError(f"{type_name(self.qtype)} row of {n_in} is not a whole number of blocks")
        want = (*self.shape[:-1], n_in // epb * bpb)
        if tuple(self.raw.shape) != want or self.raw.dtype != torch.uint8:
            raise ValueError(f"QTensor raw bytes {tuple(self.raw.shape)} {self.raw.dtype}, "
                             f"expected {want} uint8 for {type_name(self.qtype)} {self.shape}")

    @property
    def row_bytes(self) -> int:
        return self.raw.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def f32(self) -> torch.Tensor:
        """Exact float32 dequantization, cached."""
        if self._f32 is None:
            from ds4tp.dequant import dequantize
            self._f32 = dequantize(self.raw, self.qtype, self.shape[-1])
        return self._f32

    def drop_cache(self) -> None:
        self._f32 = None
        self.kernel_cache.clear()

    def to(self, device) -> "QTensor":
        return QTensor(self.qtype, self.shape, self.raw.to(device))

    def row_slice(self, start: int, stop: int) -> "QTensor":
        """Rows [start, stop) of a 2-D weight, sharing the bytes (no copy)."""
        if len(self.shape) != 2 or not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"row slice [{start}, {stop}) of a {self.shape} weight")
        return QTensor(self.qtype, (stop - start, self.shape[1]), self.raw[start:stop])

    @staticmethod
    def cat_rows(*ws: "QTensor") -> "QTensor":
        """One 2-D weight holding the rows of several with the same type and input width (so
        one launch serves matrices that multiply the same activation)."""
        q, n_in = ws[0].qtype, ws[0].shape[-1]
        if any(w.qtype != q or len(w.shape) != 2 or w.shape[1] != n_in for w in ws):
            raise ValueError(f"cat_rows needs 2-D weights of one type and width, got "
                             f"{[(type_name(w.qtype), w.shape) for w in ws]}")
        return QTensor(q, (sum(w.shape[0] for w in ws), n_in), torch.cat([w.raw for w in ws]))
