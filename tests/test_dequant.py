"""ds4tp.dequant against gguf.quants.dequantize (gguf 0.19.0), bit for bit."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ds4tp import config as C
from ds4tp.dequant import dequantize

# Byte offsets of the fp16 scale fields inside one block, per type.
F16_FIELDS = {C.Q8_0: (0,), C.Q2_K: (80, 82), C.Q4_K: (0, 2), C.IQ2_XXS: (0,)}
ALL_TYPES = (C.F32, C.F16, C.Q8_0, C.Q2_K, C.Q4_K, C.IQ2_XXS, C.I32)


def random_rows(rng: np.random.Generator, qtype: int, lead: tuple[int, ...], n_in: int) -> np.ndarray:
    """Random valid encoded rows uint8 [*lead, row_bytes]: random bytes, with every fp16
    field set to a finite value of varied magnitude and sign (including subnormals)."""
    epb, bpb = C.BLOCK[qtype]
    nb = n_in // epb
    if qtype == C.F32:
        return (rng.standard_normal((*lead, n_in)) * 3).astype(np.float32).view(np.uint8)
    if qtype == C.F16:
        return (rng.standard_normal((*lead, n_in)) * 3).astype(np.float16).view(np.uint8)
    raw = rng.integers(0, 256, size=(*lead, nb, bpb), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, ()):
        mag = np.exp(rng.uniform(np.log(1e-7), np.log(10.0), size=(*lead, nb)))
        d = (mag * rng.choice([-1.0, 1.0], size=mag.shape)).astype(np.float16)
        raw[..., off:off + 2] = d[..., None].view(np.uint8)
    return raw.reshape(*lead, nb * bpb)


def reference(raw: np.ndarray, qtype: int) -> np.ndarray:
    if qtype == C.I32:   # gguf has no I32 dequantizer: the bytes are the values
        return raw.view("<i4")
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype))


def assert_bit_equal(got: torch.Tensor, want: np.ndarray) -> None:
    got = got.numpy()
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype == np.float32:
        assert np.isfinite(want).all()   # a NaN would compare equal bitwise yet prove little
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=C.type_name)
@pytest.mark.parametrize("lead, n_in", [((7,), 512), ((3, 5), 256), ((2, 3, 4), 768)])
def test_matches_gguf(qtype, lead, n_in):
    rng = np.random.default_rng([qtype, n_in, len(lead)])
    raw = random_rows(rng, qtype, lead, n_in)
    out = dequantize(torch.from_numpy(raw), qtype, n_in)
    assert out.dtype == (torch.int32 if qtype == C.I32 else torch.float32)
    assert_bit_equal(out, reference(raw, qtype))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=C.type_name)
def test_non_contiguous_view(qtype):
    """A strided view (every other row, a block-aligned range of columns) decodes like the
    same bytes copied out."""
    epb, bpb = C.BLOCK[qtype]
    rng = np.random.default_rng([7, qtype])
    n_in = 1024
    raw = torch.from_numpy(random_rows(rng, qtype, (4, 6), n_in))
    lo, hi = (n_in // 4) // epb * bpb, (3 * n_in // 4) // epb * bpb
    view = raw[:, ::2, lo:hi]
    assert not view.is_contiguous()
    want = reference(view.contiguous().numpy(), qtype)
    assert_bit_equal(dequantize(view, qtype, n_in // 2), want)


def test_slicing_of_large_inputs():
    """More rows than one internal slice: still exact, and rows stay in order."""
    rng = np.random.default_rng(3)
    n_in = 4096
    raw = random_rows(rng, C.IQ2_XXS, (2100,), n_in)   # > one slice of 4M elements
    assert_bit_equal(dequantize(torch.from_numpy(raw), C.IQ2_XXS, n_in), reference(raw, C.IQ2_XXS))


def test_bad_row_size_raises():
    raw = torch.zeros(4, 66 * 2 - 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="IQ2_XXS row of 512 elements takes 132 bytes"):
        dequantize(raw, C.IQ2_XXS, 512)
    with pytest.raises(ValueError, match="multiple"):
        dequantize(torch.zeros(4, 34, dtype=torch.uint8), C.Q8_0, 33)


def test_unsupported_type_raises():
    with pytest.raises(ValueError, match="type#11"):
        dequantize(torch.zeros(4, 110, dtype=torch.uint8), 11, 256)   # Q3_K
    with pytest.raises(ValueError, match="uint8"):
        dequantize(torch.zeros(4, 34, dtype=torch.int8), C.Q8_0, 32)


def test_empty():
    out = dequantize(torch.zeros(0, 3, 84, dtype=torch.uint8), C.Q2_K, 256)
    assert out.shape == (0, 3, 256) and out.dtype == torch.float32


# ---- the decode order of IQ2_XXS rows (qtensor.IQ2_DECODE) ----------------------------------
def test_iq2_decode_order_puts_each_lanes_bytes_together_and_back():
    """iq2_decode_rows: scales of super-blocks j, j+4, j+8, j+12 at 8j (f16 each); sub-blocks
    (8 bytes each) l, l+32 at 32 + 16l and l+64, l+96 at 544 + 16l (a warp's 16-byte loads
    each read 512 contiguous bytes); iq2_gguf_rows undoes it."""
    from ds4tp.qtensor import iq2_decode_rows, iq2_gguf_rows
    raw = torch.from_numpy(random_rows(np.random.default_rng(3), C.IQ2_XXS, (2, 3), 4096))
    dec = iq2_decode_rows(raw)
    b, r = raw.reshape(-1, 16, 66), dec.reshape(-1, 16 * 66)
    for row in range(b.shape[0]):
        for g in range(128):
            lane, i = g % 32, g // 32
            off = 32 + 512 * (i // 2) + 16 * lane + 8 * (i % 2)
            assert torch.equal(r[row, off:off + 8], b[row, g // 8, 2 + 8 * (g % 8):10 + 8 * (g % 8)])
        for sb in range(16):
            off = 8 * (sb % 4) + 2 * (sb // 4)
            assert torch.equal(r[row, off:off + 2], b[row, sb, :2])
    assert torch.equal(iq2_gguf_rows(dec), raw)


def test_a_weight_in_the_decode_order_dequantises_and_multiplies_as_before():
    """QTensor.set_layout re-orders raw in place; f32 (the twins), gguf_raw (the Triton kernels)
    and the torch twin of the routed experts are those of GGUF's order; back to GGUF's order
    gives the same bytes. The order applies only to IQ2_XXS rows of 16 super-blocks."""
    from ds4tp import ops
    from ds4tp.kernels import triton_matvec as tm
    from ds4tp.qtensor import GGUF, IQ2_DECODE, QTensor
    rng = np.random.default_rng(5)
    raw = torch.from_numpy(random_rows(rng, C.IQ2_XXS, (4, 8), 4096))
    ref = QTensor(C.IQ2_XXS, (4, 8, 4096), raw.clone())
    w = QTensor(C.IQ2_XXS, (4, 8, 4096), raw.clone())
    w.set_layout(IQ2_DECODE)
    assert w.layout == IQ2_DECODE and not torch.equal(w.raw, raw)
    assert torch.equal(w.gguf_raw(), raw) and torch.equal(tm._raw(w), raw)
    assert torch.equal(w.f32(), ref.f32())
    x = torch.randn(2, 4096)
    ids = torch.tensor([[0, 3], [2, -1]])
    rw = torch.rand(2, 2)
    assert torch.equal(ops.expert_swiglu_torch(w, w, x, ids, rw), ops.expert_swiglu_torch(ref, ref, x, ids, rw))
    w.set_layout(GGUF)
    assert torch.equal(w.raw, raw)
    with pytest.raises(ValueError, match="layout"):
        QTensor(C.IQ2_XXS, (8, 2048), torch.zeros(8, 8 * 66, dtype=torch.uint8)).set_layout(IQ2_DECODE)
    with pytest.raises(ValueError, match="layout"):
        QTensor(C.Q8_0, (8, 4096), torch.zeros(8, 128 * 34, dtype=torch.uint8), layout=IQ2_DECODE)


def test_prepare_weights_leaves_cpu_weights_in_gguf_order():
    """kernels.prepare_weights re-orders only weights on CUDA with its kernels there."""
    from types import SimpleNamespace
    from ds4tp import kernels
    from ds4tp.qtensor import GGUF, QTensor
    raw = torch.from_numpy(random_rows(np.random.default_rng(6), C.IQ2_XXS, (2, 4), 4096))
    lw = SimpleNamespace(gate_exps=QTensor(C.IQ2_XXS, (2, 4, 4096), raw.clone()),
                         up_exps=QTensor(C.IQ2_XXS, (2, 4, 4096), raw.clone()))
    assert kernels.prepare_weights(SimpleNamespace(layers=[lw])) == 0
    assert lw.gate_exps.layout == GGUF and torch.equal(lw.gate_exps.raw, raw)
