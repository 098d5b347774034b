"""Malformed or mismatched GGUFs fail with an error naming the key or tensor and the expectation.

The bad files are made by patching a freshly generated tiny synthetic model's header in place
(a key renamed, a tensor's type or a dim changed) or by cutting the file short.
"""
from __future__ import annotations

import struct

import pytest

from ds4tp import config as C
from ds4tp.gguf_file import GGUFError, open_ds4
from ds4tp.synth import write_synthetic


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_synthetic(p, C.TINY, seed=3)
    return p


def _patched(tmp_path, src, fn):
    data = bytearray(src.read_bytes())
    fn(data)
    out = tmp_path / "bad.gguf"
    out.write_bytes(bytes(data))
    return out


def _tensor_info_offset(data: bytes, name: str) -> int:
    """Byte offset just after a tensor's name in the tensor directory."""
    key = struct.pack("<Q", len(name)) + name.encode()
    i = data.find(key)
    assert i > 0
    return i + len(key)


def test_valid_file_loads(tiny):
    f = open_ds4(tiny)
    assert f.shape == C.TINY


def test_truncated_file(tmp_path, tiny):
    data = tiny.read_bytes()
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFError, match=r"output\.weight.*(truncated|past the end)"):
        open_ds4(bad)


def test_truncated_header(tmp_path, tiny):
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(tiny.read_bytes()[:5000])
    with pytest.raises(GGUFError, match="truncated|corrupt|cannot parse"):
        open_ds4(bad)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"hello world, not a model")
    with pytest.raises(GGUFError, match="not a GGUF"):
        open_ds4(bad)


def test_wrong_tensor_type(tmp_path, tiny):
    name = "blk.1.attn_q_b.weight"

    def patch(d):
        at = _tensor_info_offset(d, name)
        n_dims = struct.unpack_from("<I", d, at)[0]
        struct.pack_into("<I", d, at + 4 + 8 * n_dims, C.F16)   # type Q8_0 -> F16
    bad = _patched(tmp_path, tiny, patch)
    with pytest.raises(GGUFError, match=r"blk\.1\.attn_q_b\.weight: expected type Q8_0, found F16"):
        open_ds4(bad)


def test_wrong_tensor_dims(tmp_path, tiny):
    name = "blk.2.attn_kv.weight"

    def patch(d):
        at = _tensor_info_offset(d, name)
        struct.pack_into("<Q", d, at + 4 + 8, 128)                # ne1 256 -> 128
    bad = _patched(tmp_path, tiny, patch)
    with pytest.raises(GGUFError, match=r"blk\.2\.attn_kv\.weight: expected dims \[256, 256\], found \[256, 128\]"):
        open_ds4(bad)


def test_missing_key(tmp_path, tiny):
    def patch(d):
        i = d.find(b"deepseek4.attention.sliding_window")
        d[i: i + 9] = b"deepseeX4"
    bad = _patched(tmp_path, tiny, patch)
    with pytest.raises(GGUFError, match=r"deepseek4\.attention\.sliding_window is missing"):
        open_ds4(bad)


def test_wrong_key_value(tmp_path, tiny):
    def patch(d):
        key = b"deepseek4.expert_weights_scale"
        i = d.find(struct.pack("<Q", len(key)) + key) + 8 + len(key)
        assert struct.unpack_from("<I", d, i)[0] == 6            # FLOAT32
        struct.pack_into("<f", d, i + 4, 2.5)
    bad = _patched(tmp_path, tiny, patch)
    with pytest.raises(GGUFError, match=r"expert_weights_scale: expected 1\.5, found 2\.5"):
        open_ds4(bad)


def test_missing_tensor(tmp_path, tiny):
    def patch(d):
        i = d.find(b"blk.0.ffn_norm.weight")
        d[i: i + 5] = b"blk.9"
    bad = _patched(tmp_path, tiny, patch)
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_norm\.weight is missing"):
        open_ds4(bad)
