"""Routed experts of a decode step in CUDA C (experts.cu, compiled by NVRTC through CuPy).

Two launches per layer replace four (two activation quantisers and the two Triton few-token
kernels): `swiglu` (IQ2_XXS gate/up, clamped SwiGLU, router weight) and `down_sum` (Q2_K down,
summed over the slots). Each quantises its activation in its prologue, bit-identically to
ds4tp.numerics.q8_k_act; block sums are exact integers, so results differ from the torch twins
only by float32 rounding (tests/kernel_cases.py: case_cuda_swiglu, case_cuda_down_sum).

A prefill's routed experts take `many` (experts_mma.cu): tiles of up to 64 (token, slot) pairs
of one expert on mma.sync tensor cores, weights decoded in registers to float16, the activation
in float16 (the float16 path of ds4tp.kernels.triton_gemm, whose twin is the float64 product).

swiglu and down_sum return None for what they do not cover (no CuPy, other weight types or
shapes, unaligned views, more than MAX_T tokens); the dispatch in ds4tp.kernels then takes the
Triton kernels.
Launches go to torch's current stream, so they are captured into CUDA graphs like any other.
"""
from __future__ import annotations

import numpy as np
import torch

from ds4tp.config import IQ2_XXS, Q2_K, Q8_0
from ds4tp.qtensor import IQ2_DECODE
from ds4tp.kernels import cuda_c
from ds4tp.kernels.cuda_c import launch as _launch, ptr as _ptr

WARPS = 16         # warps per block (H200 sweep: 23.5 vs 24.9 us gate/up, 15.8 vs 17.3 down at 8)
# The one-token decode launches' warps per block, read at call time (benchmarks time others): the
# gate/up kernel (A) and the down kernel (B). At 16 warps each needs the whole register file
# (128 / 126 registers a thread), so no other kernel's block shares its SM.
A_WARPS = WARPS
B_WARPS = WARPS
A_MAX_KB = 16      # gate/up inputs <= 4096, a multiple of 2048 (rows of whole 16-byte pieces)
B_KB = (1, 2, 4, 8)  # down inputs: 256, 512, 1024 or 2048
B_MAX_K = 8
B_SH_CPR = (1, 2, 4)  # the shared down's inputs with it: 512, 1024 or 2048 (experts.cu B_SH_CPR)
MAX_T = 4          # tokens per launch (each token re-reads its experts' rows)
_switch = cuda_c.Switch()
set_enabled = _switch.set          # benchmarks time the Triton kernels in the same run
available = _switch.available


def _kernel(x: torch.Tensor, warps: int, which: int, defines: tuple = ()):
    """Kernel `which` (0: gate/up, 1: down, 2: down with an HC Sinkhorn riding) compiled for x's
    device (WARPS per block is a compile-time constant; benchmarks time other values), or None
    (see cuda_c.kernel)."""
    mix = cuda_c.mix_defines() if which == 2 else ()
    return cuda_c.kernel("experts.cu", ("iq2xxs_swiglu", "q2k_down_sum", "q2k_down_sum_mix")[which],
                         x.device.index, (("WARPS", warps),) + tuple(defines) + mix)


def down_defines(K: int, kb: int, csh: int) -> tuple:
    """The down kernel's compile-time shape (experts.cu q2k_down_sum): passes over a row's K
    slots (32 / (4 kb) slots a pass), the shared row's pieces."""
    return (("B_NP", -(-K // (32 // (4 * kb)))), ("B_SH_MAX", max(csh, 1)))


def default_rpc(fn, n_rows: int, T: int, device: torch.device, warps: int = WARPS,
                dyn_smem: int = 0) -> int:
    """Rows per block: the fewest that fit every block in one wave (all resident at once), so
    that each block's prologue (grid table, activation quantisation) is paid once per slot."""
    return max(1, -(-n_rows * T // cuda_c.wave_slots(fn, warps, device, dyn_smem)))


def _aligned(raw: torch.Tensor, a: int) -> bool:
    return (raw.stride(-1) == 1 and raw.data_ptr() % a == 0 and raw.stride(0) % a == 0
            and raw.stride(1) % a == 0)


def _act16(x: torch.Tensor) -> torch.Tensor:
    """x itself where the kernels' 16-byte activation loads may read it (unit last stride,
    16-byte aligned, every other stride a multiple of 4 floats), else a contiguous copy."""
    if x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s % 4 == 0 for s in x.stride()[:-1]):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _ids64(ids: torch.Tensor) -> torch.Tensor:
    return ids if ids.dtype == torch.int64 and ids.is_contiguous() else ids.to(torch.int64).contiguous()


def _common(w, x, ids, per_slot: bool) -> bool:
    if not (available() and x.is_cuda and ids.is_cuda and w.raw.is_cuda and x.dtype == torch.float32):
        return False
    T, K = ids.shape
    if T > MAX_T or K > B_MAX_K or x.dim() != (3 if per_slot else 2) or x.shape[0] != T:
        return False
    return x.device == w.raw.device == ids.device


_NULL = np.uint64(0)
_shared_switch = cuda_c.Switch()
set_shared_enabled = _shared_switch.set    # benchmarks time the shared expert's own launches


def takes_shared() -> bool:
    """Whether the shared expert's rows ride in the routed launches (swiglu / down_sum with
    `shared`) where those cover the shapes."""
    return _shared_switch.on and available()


def _q8_0_split(w, n_in: int, max_cpr: int):
    """The split layout (int8 quants, f16 scales) of a Q8_0 weight [rows, n_in] whose rows the
    routed launches take (n_in = 512 * cpr, cpr <= max_cpr), or None."""
    if not (w.qtype == Q8_0 and len(w.shape) == 2 and w.shape[1] == n_in and n_in % 512 == 0
            and n_in // 512 <= max_cpr and w.raw.is_cuda):
        return None
    from ds4tp.kernels.triton_matvec import q8_0_split
    q, d = q8_0_split(w)
    return (q, d) if q.data_ptr() % 16 == 0 and d.data_ptr() % 4 == 0 else None


def swiglu(w_gate, w_up, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, clamp: float,
           rpc: int | None = None, warps: int | None = None, shared=None):
    """mid [T, K, N] = swiglu_clamped(gate_e . x_t, up_e . x_t, clamp) * weights[t, k] (zeros for
    id -1), x [T, n_in] shared by the slots; None if not covered. With `shared` (the shared
    expert's gate|up, Q8_0 [2F, n_in]; one token): (mid, gu [1, 2F] = shared . x, the Q8_0
    matvec's numbers) from the same launch, or None."""
    if not (_common(w_gate, x, ids, False) and weights.shape == ids.shape):
        return None
    return _swiglu(w_gate, w_up, x, ids.shape[1], _ids64(ids), weights.to(torch.float32).contiguous(),
                   None, clamp, rpc, warps, shared)


def takes_decode_order(device: torch.device) -> bool:
    """Whether rows in the decode order (qtensor.IQ2_DECODE) can be read in place on this
    device: CuPy here and both of their kernels compiled (the decode step's gate/up with the
    choice, the prefill's tensor-core gate/up). Elsewhere the Triton kernels would take those
    launches through a GGUF-order copy of the weight every call, so kernels.prepare_weights
    leaves the rows in GGUF's order."""
    if not (available() and device.type == "cuda"):
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return (cuda_c.kernel("experts.cu", "iq2xxs_swiglu", idx,
                          (("WARPS", A_WARPS),) + _swiglu_defines(True, True)) is not None
            and cuda_c.kernel("experts_mma.cu", "iq2xxs_swiglu_mma", idx, _MMA_DL) is not None)


def _swiglu_defines(route: bool, dl: bool) -> tuple:
    """The gate/up kernel's compile-time modes: the expert choice in it, rows in the decode order
    (read through the tables per bank pair where they are on)."""
    return ((("A_ROUTE", 1),) if route else ()) + ((("A_DL", 1),) if dl else ()) + \
        ((("A_TAB", 1),) if dl and _tab_switch.on else ())


A_TAB_BYTES = 256 * 256     # the tables' dynamic shared memory (experts.cu A_TAB_BYTES)
_tab_switch = cuda_c.Switch()
set_tables_enabled = _tab_switch.set    # benchmarks time the one-table kernel in the same run


_MMA_DL = (("IQ2_DL", 1),)     # the tensor-core kernels on rows in the decode order


R_MAX_E = 256      # experts the in-kernel choice holds (experts.cu R_MAX_E)
_route_switch = cuda_c.Switch()
set_route_enabled = _route_switch.set   # benchmarks time the choice's own launch in the same run


def swiglu_routed(w_gate, w_up, x: torch.Tensor, logits: torch.Tensor, bias, tid2eid, tokens,
                  k: int, floor: float, scale: float, clamp: float, shared=None,
                  rpc: int | None = None, warps: int | None = None):
    """swiglu with the expert choice in the same launch: each block chooses its token's k experts
    from the router logits [T, n_expert] float32 as ds4tp.model.route_select does (bias
    [n_expert] float32 or None; tid2eid [V, k] int64 for a hash layer, with tokens [T] int64 on
    the device) -> (mid, ids [T, k] int64, weights [T, k] float32), or with `shared` (mid, gu,
    ids, weights); None if not covered (then the choice takes its own launch). The ids are
    global: the caller uses this only where every expert is local. The logits, bias, table and
    tokens must be contiguous: the launch reads them in place (a contiguous copy made here would
    be freed before the kernel reads it, and its memory handed to the kernel's own output)."""
    if not (_route_switch.available() and logits.is_cuda and logits.dtype == torch.float32
            and logits.dim() == 2 and logits.device == x.device and logits.is_contiguous()):
        return None
    T, ne = logits.shape
    if ne > R_MAX_E or not 1 <= k <= ne or w_gate.shape[0] != ne:   # (_common: T, k, x's shape)
        return None
    if bias is not None and (bias.shape != (ne,) or bias.dtype != torch.float32 or bias.device != x.device
                             or not bias.is_contiguous()):
        return None
    if tid2eid is not None and (tid2eid.dim() != 2 or tid2eid.shape[1] != k or tid2eid.dtype != torch.int64
                                or tokens is None or tokens.shape != (T,) or tokens.dtype != torch.int64
                                or tid2eid.device != x.device or tokens.device != x.device
                                or not (tid2eid.is_contiguous() and tokens.is_contiguous())):
        return None
    ids = torch.empty(T, k, dtype=torch.int64, device=x.device)
    if not _common(w_gate, x, ids, False):
        return None
    rw = torch.empty(T, k, dtype=torch.float32, device=x.device)
    route = (_ptr(logits), _ptr(bias) if bias is not None else _NULL,
             _ptr(tid2eid) if tid2eid is not None else _NULL, _ptr(tokens) if tid2eid is not None else _NULL,
             _ptr(ids), _ptr(rw), np.int32(ne), np.float32(floor), np.float32(scale))
    got = _swiglu(w_gate, w_up, x, k, ids, rw, route, clamp, rpc, warps, shared)
    if got is None:
        return None
    return (*got, ids, rw) if shared is not None else (got, ids, rw)


def _swiglu(w_gate, w_up, x, K: int, ids64, rw, route, clamp, rpc, warps, shared):
    """The gate/up launch of swiglu (route None: ids64, rw given) or swiglu_routed (route: the
    choice's arguments; ids64, rw its outputs)."""
    warps = warps or A_WARPS
    if not w_gate.qtype == IQ2_XXS == w_up.qtype:
        return None
    E, N, n_in = w_gate.shape
    kb = n_in // 256
    rg, ru = w_gate.raw, w_up.raw
    if (n_in % 2048 or kb > A_MAX_KB or w_up.shape != w_gate.shape or rg.stride() != ru.stride()
            or not (_aligned(rg, 16) and _aligned(ru, 16)) or w_up.layout != w_gate.layout):
        return None
    dl = w_gate.layout == IQ2_DECODE        # (rows of 16 super-blocks: the QTensor checks it)
    T = x.shape[0]
    sh = None
    if shared is not None:
        sh = _q8_0_split(shared, n_in, A_MAX_KB // 2)
        if sh is None or T != 1 or not takes_shared():
            return None
    defines = _swiglu_defines(route is not None, dl)
    fa = _kernel(x, warps, 0, defines)
    if fa is None:
        return None
    smem = A_TAB_BYTES if ("A_TAB", 1) in defines else 0
    x = _act16(x)
    out = torch.empty(T, K, N, dtype=torch.float32, device=x.device)
    from ds4tp.kernels.triton_matvec import _iq2_grid64
    grid64 = _iq2_grid64(x.device)
    rpc = rpc or default_rpc(fa, N, T, x.device, warps, smem)
    blocks = (N + rpc - 1) // rpc
    if sh is not None:            # the shared rows spread evenly over the blocks
        nsh = shared.shape[0]
        gu = torch.empty(1, nsh, dtype=torch.float32, device=x.device)
        tail = (_ptr(sh[0]), _ptr(sh[1]), _ptr(gu), np.int32(nsh), np.int32(-(-nsh // blocks)))
    else:
        tail = (_NULL, _NULL, _NULL, np.int32(0), np.int32(0))
    if route is None:
        route = (_NULL,) * 6 + (np.int32(0), np.float32(0.0), np.float32(0.0))
    _launch(fa, x.device, (blocks, T), warps,
            (_ptr(rg), _ptr(ru), np.int64(rg.stride(0)), np.int64(rg.stride(1)), _ptr(x),
             np.int64(x.stride(0)), _ptr(ids64), _ptr(rw), _ptr(out), _ptr(grid64), np.int32(N),
             np.int32(kb), np.int32(K), np.int32(rpc), np.float32(clamp)) + tail + route, smem)
    return out if sh is None else (out, gu)


def down_sum(w, x: torch.Tensor, ids: torch.Tensor, rpc: int | None = None,
             warps: int | None = None, shared=None, gu: torch.Tensor | None = None,
             clamp: float = 0.0, mix=None) -> torch.Tensor | None:
    """out [T, N] = sum_k w_e . x[t, k] over the slots with an id (the routed down projection),
    x [T, K, n_in] one activation per slot; None if not covered. With `shared` (the shared
    expert's down, Q8_0 [N, F]; one token) and gu [1, 2F] (its gate | up): plus
    shared . swiglu_clamped(gate, up, clamp), as the Q8_0 matvec would add it, in the same
    launch. mix: a cuda_c.MixJob that rides as one more block where it can (one token;
    mix.done says so)."""
    if not (_common(w, x, ids, True) and w.qtype == Q2_K):
        return None
    warps = warps or B_WARPS
    E, N, n_in = w.shape
    kb = n_in // 256
    raw = w.raw
    if n_in % 256 or kb not in B_KB or x.shape[1] != ids.shape[1] or not _aligned(raw, 4):
        return None
    T, K = ids.shape
    sh, csh = None, 0
    if shared is not None:
        F = shared.shape[-1]
        csh = F // 512
        sh = _q8_0_split(shared, F, B_SH_CPR[-1])       # (checks that shared is 2-D)
        if (sh is None or csh not in B_SH_CPR or shared.shape[0] != N or T != 1 or not takes_shared()
                or F // 8 > warps * 32      # one thread per 8 of its inputs in the prologue
                or gu is None or gu.shape != (1, 2 * F) or gu.dtype != torch.float32 or gu.device != x.device):
            return None
        gu = _act16(gu)          # its prologue reads 16-byte pieces
    ride = mix is not None and T == 1 and mix.takes(x.device)
    fb = _kernel(x, warps, 2 if ride else 1, down_defines(K, kb, csh))
    if fb is None:
        return None
    x = _act16(x)                # the prologue reads 16-byte pieces
    out = torch.empty(T, N, dtype=torch.float32, device=x.device)
    ids64 = _ids64(ids)
    rpc = rpc or default_rpc(fb, N, T, x.device, warps)
    tail = ((_ptr(sh[0]), _ptr(sh[1]), _ptr(gu), np.int32(csh), np.float32(clamp)) if sh is not None
            else (_NULL, _NULL, _NULL, np.int32(0), np.float32(0.0)))
    _launch(fb, x.device, ((N + rpc - 1) // rpc + ride, T), warps,
            (_ptr(raw), np.int64(raw.stride(0)), np.int64(raw.stride(1)), _ptr(x),
             np.int64(x.stride(0)), np.int64(x.stride(1)), _ptr(ids64), _ptr(out),
             np.int64(out.stride(0)), np.int32(N), np.int32(kb), np.int32(K), np.int32(rpc)) + tail
            + (mix.args() if ride else ()))
    return out


MANY_TQ = 64       # pairs per tile the tensor-core kernels take (experts_mma.cu: TQ)


def many(w, w2, x16: torch.Tensor, per_slot: bool, pairs: torch.Tensor, table: torch.Tensor,
         rw: torch.Tensor | None, out: torch.Tensor, swiglu: bool, clamp: float,
         defines: tuple = ()) -> bool:
    """Routed experts of many tokens on tensor cores (experts_mma.cu), the float16 path of
    ds4tp.kernels.triton_gemm.experts: out[p] for each (token, slot) pair p of the tile table
    (expert, first index into pairs, count <= MANY_TQ) = the pair's expert rows . x16 (float16
    [T, n_in], or [T, K, n_in] with per_slot), through the clamped SwiGLU times rw with swiglu
    (w gate, w2 up). False, launching nothing, for what it does not cover. defines: compile-time
    variants of experts_mma.cu (benchmarks time them)."""
    if not (available() and x16.is_cuda and x16.dtype == torch.float16 and w.raw.is_cuda):
        return False
    qt = w.qtype
    if not ((qt == IQ2_XXS and (w2 is None or w2.qtype == IQ2_XXS)) or (qt == Q2_K and not swiglu)):
        return False
    E, N, n_in = w.shape
    raw = w.raw
    raw2 = w2.raw if swiglu else raw
    dl = w.layout == IQ2_DECODE
    a = 2 if qt == IQ2_XXS and not dl else 4    # GGUF's IQ2_XXS rows load as 16-bit words
    if (n_in % 256 or not (_aligned(raw, a) and _aligned(raw2, a)) or raw2.stride() != raw.stride()
            or (swiglu and (w2.shape != w.shape or rw is None)) or (w2 is not None and w2.layout != w.layout)):
        return False
    if dl:
        defines = tuple(defines) + _MMA_DL
    sxk = x16.stride(1) if per_slot else 0
    if not (x16.stride(-1) == 1 and x16.data_ptr() % 8 == 0 and x16.stride(0) % 4 == 0 and sxk % 4 == 0):
        return False
    if table.shape[0] == 0:
        return True
    name = "iq2xxs_swiglu_mma" if swiglu else ("iq2xxs_slots_mma" if qt == IQ2_XXS else "q2k_slots_mma")
    fn = cuda_c.kernel("experts_mma.cu", name, x16.device.index, tuple(defines))
    if fn is None:
        return False
    from ds4tp.kernels.triton_matvec import _iq2_grid64
    grid64 = _iq2_grid64(x16.device)
    rows = 64 if swiglu else 128
    K = out.shape[1]
    _launch(fn, x16.device, (table.shape[0], (N + rows - 1) // rows), 4,
            (_ptr(raw), _ptr(raw2), np.int64(raw.stride(0)), np.int64(raw.stride(1)), _ptr(x16),
             np.int64(x16.stride(0)), np.int64(sxk), _ptr(table), _ptr(pairs),
             _ptr(rw if rw is not None else out), _ptr(out), np.int64(out.stride(1)), _ptr(grid64),
             np.int32(N), np.int32(K), np.int32(n_in // 256), np.float32(clamp)))
    return True
