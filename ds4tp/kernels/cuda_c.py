"""What the CUDA C kernels share: compiling a .cu file with NVRTC through CuPy, launching on
torch's current stream, and the occupancy arithmetic behind their default launch shapes.

Host modules: `cuda_experts` (experts.cu: routed experts) and `cuda_matvec` (matvec.cu: the Q8_0
one-token matvec). Every .cu file is compiled with `common.cuh` in front of it (no headers:
NVRTC sees only the built-in types and intrinsics). A source that does not compile (e.g. an
NVRTC without the GPU's architecture) warns once and its host module returns None, so the
dispatch in ds4tp.kernels takes the Triton kernels. On sm_90+ the launches are programmatic
dependent launches (ds4tp.kernels.pdl; the kernels' side is in common.cuh).
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch

_DIR = Path(__file__).parent


@functools.lru_cache(maxsize=1)
def _cupy():
    try:
        import cupy
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


def available() -> bool:
    """CUDA and CuPy (the `gpu` extra) are both here."""
    return torch.cuda.is_available() and _cupy() is not None


class Switch:
    """A kernel path's on/off state: benchmarks switch it off to time the alternative in the
    same run (each CUDA C host module, PDL and the fused HC step have one: `set_enabled =
    _switch.set`; `available` is for the CUDA C paths)."""

    def __init__(self):
        self.on = True

    def set(self, on: bool) -> None:
        self.on = bool(on)

    def available(self) -> bool:
        return self.on and available()


@functools.lru_cache(maxsize=32)
def _module(path: str, device_index: int, defines: tuple):
    """The .cu file at path (relative: in this folder) compiled once per device and set of -D
    defines (compile-time launch constants)."""
    cp = _cupy()
    code = (_DIR / "common.cuh").read_text() + "\n" + (_DIR / path).read_text()
    opts = ("--std=c++14", *(f"-D{k}={v}" for k, v in defines))
    with cp.cuda.Device(device_index):
        return cp.RawModule(code=code, options=opts)


VARIANT_DEFINES: tuple = ()   # -D defines added to every compile: variants benchmarks time
                              # (bench/critical_path.py), empty otherwise
SOURCE_OVERRIDES: dict = {}   # src name -> another file (an absolute path) compiled in its place,
                              # with the same kernel names and arguments (bench/critical_path.py
                              # times an earlier session's kernels against these), empty otherwise

_FAILED: dict = {}     # (path, device index, defines) -> why it did not compile there
_FUNCS: dict = {}      # (path, device index, defines, name) -> the kernel (one object per key, so
                       # resident()'s cache keyed on it holds one entry per kernel)


def kernel(src: str, name: str, device_index: int, defines: tuple = ()):
    """Kernel `name` of `src` compiled for the device, or None where the source does not compile
    (one warning naming the error; never compiled again). The CUDA C twin tests assert that
    their path ran, so a GPU test run still fails on it."""
    defines = tuple(defines) + VARIANT_DEFINES
    path = SOURCE_OVERRIDES.get(src, src)
    key = (path, device_index, defines)
    if key in _FAILED:
        return None
    fn = _FUNCS.get(key + (name,))
    if fn is not None:
        return fn
    try:
        fn = _FUNCS[key + (name,)] = _module(path, device_index, defines).get_function(name)
        return fn
    except Exception as exc:
        _FAILED[key] = exc
        warnings.warn(f"ds4tp: the CUDA C kernels of {src} did not compile for device "
                      f"{device_index} ({type(exc).__name__}: {str(exc)[:400]}); the Triton "
                      f"kernels take their launches", RuntimeWarning, stacklevel=3)
        return None


@functools.lru_cache(maxsize=64)
def resident(fn, warps: int, device_index: int, dyn_smem: int = 0) -> int:
    """Blocks of this kernel one SM holds at once (registers, shared memory with dyn_smem bytes
    of dynamic shared memory a block, threads)."""
    props = torch.cuda.get_device_properties(device_index)
    try:
        regs, smem = int(fn.num_regs), int(fn.shared_size_bytes) + dyn_smem
    except Exception:   # attribute names differ between CuPy versions: assume the worst seen
        regs, smem = 128, max(40 << 10, dyn_smem)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256          # registers are allocated per warp
    by_regs = 65536 // (per_warp * warps)
    sm_smem = getattr(props, "shared_memory_per_multiprocessor", 228 << 10)
    by_smem = sm_smem // (smem + 1024) if smem else 32
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
    return max(1, min(by_regs, by_smem, by_threads, 32))


def wave_slots(fn, warps: int, device: torch.device, dyn_smem: int = 0) -> int:
    """Blocks that run at once on the whole GPU (one wave)."""
    from ds4tp.kernels.triton_matvec import _sm_count
    return resident(fn, warps, device.index, dyn_smem) * _sm_count(device)


_STREAMS: dict = {}


_DYN_SMEM: dict = {}   # kernel -> the dynamic shared memory it was allowed (above the default 48 KB)


def allow_smem(fn, device_index: int, smem: int) -> None:
    """Let kernel fn take `smem` bytes of dynamic shared memory (past 48 KB a kernel must opt in;
    once per kernel object: the objects are per device)."""
    if smem > 48 << 10 and _DYN_SMEM.get(fn, 0) < smem:
        with _cupy().cuda.Device(device_index):
            fn.max_dynamic_shared_size_bytes = smem
        _DYN_SMEM[fn] = smem


def launch(fn, device: torch.device, grid, warps: int, args, smem: int = 0) -> None:
    """fn on torch's current stream of `device` (so CUDA graph capture records it), as a
    programmatic dependent launch where ds4tp.kernels.pdl is on (the kernels call pdl_trigger
    and pdl_wait, common.cuh), with `smem` bytes of dynamic shared memory."""
    from ds4tp.kernels import pdl      # (pdl builds on this module's Switch)
    cp = _cupy()
    allow_smem(fn, device.index, smem)
    handle = torch.cuda.current_stream(device).cuda_stream
    if pdl.cuda_c_enabled(device) and pdl.cuda_ok():
        with cp.cuda.Device(device.index):
            pdl.launch_cuda(fn.kernel.ptr, grid, warps * 32, handle, args, smem)   # RawKernel -> CUfunction
        return
    st = _STREAMS.get((device.index, handle))
    if st is None:
        st = _STREAMS[(device.index, handle)] = cp.cuda.ExternalStream(handle, device.index)
    with cp.cuda.Device(device.index), st:
        fn(grid, (warps * 32,), args, shared_mem=smem)


def ptr(t: torch.Tensor):
    """A tensor's address as a kernel pointer argument."""
    return np.uint64(t.data_ptr())


# Which block of a launch carrying a MixJob runs the Sinkhorn (matvec.cu / experts.cu MIX_FIRST;
# read at call time): 1 its first (placed first, before the SMs fill with the launch's waiting
# weight blocks), 0 its last. s42a's replay A/B: the first 0.3% (TP=2 rank) and 0.2% (TP=1)
# faster than the last (critical_path mix_last).
MIX_FIRST = 1


def mix_defines() -> tuple:
    """The compile-time defines of a kernel that carries a MixJob (its Sinkhorn block's place)."""
    return (("MIX_FIRST", MIX_FIRST),)


class MixJob:
    """The next HC update's Sinkhorn for one token (triton_hc.hc_mix's work: logits z [1, 24],
    the mixer's scale [3] and base [24] -> post [1, 4] and M [1, 4, 4]), to ride as one more block
    of a long launch that the main stream runs before that update (cuda_matvec.q8_0 and
    cuda_experts.down_sum take it as mix=; common.cuh hc_sinkhorn_warp). The launch ends only
    when the block has run, so the update reads post and M with no join. `done`: whether a
    launch took it (the caller runs hc_mix otherwise)."""

    def __init__(self, z: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float,
                 iters: int):
        self.z, self.scale, self.base, self.eps, self.iters = z, scale, base, eps, iters
        self.post = torch.empty(1, 4, dtype=torch.float32, device=z.device)
        self.m = torch.empty(1, 4, 4, dtype=torch.float32, device=z.device)
        self.done = False

    def takes(self, device: torch.device) -> bool:
        """Whether a launch on `device` can carry it (4 streams, one token, float32, contiguous)."""
        return (not self.done and self.z.shape == (1, 24) and self.scale.shape == (3,)
                and self.base.shape == (24,) and self.iters >= 1
                and all(t.dtype == torch.float32 and t.is_contiguous() and t.device == device
                        for t in (self.z, self.scale, self.base)))

    def args(self) -> tuple:
        """The kernels' trailing arguments (mz, ms, mb, mpost, mm, meps, miters); marks it done."""
        self.done = True
        return (ptr(self.z), ptr(self.scale), ptr(self.base), ptr(self.post), ptr(self.m),
                np.float32(self.eps), np.int32(self.iters))
