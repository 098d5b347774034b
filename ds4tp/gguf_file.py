"""Open a DS4 GGUF, check it against the DS4 layout, and hand out memory-mapped byte ranges.

The shape is read from the `deepseek4.*` metadata, then every metadata key and every tensor's
type and dims are checked against what that shape implies (`ds4tp.config`). Any mismatch is a
`GGUFError` naming the key or tensor, what was found and what was expected. Nothing is read from
the tensor data here: callers take slices of `data` (a read-only memmap of the whole file), so a
rank touches only its own bytes.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from ds4tp import config as C
from ds4tp.config import Shape, expected_tensors, type_name


class GGUFError(ValueError):
    """A GGUF that is not a valid DS4 model file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: int
    dims: tuple[int, ...]      # GGUF order: ne0 (contiguous) first
    offset: int                # absolute byte offset in the file
    nbytes: int

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))


@dataclass
class DS4File:
    path: str
    shape: Shape
    tensors: dict[str, TensorInfo]
    metadata: dict
    data: np.memmap            # the whole file, read-only

    def tensor_bytes(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return self.data[t.offset: t.offset + t.nbytes]

    @property
    def total_tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# GGUF value types (GGUF v3): id -> (name, struct format or None)
_VT = {0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
       4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"),
       8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<Q"), 11: ("INT64", "<q"),
       12: ("FLOAT64", "<d")}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<?", 10: "<u8",
       11: "<i8", 12: "<f8"}


class _Cursor:
    def __init__(self, fh, path, size):
        self.fh, self.pos, self.path, self.size = fh, 0, path, size

    def take(self, n: int) -> bytes:
        b = self.fh.read(n)
        if len(b) < n:
            raise GGUFError(f"{self.path}: the header ends early at byte {self.size} "
                            f"(truncated or corrupt)")
        self.pos += n
        return b

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > 1 << 30:
            raise GGUFError(f"{self.path}: implausible string length {n} at byte {self.pos - 8}")
        return self.take(n).decode("utf-8", "surrogateescape")

    def value(self, vt: int, key: str, keep_arrays: bool):
        if vt not in _VT:
            raise GGUFError(f"{self.path}: metadata key {key} has unknown value type {vt}")
        name, fmt = _VT[vt]
        if fmt:
            return [name], self.unpack(fmt)
        if vt == 8:
            return [name], self.string()
        et, n = self.unpack("<I"), self.unpack("<Q")
        if et not in _VT or et == 9:
            raise GGUFError(f"{self.path}: metadata key {key} is an array of unsupported type {et}")
        ename = _VT[et][0]
        if et == 8:
            vals = [self.string() for _ in range(n)]
        else:
            raw = self.take(n * np.dtype(_NP[et]).itemsize)
            vals = np.frombuffer(raw, dtype=_NP[et]).tolist() if (keep_arrays or n <= 4096) else None
        return [name, ename], vals


def read_header(path: str, *, keep_arrays: bool = False):
    """Parse a GGUF v3 header: (metadata {key: (type names, value)}, [TensorInfo], file size).

    Our own reader: it does not map tensor data, so a truncated file is reported by the
    tensor checks (naming the tensor), and big numeric arrays are skipped unless asked for."""
    size = os.path.getsize(path)
    with open(path, "rb", buffering=1 << 20) as fh:
        c = _Cursor(fh, path, size)
        if c.fh.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (bad magic)")
        c.pos = 4
        version = c.unpack("<I")
        if version != 3:
            raise GGUFError(f"{path}: GGUF version {version}, expected 3")
        n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise GGUFError(f"{path}: implausible header ({n_tensors} tensors, {n_kv} keys): corrupt")
        md = {}
        for _ in range(n_kv):
            key = c.string()
            md[key] = c.value(c.unpack("<I"), key, keep_arrays)
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            nd = c.unpack("<I")
            if nd > 4:
                raise GGUFError(f"{path}: tensor {name} has {nd} dims (corrupt header)")
            dims = tuple(c.unpack("<Q") for _ in range(nd))
            qtype, off = c.unpack("<I"), c.unpack("<Q")
            infos.append((name, dims, qtype, off))
        align = int(md.get("general.alignment", (None, 32))[1])
        data_start = (c.pos + align - 1) // align * align
    tensors = []
    for name, dims, qtype, off in infos:
        n = int(np.prod(dims)) if dims else 0
        if qtype in C.BLOCK:
            epb, bpb = C.BLOCK[qtype]
            nbytes = n // epb * bpb
        else:
            nbytes = 0
        tensors.append(TensorInfo(name, qtype, dims, data_start + off, nbytes))
    return md, tensors, size


def shape_from_metadata(md: dict) -> Shape:
    """Build the Shape from the deepseek4.* keys, checking each key's type and value."""
    def get(key):
        full = f"{C.ARCH}.{key}"
        if full not in md:
            raise GGUFError(f"metadata key {full} is missing")
        return full, md[full]

    def get_u32(key):
        full, (types, v) = get(key)
        if types != ["UINT32"]:
            raise GGUFError(f"metadata key {full}: expected a UINT32, found {'/'.join(types)}")
        return int(v)

    arch = md.get("general.architecture", ([], None))[1]
    if arch != C.ARCH:
        raise GGUFError(f"metadata key general.architecture: expected '{C.ARCH}', found {arch!r}")

    vals: dict[str, int] = {}
    for key, fieldname in C.SHAPE_KEYS.items():
        v = get_u32(key)
        if fieldname in vals and vals[fieldname] != v:
            raise GGUFError(f"metadata key {C.ARCH}.{key} = {v} disagrees with another key "
                            f"giving {fieldname} = {vals[fieldname]}")
        vals[fieldname] = v
    shape = Shape(**vals)
    try:
        shape.validate()
    except ValueError as e:
        raise GGUFError(str(e)) from e

    for key, want in C.FIXED_U32.items():
        v = get_u32(key)
        if v != want:
            raise GGUFError(f"metadata key {C.ARCH}.{key}: expected {want}, found {v}")
    for key in C.OPTIONAL_U32_ZERO:
        if f"{C.ARCH}.{key}" in md:
            v = get_u32(key)
            if v != 0:
                raise GGUFError(f"metadata key {C.ARCH}.{key}: expected 0 (no group-limited "
                                f"routing), found {v}")
    for key, want in C.FIXED_F32.items():
        full, (types, v) = get(key)
        if types[0] not in ("FLOAT32", "FLOAT64", "UINT32", "INT32"):
            raise GGUFError(f"metadata key {full}: expected a float, found {'/'.join(types)}")
        if not C.float_matches(float(v), want):
            raise GGUFError(f"metadata key {full}: expected {want}, found {v}")
    for key, want in C.FIXED_INT_ANY.items():
        full, (types, v) = get(key)
        if types[0] not in ("UINT32", "UINT64") or int(v) != want:
            raise GGUFError(f"metadata key {full}: expected integer {want}, found "
                            f"{'/'.join(types)} {v}")
    full, (types, v) = get("expert_weights_norm")
    if types != ["BOOL"] or v is not True:
        raise GGUFError(f"metadata key {full}: expected BOOL true, found {'/'.join(types)} {v}")

    full, (types, v) = get("attention.compress_ratios")
    if types[:1] != ["ARRAY"] or types[-1] not in ("UINT32", "INT32"):
        raise GGUFError(f"metadata key {full}: expected an array of u32/i32, found {'/'.join(types)}")
    if len(v) < shape.n_layer:
        raise GGUFError(f"metadata key {full}: {len(v)} entries for {shape.n_layer} layers")
    for il in range(shape.n_layer):
        if int(v[il]) != shape.ratio(il):
            raise GGUFError(f"metadata key {full}[{il}]: expected ratio {shape.ratio(il)}, found {v[il]}")
    full, (types, v) = get("swiglu_clamp_exp")
    if types[:1] != ["ARRAY"] or types[-1] not in ("FLOAT32", "FLOAT64"):
        raise GGUFError(f"metadata key {full}: expected an array of floats, found {'/'.join(types)}")
    if len(v) < shape.n_layer or any(not C.float_matches(float(x), C.SWIGLU_CLAMP) for x in v[: shape.n_layer]):
        raise GGUFError(f"metadata key {full}: expected {shape.n_layer} entries all {C.SWIGLU_CLAMP}, found {v}")
    return shape


def check_tensors(shape: Shape, found: dict[str, TensorInfo], file_size: int) -> None:
    want = expected_tensors(shape, with_hash_bias=True)
    for name, spec in want.items():
        t = found.get(name)
        if t is None:
            if spec.optional:
                continue
            raise GGUFError(f"tensor {name} is missing (expected {'/'.join(type_name(x) for x in spec.types)} "
                            f"{list(spec.dims)})")
        if t.qtype not in spec.types:
            raise GGUFError(f"tensor {name}: expected type {'/'.join(type_name(x) for x in spec.types)}, "
                            f"found {type_name(t.qtype)}")
        if t.dims != spec.dims:
            raise GGUFError(f"tensor {name}: expected dims {list(spec.dims)}, found {list(t.dims)}")
        epb, bpb = C.BLOCK[t.qtype]
        n = int(np.prod(t.dims))
        if n // epb * bpb != t.nbytes:
            raise GGUFError(f"tensor {name}: {t.nbytes} bytes, expected {n // epb * bpb}")
        if t.offset + t.nbytes > file_size:
            raise GGUFError(f"tensor {name}: data at bytes {t.offset}..{t.offset + t.nbytes} runs past "
                            f"the end of the file ({file_size} bytes): the file is truncated")
    extra = sorted(set(found) - set(want))
    if extra:
        raise GGUFError(f"unexpected tensor {extra[0]} (and {len(extra) - 1} more) in a DS4 file"
                        if len(extra) > 1 else f"unexpected tensor {extra[0]} in a DS4 file")
    for il in range(shape.n_layer):
        g, u = found[f"blk.{il}.ffn_gate_exps.weight"], found[f"blk.{il}.ffn_up_exps.weight"]
        if g.qtype != u.qtype:
            raise GGUFError(f"blk.{il}: ffn_gate_exps is {type_name(g.qtype)} but ffn_up_exps is "
                            f"{type_name(u.qtype)}; they must match")


def open_ds4(path: str | os.PathLike) -> DS4File:
    """Open and validate a DS4 GGUF. Raises GGUFError with a clear reason."""
    path = str(path)
    if not os.path.exists(path):
        raise GGUFError(f"{path}: no such file")
    md, infos, size = read_header(path)
    shape = shape_from_metadata(md)
    tensors = {}
    for t in infos:
        if t.name in tensors:
            raise GGUFError(f"tensor {t.name} appears twice")
        if t.qtype not in C.BLOCK:
            raise GGUFError(f"tensor {t.name}: unsupported type id {t.qtype}")
        tensors[t.name] = t
    check_tensors(shape, tensors, size)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return DS4File(path, shape, tensors, md, data)
