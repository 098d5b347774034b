"""Programmatic dependent launch (PDL; CUDA, compute capability 9.0+).

Launched with PDL, a kernel may start before the kernel ahead of it on the stream has finished:
its blocks become resident as SMs free up and run up to their `wait` (griddepcontrol.wait),
which returns once the kernel ahead has finished and its writes are visible. What they do before
the wait overlaps the kernel ahead: the CUDA C matvec prefetches its first weight rows into L2,
and every kernel hides its launch and block start-up. A kernel ahead lets the next one launch by
calling `trigger` (griddepcontrol.launch_dependents; implicitly when its blocks exit).

The rules every PDL kernel here keeps (common.cuh, the Triton decode kernels):
  - before its wait it reads only weights and tables (never what an earlier kernel writes) and
    writes nothing;
  - after its wait, the CUDA C kernels read an earlier kernel's output by ordinary L1-cached
    loads (common.cuh, `prior`: the wait makes the writes visible to them), never through the
    read-only path (`ld.global.nc`, what `const __restrict__` allows): the output is written
    after this kernel started, and that path served stale bytes (tests/test_ptx_loads.py
    checks the PTX);
  - it triggers at its start: the next kernel launches once all of this one's blocks are
    resident, so it never takes SMs that this one's blocks still need.
Both instructions are no-ops in a plain launch, so the same compiled kernel serves both.
In a CUDA graph, stream capture records PDL launches as programmatic edges.

`enabled(device)` is the one switch (benchmarks time both in one run: `set_enabled`); the CUDA C
launcher (cuda_c.launch, through `cuda_c_enabled`) and the Triton decode kernels (`triton_args`)
ask it at launch. Each of those two also has a switch of its own (`set_cuda_c_enabled`,
`set_triton_enabled`), so a benchmark can make one family's launches plain and keep the other's
programmatic (to find which programmatic edges a failure needs: docs/performance.md,
nineteenth session, section 5).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from ds4tp.kernels.cuda_c import Switch

_switch = Switch()
set_enabled = _switch.set            # benchmarks time the plain launches in the same run
_cuda_c_switch = Switch()
set_cuda_c_enabled = _cuda_c_switch.set    # the CUDA C launches alone
_triton_switch = Switch()
set_triton_enabled = _triton_switch.set    # the Triton launches alone


@functools.lru_cache(maxsize=8)
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """PDL launches on this device: switched on, CUDA, sm_90 or later."""
    return _switch.on and device.type == "cuda" and _capable(device.index or 0)


@functools.lru_cache(maxsize=1)
def _triton_ok() -> bool:
    """This Triton launches with PDL (launch_pdl) and has the griddepcontrol builtins."""
    try:
        import triton.language.extra.cuda as tcuda
        from triton.backends.nvidia.compiler import CUDAOptions
        return ("launch_pdl" in CUDAOptions.__dataclass_fields__
                and hasattr(tcuda, "gdc_wait") and hasattr(tcuda, "gdc_launch_dependents"))
    except Exception:
        return False


def cuda_c_enabled(device: torch.device) -> bool:
    """The CUDA C launcher launches with PDL on this device."""
    return _cuda_c_switch.on and enabled(device)


def triton_args(device: torch.device) -> dict:
    """Launch keywords for a Triton decode kernel with a `PDL: tl.constexpr` parameter (the
    kernel calls gdc_launch_dependents and gdc_wait when it is set)."""
    on = _triton_switch.on and enabled(device) and _triton_ok()
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


# ---- the CUDA C launcher's side: cuLaunchKernelEx with the programmatic-serialization attribute
_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6     # CUlaunchAttributeID (cuda.h)


class _LaunchAttr(ctypes.Structure):            # CUlaunchAttribute: id, pad to 8, 64-byte union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):          # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttr)), ("numAttrs", ctypes.c_uint)]


@functools.lru_cache(maxsize=1)
def _launch_ex():
    """The driver's cuLaunchKernelEx (CUDA 12.0+), or None where the driver has none."""
    try:
        f = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    except (OSError, AttributeError):
        return None
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                  ctypes.c_void_p]
    return f


def cuda_ok() -> bool:
    """The CUDA C launcher can launch with PDL here (the driver has cuLaunchKernelEx); where it
    cannot, cuda_c.launch takes CuPy's plain launch (the kernels' PDL instructions are no-ops)."""
    return _launch_ex() is not None


_CTYPE = {"uint64": ctypes.c_uint64, "int64": ctypes.c_int64, "int32": ctypes.c_int32,
          "float32": ctypes.c_float, "float64": ctypes.c_double}


def launch_cuda(function_ptr: int, grid, block: int, stream_handle: int, args, smem: int = 0) -> None:
    """One PDL launch of a compiled kernel (CUfunction) on a stream. args: numpy scalars in the
    kernel's parameter order (uint64 pointers, int32, int64, float32, float64); smem: bytes of
    dynamic shared memory."""
    vals = [_CTYPE[a.dtype.name](a.item()) for a in args]
    params = (ctypes.c_void_p * len(vals))(*(ctypes.addressof(v) for v in vals))
    attr = _LaunchAttr(id=_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    g = tuple(grid) + (1,) * (3 - len(grid))
    cfg = _LaunchConfig(g[0], g[1], g[2], block, 1, 1, smem, ctypes.c_void_p(stream_handle),
                        ctypes.pointer(attr), 1)
    err = _launch_ex()(ctypes.byref(cfg), ctypes.c_void_p(function_ptr), params, None)
    if err != 0:
        raise RuntimeError(f"cuLaunchKernelEx (programmatic dependent launch) failed: CUresult {err}")
