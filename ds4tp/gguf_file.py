"""Open a DS4 GGUF, check it against the DS4 layout, and hand out memory-mapped byte ranges.

The shape is read from the `deepseek4.*` metadata, then every metadata key and every tensor's
type and dims are checked against what that shape implies (`ds4tp.config`). Any mismatch is a
`GGUFError` naming the key or tensor, what was found and what was expected. Nothing is read from
the tensor data here: callers take slices of `data` (a read-only memmap of the whole file), so a
rank touches only its own bytes.
"""
from __future__ import annotations

import os
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


def _field_value(field):
    """(type names, python value) of a GGUFReader field."""
    from gguf import GGUFValueType as VT
    types = field.types
    if not types:
        return [], None
    if types[0] == VT.ARRAY:
        sub = types[-1]
        if sub == VT.STRING:
            vals = [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        else:
            vals = [field.parts[i].tolist()[0] for i in field.data]
        return [t.name for t in types], vals
    if types[0] == VT.STRING:
        return [t.name for t in types], bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return [t.name for t in types], field.parts[field.data[0]].tolist()[0]


def read_metadata(reader, *, with_arrays: bool = False) -> dict:
    """key -> (type names, value); big token arrays are skipped unless with_arrays."""
    out = {}
    for k, f in reader.fields.items():
        if not with_arrays and k.startswith("tokenizer.ggml.") and k != "tokenizer.ggml.model" \
                and k != "tokenizer.ggml.pre" and not k.endswith("_id"):
            continue
        try:
            out[k] = _field_value(f)
        except Exception as e:  # a field we cannot decode is reported where it is checked
            out[k] = (["?"], e)
    return out


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
    import gguf

    path = str(path)
    if not os.path.exists(path):
        raise GGUFError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (bad magic {head[:4]!r})")
    version = int.from_bytes(head[4:8], "little")
    if version != 3:
        raise GGUFError(f"{path}: GGUF version {version}, expected 3")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:
        raise GGUFError(f"{path}: cannot parse the GGUF header or tensor directory "
                        f"(truncated or corrupt?): {e}") from e
    md = read_metadata(reader)
    shape = shape_from_metadata(md)
    tensors = {}
    for t in reader.tensors:
        dims = tuple(int(d) for d in t.shape)
        tensors[t.name] = TensorInfo(t.name, int(t.tensor_type), dims, int(t.data_offset), int(t.n_bytes))
    check_tensors(shape, tensors, size)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return DS4File(path, shape, tensors, md, data)
