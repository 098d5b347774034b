"""Fused GPU kernels (Triton) for the decode hot path.

`available()` says whether they can run here (CUDA + Triton). Each entry point returns None for
inputs it does not cover (weight type without a kernel, tensors not on CUDA, activation not
float32), and `ds4tp.ops` then runs the torch twin. The kernels live in `triton_matvec`; see its
docstring for the numerics (bit-identical activation quantisation, exact weight decoding,
float32 accumulation) and `bench/kernels_check.py` for the H200 check and timing. Routed
experts at decode sizes (IQ2_XXS gate/up, Q2_K down, up to 4 tokens) take the CUDA C kernels of
`cuda_experts` where CuPy is installed, else the packed-integer dp4a Triton kernels; larger
launches the tensor-core tile kernel. A one-token Q8_0 matvec (linear, grouped, normed) takes
the CUDA C kernel of `cuda_matvec` where CuPy is installed, else the Triton split-layout
kernel; so does a one-token F16 linear (the MoE router) whose input is 1024 * S wide. From
GEMM_MIN_T tokens (prefill) the many-token kernel of `triton_gemm` takes every supported weight
type: one launch for all tokens (routed experts grouped by expert), the same exact block dots,
or the float16 path (dense weights on cuBLAS, routed experts on the tensor-core kernels of
cuda_experts.many); F16 weights take the activation split into float16 head and tail on cuBLAS
(3xTF32 in Triton without it); see triton_gemm.

Entry points (twins in ds4tp.ops):
  linear(w, x)                                   x [T, in]           -> [T, out]
  linear_normed(w, x, norm, eps)                 x [1, in]: linear(w, rms_norm(x, norm))
  grouped_linear(w, x)                           x [T, G, in_g]      -> [T, G, out/G]
  expert_linear(w, x, ids, sum_slots=False)      x [T, in]|[T, K, in], ids [T, K]
                                                 -> [T, K, out], or summed over K [T, out]
  expert_swiglu(w_gate, w_up, x, ids, weights, clamp)
                                                 -> [T, K, out] = swiglu(gate, up) * weights
  expert_swiglu_shared(w_gate, w_up, w_sh, x, ids, weights, clamp)
                                                 -> (expert_swiglu, linear(w_sh, x)), one launch
  expert_down_shared(w, mid, ids, w_sh, gu, clamp)
                                                 -> expert_linear(.., sum_slots) + swiglu_linear
  expert_swiglu_routed(w_gate, w_up, w_sh, x, logits, bias, tid2eid, tokens, k, floor, scale,
                       clamp)                    -> (*expert_swiglu_shared, ids, weights)
The last three are a decode token's routed experts with the shared expert's rows riding in their
launches (CUDA C; `shared_rides` says whether they will take them); the third also chooses the
experts (model.route_select) from the router logits.
"""
from __future__ import annotations

import functools
import os

from ds4tp.config import F16, Q8_0, SWIGLU_CLAMP

GEMM_MIN_T = 17     # tokens from which one many-token launch replaces chunks of TQ_MAX = 16


def pin_compile_cache(environ=os.environ) -> str:
    """Give the process one Triton cache directory before anything compiles (call it at process
    start). Left unset, Triton writes to ~/.triton/cache until torch.compile creates its first
    kernel, which then points TRITON_CACHE_DIR at /tmp/torchinductor_<user>/triton/<device>.
    Where that switch falls differs between a cold and a warm process, so a restarted worker
    looked for kernels in the other directory and compiled them again (measured on an H200,
    4 layers: the warm process's prefills of 1-17 tokens took as long as the cold one's, ~70 s
    of ptxas and gcc; bench/warm_profile.py). An existing setting is kept."""
    home = environ.get("TRITON_HOME") or os.path.expanduser("~")
    return environ.setdefault("TRITON_CACHE_DIR", os.path.join(home, ".triton", "cache"))


# Triton settings the kernels were written and measured with, applied at process start (the CLI,
# the tests) where the environment does not set them. TRITON_DEFAULT_FP_FUSION=1: multiplies and
# adds may be contracted into FMAs, Triton's default through 3.9; Triton 3.9 warns that 3.10
# turns it off by default, which would change the kernels' rounding (and their speed) from what
# the twin tests, the goldens and docs/performance.md measured.
TRITON_DEFAULTS = {"TRITON_DEFAULT_FP_FUSION": "1"}


def triton_defaults(environ=os.environ) -> dict:
    """Set each of TRITON_DEFAULTS in `environ` that is not set; returns the settings in effect."""
    for k, v in TRITON_DEFAULTS.items():
        environ.setdefault(k, v)
    return {k: environ[k] for k in TRITON_DEFAULTS}


@functools.lru_cache(maxsize=1)
def available() -> bool:
    try:
        import torch
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def on_gpu(x) -> bool:
    """x is a CUDA tensor and the kernels can run: the condition of every dispatch point."""
    return x.is_cuda and available()


def eager_rows(x) -> bool:
    """Several rows of a CUDA tensor outside torch.compile (an eager prefill) with the kernels
    available: where the one-launch RMS scale replaces its torch twin (decode keeps the twin,
    compiled into its graph)."""
    import torch
    return x.dim() >= 2 and x.shape[0] > 1 and not torch.compiler.is_compiling() and on_gpu(x)


def prepare_weights(weights, decode_order: bool = True) -> int:
    """Once at load, on CUDA: re-order the routed gate/up rows of every layer in place into the
    order the decode kernel reads (qtensor.IQ2_DECODE: IQ2_XXS rows of 16 super-blocks, where
    the CUDA C kernels that read it compile: cuda_experts.takes_decode_order;
    `decode_order=False` puts them back in GGUF's order, for A/B timings). Every other reader
    takes QTensor.gguf_raw() or knows the order (the prefill's tensor-core kernel). Idempotent;
    returns how many weights are in the decode order."""
    from ds4tp.config import IQ2_XXS
    from ds4tp.kernels import cuda_experts
    from ds4tp.qtensor import GGUF, IQ2_DECODE
    takes = {}                                    # device -> whether its kernels read the order
    n = 0
    for lw in weights.layers:
        for w in (lw.gate_exps, lw.up_exps):
            dev = w.raw.device
            if decode_order and dev not in takes:
                takes[dev] = cuda_experts.takes_decode_order(dev)
            if (w.qtype == IQ2_XXS and w.shape[-1] == 4096 and w.raw.is_cuda and w.raw.is_contiguous()
                    and (not decode_order or takes[dev])):
                w.set_layout(IQ2_DECODE if decode_order else GGUF)
            n += w.layout == IQ2_DECODE
    return n


def _covered(w, x) -> bool:
    import torch
    from ds4tp.kernels.triton_matvec import SUPPORTED
    return (w.qtype in SUPPORTED and x.is_cuda and w.raw.is_cuda and x.dtype == torch.float32
            and x.device == w.raw.device)


def _many(T: int) -> bool:
    """Enough tokens for the many-token launch (every type _covered admits has one)."""
    return T >= GEMM_MIN_T


def _cuda_q8_0(w, x2, groups: int = 1, norm=None, eps: float = 0.0, swiglu_clamp: float = 0.0,
               mix=None):
    """The CUDA C Q8_0 matvec for one token (x2 [1, groups*in], or [1, 2*in] with swiglu_clamp)
    where CuPy is here, else None. mix: a cuda_c.MixJob to carry where it can."""
    if w.qtype != Q8_0 or x2.shape[0] != 1:
        return None
    from ds4tp.kernels import cuda_matvec
    return cuda_matvec.q8_0(w, x2, groups, norm, eps, swiglu_clamp=swiglu_clamp, mix=mix)


def _cuda_f16(w, x2):
    """The CUDA C F16 matvec for one token where CuPy is here, else None."""
    if w.qtype != F16 or x2.shape[0] != 1:
        return None
    from ds4tp.kernels import cuda_matvec
    return cuda_matvec.f16(w, x2)


def linear(w, x, mix=None):
    """mix: a cuda_c.MixJob that the CUDA C Q8_0 launch carries where it takes it (mix.done)."""
    if not _covered(w, x):
        return None
    if _many(x.shape[0]):
        from ds4tp.kernels import triton_gemm
        return triton_gemm.linear(w, x)
    y = _cuda_q8_0(w, x, mix=mix)
    if y is None:
        y = _cuda_f16(w, x)
    if y is not None:
        return y
    from ds4tp.kernels import triton_matvec as tm
    return tm.linear(w, x)


def linear_normed(w, x, norm, eps):
    """linear(w, rms_norm(x, norm)) in one launch for one token (Q8_0), else None."""
    if not _covered(w, x) or not norm.is_cuda or _many(x.shape[0]):
        return None
    y = _cuda_q8_0(w, x, 1, norm, eps)
    if y is not None:
        return y
    from ds4tp.kernels import triton_matvec as tm
    return tm.linear_normed(w, x, norm, eps)


def swiglu_linear(w, gu, clamp):
    """linear(w, swiglu_clamped(gate, up)) of gu = [gate | up] in one launch for one token (the
    CUDA C Q8_0 matvec), else None (the twin: two launches)."""
    if not _covered(w, gu):
        return None
    return _cuda_q8_0(w, gu, swiglu_clamp=clamp)


def grouped_linear(w, x):
    if not _covered(w, x):
        return None
    T, G, n_in = x.shape
    if _many(T):
        from ds4tp.kernels import triton_gemm
        return triton_gemm.linear(w, x.reshape(T, G * n_in), groups=G).view(T, G, -1)
    y = _cuda_q8_0(w, x.reshape(T, G * n_in), G)
    if y is not None:
        return y.view(T, G, -1)
    from ds4tp.kernels import triton_matvec as tm
    return tm.linear(w, x.reshape(T, G * n_in), groups=G).view(T, G, -1)


def expert_linear(w, x, ids, sum_slots: bool = False):
    if not _covered(w, x) or not ids.is_cuda:
        return None
    if _many(ids.shape[0]):
        from ds4tp.kernels import triton_gemm as tg
        y = tg.experts(w, None, x, ids, None, tg.MODE_SLOTS)
        return y.sum(1) if sum_slots else y
    if sum_slots:
        from ds4tp.kernels import cuda_experts
        y = cuda_experts.down_sum(w, x, ids)
        if y is not None:
            return y
    from ds4tp.kernels import triton_matvec as tm
    return tm.expert_linear(w, x, ids, sum_slots=sum_slots)


def expert_swiglu(w_gate, w_up, x, ids, weights, clamp: float = SWIGLU_CLAMP):
    if not (_covered(w_gate, x) and _covered(w_up, x) and ids.is_cuda and weights.is_cuda):
        return None
    if _many(ids.shape[0]):
        from ds4tp.kernels import triton_gemm as tg
        return tg.experts(w_gate, w_up, x, ids, weights, tg.MODE_SWIGLU, clamp)
    from ds4tp.kernels import cuda_experts
    y = cuda_experts.swiglu(w_gate, w_up, x, ids, weights, clamp)
    if y is not None:
        return y
    from ds4tp.kernels import triton_matvec as tm
    return tm.expert_swiglu(w_gate, w_up, x, ids, weights, clamp)


def shared_rides(x) -> bool:
    """Whether a decode token's shared expert rides in the routed experts' launches
    (expert_swiglu_shared, expert_down_shared): one token on CUDA with the CUDA C kernels."""
    if not (on_gpu(x) and x.shape[0] == 1):
        return False
    from ds4tp.kernels import cuda_experts
    return cuda_experts.takes_shared()


def expert_swiglu_shared(w_gate, w_up, w_sh, x, ids, weights, clamp: float = SWIGLU_CLAMP):
    """(mid, gu): the routed gate/up of one token and the shared expert's gate|up rows w_sh of
    the same x in one CUDA C launch, else None."""
    if not (_covered(w_gate, x) and ids.is_cuda and weights.is_cuda) or _many(ids.shape[0]):
        return None
    from ds4tp.kernels import cuda_experts
    return cuda_experts.swiglu(w_gate, w_up, x, ids, weights, clamp, shared=w_sh)


def expert_swiglu_routed(w_gate, w_up, w_sh, x, logits, bias, tid2eid, tokens, k: int,
                         floor: float, scale: float, clamp: float = SWIGLU_CLAMP):
    """(mid, gu, ids, weights): expert_swiglu_shared of one token with its expert choice (that of
    model.route_select, from the router logits) made in the same CUDA C launch, else None."""
    if not (_covered(w_gate, x) and logits.is_cuda) or x.shape[0] != 1:
        return None
    from ds4tp.kernels import cuda_experts
    return cuda_experts.swiglu_routed(w_gate, w_up, x, logits, bias, tid2eid, tokens, k, floor,
                                      scale, clamp, shared=w_sh)


def expert_down_shared(w, mid, ids, w_sh, gu, clamp: float = SWIGLU_CLAMP, mix=None):
    """The routed down of one token summed over its slots plus the shared expert's down of
    swiglu(gu) in one CUDA C launch, else None. mix: a cuda_c.MixJob it carries if it can."""
    if not (_covered(w, mid) and ids.is_cuda) or _many(ids.shape[0]):
        return None
    from ds4tp.kernels import cuda_experts
    return cuda_experts.down_sum(w, mid, ids, shared=w_sh, gu=gu, clamp=clamp, mix=mix)
