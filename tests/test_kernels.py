"""Triton kernels (ds4tp.kernels) against their torch twins (ds4tp.ops), on fresh random inputs.

Two variants of the same cases (tests/kernel_cases.py):
  * test_triton_interpreter_cpu: Triton's CPU interpreter (TRITON_INTERPRET=1) on small shapes,
    in a subprocess because the variable must be set before triton is imported. Runs anywhere.
  * test_cuda_*: compiled kernels on a CUDA GPU, the small cases plus DS4-sized shapes; skipped
    without CUDA. bench/kernels_check.py covers the full-size shapes and timing.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernel_cases as kc
from ds4tp.config import F16, IQ2_XXS, Q2_K, Q4_K, Q8_0, type_name

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except Exception:
    HAVE_TRITON = False

needs_cuda = pytest.mark.skipif(
    not (HAVE_TRITON and torch.cuda.is_available()),
    reason="compiled Triton kernels need a CUDA GPU (the CPU interpreter variant, "
           "test_triton_interpreter_cpu, runs the same cases on small shapes)")

SMALL = list(kc.interpreter_cases())
CUDA_C = list(kc.cuda_c_cases())


def _have_cupy() -> bool:
    from ds4tp.kernels import cuda_experts
    return cuda_experts.available()


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_triton_interpreter_cpu():
    """Every small case under the Triton CPU interpreter (about 35 s on 2 cores)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(Path(kc.__file__))], env=env, capture_output=True,
                       text=True, timeout=900)
    print(r.stdout)
    assert r.returncode == 0, (r.stdout[-6000:] + "\n" + r.stderr[-6000:])


@needs_cuda
@pytest.mark.parametrize("case", SMALL, ids=[c[0] for c in SMALL])
def test_cuda_small_cases(case):
    name, fn, args = case
    fn("cuda", torch.Generator().manual_seed(7), *args)


@needs_cuda
@pytest.mark.parametrize("case", CUDA_C, ids=[c[0] for c in CUDA_C])
def test_cuda_c_kernels(case):
    """The CUDA C kernels (ds4tp/kernels/experts.cu, matvec.cu) against their twins."""
    if not _have_cupy():
        pytest.skip("the CUDA C kernels need CuPy (pip install ds4tp[gpu])")
    name, fn, args = case
    fn("cuda", torch.Generator().manual_seed(11), *args)


@needs_cuda
def test_cuda_c_dispatch():
    """With CuPy, ops routes DS4's decode-sized routed launches and one-token Q8_0 matvecs to the
    CUDA C kernels (same bits
    as calling them directly, repeatable: no atomics)."""
    if not _have_cupy():
        pytest.skip("the CUDA C kernels need CuPy (pip install ds4tp[gpu])")
    from ds4tp import ops
    from ds4tp.kernels import cuda_experts as ce
    g = torch.Generator().manual_seed(12)
    wg = kc.rand_weight(IQ2_XXS, (16, 64, 4096), g, "cuda")
    wu = kc.rand_weight(IQ2_XXS, (16, 64, 4096), g, "cuda")
    ids = kc.rand_ids(1, 6, 16, g, "cuda")
    x = kc.rand_act((1, 4096), g, "cuda")
    rw = torch.rand(1, 6, generator=g).cuda()
    runs = [ops.expert_swiglu(wg, wu, x, ids, rw) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert torch.equal(runs[0], ce.swiglu(wg, wu, x, ids, rw, 10.0))
    wd = kc.rand_weight(Q2_K, (16, 256, 2048), g, "cuda")
    xm = kc.rand_act((1, 6, 2048), g, "cuda")
    runs = [ops.expert_linear(wd, xm, ids, sum_slots=True) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert torch.equal(runs[0], ce.down_sum(wd, xm, ids))
    # a decode token's shared expert riding in those two launches
    from ds4tp.config import SWIGLU_CLAMP
    assert ops.shared_rides(x) and not ops.shared_rides(kc.rand_act((2, 4096), g, "cuda"))
    w_gu, w_sd = kc.rand_weight(Q8_0, (1024, 4096), g, "cuda"), kc.rand_weight(Q8_0, (256, 512), g, "cuda")
    mid, gu = ops.expert_swiglu_shared(wg, wu, w_gu, x, ids, rw)
    mid2, gu2 = ce.swiglu(wg, wu, x, ids, rw, SWIGLU_CLAMP, shared=w_gu)
    assert torch.equal(mid, mid2) and torch.equal(gu, gu2)
    assert torch.equal(ops.expert_down_shared(wd, xm, ids, w_sd, gu),
                       ce.down_sum(wd, xm, ids, shared=w_sd, gu=gu, clamp=SWIGLU_CLAMP))
    # the one-token Q8_0 matvec: linear, linear_normed, grouped_linear
    from ds4tp.config import RMS_EPS
    from ds4tp.kernels import cuda_matvec as cm
    w = kc.rand_weight(Q8_0, (96, 1024), g, "cuda")
    x = kc.rand_act((1, 1024), g, "cuda")
    norm = torch.rand(1024, generator=g).cuda() + 0.5
    runs = [ops.linear(w, x) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert torch.equal(runs[0], cm.q8_0(w, x))
    assert torch.equal(ops.linear_normed(w, x, norm), cm.q8_0(w, x, norm=norm, eps=RMS_EPS))
    xg = kc.rand_act((1, 4, 1024), g, "cuda")
    assert torch.equal(ops.grouped_linear(w, xg).reshape(1, -1), cm.q8_0(w, xg.reshape(1, -1), 4))
    gu = kc.rand_act((1, 2048), g, "cuda") * 6
    assert torch.equal(ops.swiglu_linear(w, gu, 10.0), cm.q8_0(w, gu, swiglu_clamp=10.0))


def test_cuda_c_compile_failure_falls_back(monkeypatch):
    """Where a CUDA C source does not compile (an NVRTC without the GPU's architecture, say),
    one warning names the error and its kernels are None (the launches fall back), without
    compiling again."""
    from ds4tp.kernels import cuda_c
    calls = []

    class FakeDevice:
        def __init__(self, i):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    class FakeModule:
        def __init__(self, code, options):
            calls.append(options)
            raise RuntimeError("nvrtc: error: invalid value for --gpu-architecture")

    fake = type("FakeCupy", (), {"cuda": type("C", (), {"Device": FakeDevice}), "RawModule": FakeModule})
    monkeypatch.setattr(cuda_c, "_cupy", lambda: fake)
    monkeypatch.setattr(cuda_c, "_FAILED", {})
    monkeypatch.setattr(cuda_c, "_FUNCS", {})
    cuda_c._module.cache_clear()
    with pytest.warns(RuntimeWarning, match="experts.cu did not compile.*gpu-architecture"):
        assert cuda_c.kernel("experts.cu", "q2k_down_sum", 0, (("WARPS", 16),)) is None
    assert cuda_c.kernel("experts.cu", "iq2xxs_swiglu", 0, (("WARPS", 16),)) is None and len(calls) == 1
    assert calls[0] == ("--std=c++14", "-DWARPS=16")
    with pytest.warns(RuntimeWarning, match="matvec.cu did not compile"):
        assert cuda_c.kernel("matvec.cu", "q8_0_matvec", 0, (("WARPS", 8),)) is None
    cuda_c._module.cache_clear()


def test_pdl_launch_config_and_arguments(monkeypatch):
    """The PDL launcher's ctypes structures have cuda.h's layout (CUlaunchAttribute: 4-byte id,
    pad to 8, 64-byte value union; CUlaunchConfig: 7 uints, stream, attrs, count) and it hands
    cuLaunchKernelEx the grid, block, stream, the programmatic-serialization attribute (id 6,
    value 1) and each argument as its C type, in order."""
    import ctypes

    import numpy as np

    from ds4tp.kernels import pdl
    assert ctypes.sizeof(pdl._LaunchAttr) == 72 and pdl._LaunchAttr.value.offset == 8
    assert ctypes.sizeof(pdl._LaunchConfig) == 56
    assert (pdl._LaunchConfig.hStream.offset, pdl._LaunchConfig.attrs.offset,
            pdl._LaunchConfig.numAttrs.offset) == (32, 40, 48)
    seen = {}

    def fake(cfg, fn, params, extra):
        c = cfg._obj
        seen["dims"] = (c.gridDimX, c.gridDimY, c.gridDimZ, c.blockDimX, c.blockDimY, c.blockDimZ,
                        c.sharedMemBytes, c.hStream, c.numAttrs, c.attrs[0].id, c.attrs[0].value)
        seen["fn"] = fn.value
        types = (ctypes.c_uint64, ctypes.c_int32, ctypes.c_int64, ctypes.c_float)
        seen["args"] = [ctypes.cast(params[i], ctypes.POINTER(t)).contents.value
                        for i, t in enumerate(types)]
        return 0

    assert pdl.cuda_ok() == (pdl._launch_ex() is not None)
    monkeypatch.setattr(pdl, "_launch_ex", lambda: fake)
    pdl.launch_cuda(0x1234, (7, 3), 512, 0x5678,
                    (np.uint64(1 << 40), np.int32(-5), np.int64(1 << 33), np.float32(0.5)))
    assert seen["dims"] == (7, 3, 1, 512, 1, 1, 0, 0x5678, 1, 6, 1)
    assert seen["fn"] == 0x1234 and seen["args"] == [1 << 40, -5, 1 << 33, 0.5]
    monkeypatch.setattr(pdl, "_launch_ex", lambda: lambda *a: 1)
    with pytest.raises(RuntimeError, match="cuLaunchKernelEx.*CUresult 1"):
        pdl.launch_cuda(1, (1,), 32, 0, (np.int32(0),))
    assert pdl.triton_args(torch.device("cpu")) == {"PDL": False}


def test_pdl_family_switches(monkeypatch):
    """The CUDA C and the Triton launches each have a PDL switch of their own under the one for
    both (benchmarks make one family plain and keep the other programmatic)."""
    from ds4tp.kernels import pdl
    monkeypatch.setattr(pdl, "_capable", lambda index: True)     # as if an sm_90 GPU were there
    monkeypatch.setattr(pdl, "_triton_ok", lambda: True)
    dev = torch.device("cuda", 0)
    on = {"PDL": True, "launch_pdl": True}
    try:
        assert pdl.cuda_c_enabled(dev) and pdl.triton_args(dev) == on
        pdl.set_triton_enabled(False)
        assert pdl.cuda_c_enabled(dev) and pdl.triton_args(dev) == {"PDL": False}
        pdl.set_triton_enabled(True)
        pdl.set_cuda_c_enabled(False)
        assert not pdl.cuda_c_enabled(dev) and pdl.triton_args(dev) == on
        pdl.set_cuda_c_enabled(True)
        pdl.set_enabled(False)
        assert not pdl.cuda_c_enabled(dev) and pdl.triton_args(dev) == {"PDL": False}
    finally:
        for f in (pdl.set_enabled, pdl.set_cuda_c_enabled, pdl.set_triton_enabled):
            f(True)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_expert_tiles_cover_each_pair_once():
    """The many-token expert launch's tile table (host side): every pair with an expert sits in
    exactly one tile of its own expert, tiles hold at most tq pairs, skipped pairs in none."""
    from ds4tp.kernels.triton_gemm import expert_tiles
    g = torch.Generator().manual_seed(1)
    ids = kc.rand_ids(70, 6, 12, g, "cpu")
    pairs, table, skipped, tq, tile_expert = expert_tiles(ids, 12, 16)
    flat = ids.reshape(-1)
    assert skipped == int((flat < 0).sum()) and tq == 16
    seen = []
    for e, first, count in table.tolist():
        assert 0 < count <= tq
        tile = pairs[first:first + count].long()
        assert torch.all(flat[tile] == e)
        seen += tile.tolist()
    assert sorted(seen) == torch.nonzero(flat >= 0).flatten().tolist()
    assert tile_expert == [row[0] for row in table.tolist()] == sorted(tile_expert)
    with pytest.raises(ValueError, match="out of range"):
        expert_tiles(torch.tensor([[0, 12]]), 12, 16)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("T,K,E,tq", [(70, 6, 12, 16), (33, 6, 256, None), (5, 2, 3, 64), (1, 6, 8, 16)])
def test_expert_tiles_device_matches_host(T, K, E, tq):
    """The sync-free tile table (expert_tiles_device) holds expert_tiles' rows first, in order,
    then spare rows of count 0 up to P/tq + E rows; the same sorted pairs. -1 ids in no tile."""
    from ds4tp.kernels.triton_gemm import expert_tiles, expert_tiles_device
    g = torch.Generator().manual_seed(T * E)
    ids = kc.rand_ids(T, K, E, g, "cpu")
    pairs, table, skipped, tq_h, _ = expert_tiles(ids, E, tq)
    pairs_d, table_d, tq_d = expert_tiles_device(ids, E, tq)
    assert tq_d == (tq or tq_d) and torch.equal(pairs, pairs_d)
    n = table.shape[0]
    if tq is not None:
        assert torch.equal(table_d[:n], table)
    assert table_d.shape[0] == T * K // tq_d + E and torch.all(table_d[:, 2] >= 0)
    assert int(table_d[:, 2].sum()) == T * K - skipped
    assert torch.all(table_d[n:, 2] == 0) if tq is not None else True


def test_h16_path_rule():
    """Which many-token launches take the float16 path by default: dense quantised weights from
    H16_MIN_T tokens, routed experts from H16_MIN_PAIRS pairs; never F16 weights (not even
    when forced)."""
    from ds4tp.kernels import triton_gemm as tg
    g = torch.Generator().manual_seed(2)
    dense = kc.rand_weight(Q8_0, (32, 256), g)
    experts = kc.rand_weight(IQ2_XXS, (4, 16, 256), g)
    f16 = kc.rand_weight(F16, (16, 256), g)
    assert not tg.h16_path(dense, tg.H16_MIN_T - 1) and tg.h16_path(dense, tg.H16_MIN_T)
    assert tg.h16_path(experts, tg.H16_MIN_PAIRS) and not tg.h16_path(experts, 10 ** 6, False)
    if tg.H16_MIN_PAIRS > 1:
        assert not tg.h16_path(experts, tg.H16_MIN_PAIRS - 1) and tg.h16_path(experts, 1, True)
    assert not tg.h16_path(dense, 10 ** 6, False) and not tg.h16_path(f16, 10 ** 6)
    with pytest.raises(ValueError, match="unsupported"):
        tg.h16_path(f16, 100, True)
    for first, count in ((5, 1), (-1, 2), (2, 0), (3, 2)):     # expert ranges outside 0..3
        with pytest.raises(ValueError, match="out of 4"):
            tg.dequant_h16(experts, first, count)
    with pytest.raises(ValueError, match="no float16 decoding"):
        tg.dequant_h16(f16)


@needs_cuda
@pytest.mark.parametrize("T", [1, 7])
def test_cuda_hc_combine(T):
    kc.case_hc_combine("cuda", torch.Generator().manual_seed(20 + T), T, 4096)


@needs_cuda
def test_cuda_rms_scale_hc_post():
    g = torch.Generator().manual_seed(2)
    kc.case_rms_scale("cuda", g, (2048, 16384))
    kc.case_rms_scale("cuda", g, (64, 64, 512))
    kc.case_hc_post("cuda", g, 300, 4096)


@needs_cuda
def test_cuda_rms_norm_full_size():
    """A prefill's RMS norms at DS4's widths: the HC streams flattened (16384), the queries per
    head (64 x 512), the q_a rows sliced out of the q_a_kv projection (1024 of 1536)."""
    g = torch.Generator().manual_seed(3)
    kc.case_rms_norm("cuda", g, (2048, 16384), False)
    kc.case_rms_norm("cuda", g, (300, 64, 512), False)
    kc.case_rms_norm("cuda", g, (2048, 1024), True, 512)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("block,one,warps", [(16384, True, 16), (512, True, 4), (2048, False, 4)])
def test_rms_norm_compiles_for_sm90(block, one, warps):
    """The RMS-norm kernel compiled to PTX for an H100/H200: a whole 16384-value row held by 16
    warps (read once), a head's row, and the two-pass form."""
    from ds4tp.kernels import triton_norm
    sig = dict(x_ptr="*fp32", sx="i64", w_ptr="*fp32", out_ptr="*fp32", n="i32", eps="fp32")
    const = dict(HAS_W=True, BLOCK=block, ONE=one)
    assert ".f64" in _compile_sm90(triton_norm._rms_norm_kernel, sig, const, warps)


def test_rms_norm_argument_errors():
    from ds4tp.kernels import triton_norm
    with pytest.raises(ValueError, match="expects float32"):
        triton_norm.rms_norm(torch.zeros(2, 8, dtype=torch.float16), None, 1e-6)
    with pytest.raises(ValueError, match="does not match rows of 8"):
        triton_norm.rms_norm(torch.zeros(2, 8), torch.ones(7), 1e-6)


DS4_LINEAR = [  # (type, out, in): DS4 shapes, shortened where only the row count differs
    (Q8_0, 1024, 4096), (Q8_0, 4096, 8192), (Q8_0, 2048, 4096), (Q8_0, 4096, 2048),
    (Q8_0, 4096, 1024), (F16, 24, 16384), (F16, 256, 4096), (F16, 1024, 4096),
    (IQ2_XXS, 2048, 4096), (Q2_K, 4096, 2048), (Q4_K, 2048, 4096)]


@needs_cuda
@pytest.mark.parametrize("T", [1, 2, 5, 16, 21])
@pytest.mark.parametrize("shape", DS4_LINEAR, ids=[f"{type_name(t)}-{o}x{i}" for t, o, i in DS4_LINEAR])
def test_cuda_linear_ds4_shapes(shape, T):
    qt, n_out, n_in = shape
    kc.case_linear("cuda", torch.Generator().manual_seed(T), qt, n_out, n_in, T)


@needs_cuda
@pytest.mark.parametrize("T", [1, 4])
def test_cuda_grouped_output_a(T):
    kc.case_grouped("cuda", torch.Generator().manual_seed(T), Q8_0, 8, 1024, 4096, T)


@needs_cuda
@pytest.mark.parametrize("qt", [Q8_0, Q2_K])
def test_cuda_column_shard(qt):
    kc.case_linear_shard("cuda", torch.Generator().manual_seed(3), qt, 4096, 1024, 2)


@needs_cuda
@pytest.mark.parametrize("T", [1, 3, 4, 16])
def test_cuda_routed_experts(T):
    """DS4 routed shapes; T <= 4 takes the few-token (dp4a) path, T = 16 the tile kernel."""
    g = torch.Generator().manual_seed(T)
    kc.case_swiglu("cuda", g, IQ2_XXS, 256, 1024, 4096, T, 6)
    kc.case_experts("cuda", g, Q2_K, 256, 4096, 1024, T, 6, True)
    kc.case_experts("cuda", g, IQ2_XXS, 256, 1024, 4096, T, 6, False, dup=True)


@needs_cuda
@pytest.mark.parametrize("T", [1, 2])
def test_cuda_routed_experts_tp2_shards(T):
    """The TP=2 per-rank views: gate/up row halves of each expert, down column halves (strided)."""
    g = torch.Generator().manual_seed(10 + T)
    kc.case_swiglu("cuda", g, IQ2_XXS, 64, 1024, 4096, T, 6, None, False, "rows")
    kc.case_experts("cuda", g, Q2_K, 64, 4096, 1024, T, 6, True, None, True, "cols")


@needs_cuda
def test_cuda_routed_experts_small_vs_tiles():
    """Few-token path and tile kernel agree on the same launch (both against the twin)."""
    from ds4tp.kernels import triton_matvec as tm
    g = torch.Generator().manual_seed(5)
    for qt, n_out, n_in in ((IQ2_XXS, 512, 4096), (Q2_K, 1024, 2048)):
        w = kc.rand_weight(qt, (32, n_out, n_in), g, "cuda")
        ids = kc.rand_ids(2, 6, 32, g, "cuda", dup=True)
        x = kc.rand_act((2, 6, n_in), g, "cuda")
        forced = tm.Cfg(bn=16, nb=2, small=True)      # Q2_K is not on it by default
        assert tm.small_path(w, 2, 6, forced)
        a = tm.expert_linear(w, x, ids, sum_slots=True, cfg=forced)
        b = tm.expert_linear(w, x, ids, sum_slots=True, cfg=tm.Cfg(bn=64, nb=1, split=4, small=False))
        kc.check(f"small vs tiles {type_name(qt)}", a, b)


@needs_cuda
def test_cuda_f16_split_cublas():
    """F16 weights on the split cuBLAS path: the split itself at DS4's widest F16 input (the HC
    mixer's 16384), products with rows over float32's range, each row against the twin, and a
    TP column shard (rows strided in the full weight's bytes)."""
    from ds4tp.kernels import triton_gemm as tg
    assert tg.cublas_h16(torch.device("cuda"))
    g = torch.Generator().manual_seed(16)
    kc.case_split_h16("cuda", g, 40, 16384)
    kc.case_f16_split_rows("cuda", g, 1024, 4096, 20)
    kc.case_f16_split_rows("cuda", g, 24, 16384, 6)
    kc.case_gemm_linear("cuda", g, F16, 256, 2048, 70, shard=True)   # a column shard's strided rows


@needs_cuda
@pytest.mark.parametrize("shape,T", [((Q8_0, 4096, 1024), 300), ((Q8_0, 1024, 4096), 64),
                                     ((IQ2_XXS, 2048, 4096), 40), ((Q2_K, 4096, 2048), 33),
                                     ((Q4_K, 2048, 4096), 17), ((F16, 24, 16384), 300),
                                     ((F16, 1024, 4096), 100)],
                         ids=["Q8_0-T300", "Q8_0-T64", "IQ2_XXS-T40", "Q2_K-T33", "Q4_K-T17",
                              "F16-24x16384-T300", "F16-1024x4096-T100"])
def test_cuda_gemm_linear(shape, T):
    """The many-token launch (prefill) at DS4 shapes, default launch shape."""
    qt, n_out, n_in = shape
    kc.case_gemm_linear("cuda", torch.Generator().manual_seed(T), qt, n_out, n_in, T)


@needs_cuda
def test_cuda_gemm_grouped_and_experts():
    """Prefill-sized launches: grouped attention output A, routed gate/up (SwiGLU) and down over
    all 256 experts (TP=2 shard views), some -1 ids."""
    g = torch.Generator().manual_seed(4)
    kc.case_gemm_linear("cuda", g, Q8_0, 8 * 1024, 4096, 70, groups=8)
    kc.case_gemm_experts("cuda", g, IQ2_XXS, 256, 1024, 4096, 300, 6, False, True, None, "rows")
    kc.case_gemm_experts("cuda", g, Q2_K, 256, 4096, 1024, 300, 6, True, False, None, "cols")
    kc.case_gemm_experts("cuda", g, IQ2_XXS, 32, 512, 1024, 40, 6, False, False, None, "", 0.0)
    # the float16 path at prefill size (forced), all 256 experts in groups
    kc.case_gemm_experts("cuda", g, IQ2_XXS, 256, 1024, 4096, 900, 6, False, True, None, "rows", 0.15, True)
    kc.case_gemm_experts("cuda", g, Q2_K, 256, 4096, 1024, 700, 6, True, False, None, "cols", 0.1, True)
    kc.case_gemm_linear("cuda", g, Q8_0, 4096, 1024, 300, h16=False)    # the exact path, forced


@needs_cuda
@pytest.mark.parametrize("bn,warps,stages", [(64, 4, 1), (128, 8, 1), (128, 4, 2), (32, 4, 1)])
def test_cuda_gemm_experts_decoded_in_registers(bn, warps, stages):
    """The float16 routed experts decoded in registers (IQ2_XXS SwiGLU, Q2_K per-slot down) at
    DS4 shapes over all 256 experts, other launch shapes than the default; tiles of 64 and 16."""
    g = torch.Generator().manual_seed(bn + warps + stages)
    c = dict(bn=bn, tq=64, nb=1, warps=warps, stages=stages)
    kc.case_gemm_experts("cuda", g, IQ2_XXS, 256, 2048, 4096, 2048, 6, False, True, c, "", 0.0, True)
    kc.case_gemm_experts("cuda", g, Q2_K, 256, 4096, 2048, 2048, 6, True, False, c, "", 0.05, True)
    c = dict(c, tq=16)
    kc.case_gemm_experts("cuda", g, IQ2_XXS, 256, 1024, 4096, 200, 6, False, False, c, "rows", 0.1, True)
    kc.case_gemm_experts("cuda", g, Q2_K, 256, 4096, 1024, 200, 6, True, False, c, "cols", 0.1, True)


@needs_cuda
def test_cuda_dispatch_and_determinism():
    """ops.* route CUDA tensors through the kernels; split launches repeat bit for bit."""
    from ds4tp import ops
    from ds4tp.kernels import triton_matvec as tm
    g = torch.Generator().manual_seed(11)
    w = kc.rand_weight(Q8_0, (1024, 4096), g, "cuda")
    x = kc.rand_act((1, 4096), g, "cuda")
    from ds4tp.kernels import cuda_matvec as cm
    y = ops.linear(w, x)          # one token: the CUDA C kernel with CuPy, else the Triton one
    assert torch.equal(y, cm.q8_0(w, x) if cm.available() else tm.linear(w, x))
    kc.check("ops.linear", y, ops.linear_torch(w, x))
    cfg = tm.Cfg(bn=32, nb=8, split=8)
    runs = [tm.linear(w, x, cfg=cfg) for _ in range(5)]
    assert all(torch.equal(runs[0], r) for r in runs[1:]), "split-K result is not deterministic"
    we = kc.rand_weight(Q2_K, (64, 4096, 1024), g, "cuda")
    ids = kc.rand_ids(2, 6, 64, g, "cuda")
    xm = kc.rand_act((2, 6, 1024), g, "cuda")
    runs = [ops.expert_linear(we, xm, ids, sum_slots=True) for _ in range(5)]
    assert all(torch.equal(runs[0], r) for r in runs[1:]), "slot sum is not deterministic"
    kc.check("ops.expert_linear sum", runs[0], ops.expert_linear_torch(we, xm, ids).sum(1))
    wo = kc.rand_weight(Q8_0, (4 * 256, 512), g, "cuda")
    xg = kc.rand_act((3, 4, 512), g, "cuda")
    kc.check("ops.grouped_linear", ops.grouped_linear(wo, xg), ops.grouped_linear_torch(wo, xg))
    wg = kc.rand_weight(IQ2_XXS, (16, 256, 1024), g, "cuda")
    wu = kc.rand_weight(IQ2_XXS, (16, 256, 1024), g, "cuda")
    ids = kc.rand_ids(2, 6, 16, g, "cuda")
    xs = kc.rand_act((2, 1024), g, "cuda")
    rw = torch.rand(2, 6, generator=g).cuda()
    got = ops.expert_swiglu(wg, wu, xs, ids, rw)
    assert torch.equal(got, tm.expert_swiglu(wg, wu, xs, ids, rw))
    want = ops.expert_swiglu_torch(wg, wu, xs, ids, rw)
    assert (got - want).abs().max() <= 1e-4 * max(want.abs().max().item(), 1.0)
    # many tokens: ops routes quantised weights to the one-launch kernel, bit-stable across runs
    from ds4tp.kernels import triton_gemm as tg
    xl = kc.rand_act((100, 4096), g, "cuda")
    runs = [ops.linear(w, xl) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:]) and torch.equal(runs[0], tg.linear(w, xl))
    # (100 tokens: the float16 path by default, checked against the exact product)
    assert tg.h16_path(w, 100)
    kc.check("ops.linear T=100", runs[0], kc.exact_linear(w, xl), kc.H16_TOL)
    ids = kc.rand_ids(40, 6, 64, g, "cuda")
    xm = kc.rand_act((40, 6, 1024), g, "cuda")
    got = ops.expert_linear(we, xm, ids, sum_slots=True)
    assert torch.equal(got, tg.experts(we, None, xm, ids, None, tg.MODE_SLOTS).sum(1))
    # (240 (token, slot) pairs: the float16 path by default since 4da1dc9, so its twin is the
    # exact product, as for T=100 above; against the Q8-activation twin it was 0.03 off, s35e)
    assert tg.h16_path(we, 40 * 6)
    kc.check("ops.expert_linear T=40 sum", got, kc.exact_linear(we, xm, ids).sum(1), kc.H16_TOL)


@needs_cuda
@pytest.mark.parametrize("ratio,masked,p,rows", [(0, False, 5, False), (0, False, 700, False),
                                                 (4, False, 4095, False), (4, True, 4095, False),
                                                 (4, True, 4095, True), (128, False, 9000, False)])
def test_cuda_decode_attention_full_size(ratio, masked, p, rows):
    """DS4 shapes: 64 heads of 512, a 128-row ring, compressed rows up to 1025 (the indexer's
    selection as a mask, or listed)."""
    kc.case_decode_attention("cuda", torch.Generator().manual_seed(p + ratio), 64, 512, 64, 128,
                             ratio, 1025 if ratio == 4 else 80, p, masked, True, rows)


@needs_cuda
@pytest.mark.parametrize("rows", [False, True])
def test_cuda_decode_attention_tp2_heads(rows):
    """A TP=2 rank's 32 heads, ratio 4 with an indexer mask (or its rows listed)."""
    kc.case_decode_attention("cuda", torch.Generator().manual_seed(2), 32, 512, 64, 128, 4, 1025,
                             3001, True, True, rows)


@needs_cuda
@pytest.mark.parametrize("ratio,masked,raw_prev,p0,n_comp", [
    (0, False, 0, 0, 0), (4, False, 0, 0, 75), (4, True, 127, 3000, 830), (128, False, 127, 5000, 45)])
def test_cuda_prefill_attention_full_size(ratio, masked, raw_prev, p0, n_comp):
    """A prefill's attention in one launch at DS4's full width (64 heads of 512, a 128-row
    window), default launch shape: against the query-chunk twin, from an empty cache and
    mid-sequence (older raw rows, an indexer-like mask, ratio 128)."""
    kc.case_prefill_attention("cuda", torch.Generator().manual_seed(ratio + p0), 300, 64, 512, 128,
                              raw_prev, ratio, n_comp, p0, masked)


@needs_cuda
@pytest.mark.parametrize("HI,cap,nvis", [(64, 1057, 1024), (32, 2049, 550), (64, 16385, 16000),
                                         (32, 16385, 513)])
def test_cuda_index_scores_full_size(HI, cap, nvis):
    """DS4's indexer (64 heads of 128 at TP=1, 32 at TP=2) over static caches of 4096, 8192 and
    65536 tokens, shallow and deep."""
    kc.case_index_scores("cuda", torch.Generator().manual_seed(cap + nvis), HI, 128, cap, nvis)


@needs_cuda
@pytest.mark.parametrize("n,nvis,levels", [(1057, 1024, 0), (2049, 550, 0), (2049, 1500, 9),
                                           (16385, 16385, 0), (16385, 600, 3), (65537, 40000, 0),
                                           (65537, 65000, 11)])
def test_cuda_topk_mask_full_size(n, nvis, levels):
    """DS4's top-512 selection over static caches of 4096 to 262144 tokens (the visible rows
    in registers up to 4096 of them, blocks reloaded past that), with runs of ties."""
    kc.case_topk_mask("cuda", torch.Generator().manual_seed(n + nvis), n, nvis, 512, levels)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("one,block,warps", [(True, 1024, 4), (True, 4096, 16), (False, 4096, 16)])
def test_topk_mask_compiles_for_sm90(one, block, warps):
    """The selection kernel (unrolled two-bit passes, a cumulative sum) compiled to PTX for an
    H100/H200, both forms, with programmatic dependent launch."""
    from ds4tp.kernels import triton_attn as ta
    sig = dict(score_ptr="*fp32", nvis_ptr="*i64", mask_ptr="*i8", rows_ptr="*i32", n="i32", k="i32")
    for rows in (False, True):
        assert "griddepcontrol" in _compile_sm90(ta._topk_mask_kernel, sig,
                                                 dict(BLOCK=block, ONE=one, PDL=True, ROWS=rows), warps)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("bh", [16, 64])
def test_index_scores_compiles_for_sm90(bh):
    from ds4tp.kernels import triton_attn as ta
    sig = dict(q_ptr="*fp32", w_ptr="*fp32", k_ptr="*fp32", nvis_ptr="*i64", out_ptr="*fp32",
               HI="i32", cap="i32", wscale="fp32")
    assert "griddepcontrol" in _compile_sm90(ta._index_score_kernel, sig,
                                             dict(BH=bh, BR=ta.INDEX_BR, HD=128, PDL=True), 4)


def test_index_kernels_argument_errors():
    from ds4tp.kernels import triton_attn as ta
    nv = torch.tensor([5])
    with pytest.raises(ValueError, match="top_k"):
        ta.topk_mask(torch.zeros(1, 100), nv, 100)
    with pytest.raises(ValueError, match="visible rows"):
        ta.topk_mask(torch.zeros(1, 100), torch.tensor([5], dtype=torch.int32), 10)
    with pytest.raises(ValueError, match="row list"):
        ta.topk_mask(torch.zeros(1, 100), nv, 10, rows=torch.zeros(9, dtype=torch.int32))
    with pytest.raises(ValueError, match="keys"):
        ta.index_scores(torch.zeros(1, 8, 128), torch.zeros(1, 8), torch.zeros(50, 64), nv, 1.0)
    with pytest.raises(ValueError, match="head dim"):
        ta.index_scores(torch.zeros(1, 8, 96), torch.zeros(1, 8), torch.zeros(50, 96), nv, 1.0)


@needs_cuda
@pytest.mark.parametrize("p", [0, 127, 128, 5000])
def test_cuda_kv_store_full_size(p):
    kc.case_kv_store("cuda", torch.Generator().manual_seed(p), 512, 64, 128, p)


@needs_cuda
@pytest.mark.parametrize("ratio,W", [(4, 1024), (4, 256), (128, 512)])
def test_cuda_compressor_step_full_size(ratio, W):
    kc.case_compressor_step("cuda", torch.Generator().manual_seed(W), ratio, W, 4096, 1234)


@needs_cuda
@pytest.mark.parametrize("WA,WB,launch", [(1024, 256, None), (512, 128, None), (512, 128, (1, 1, 4096, 16)),
                                          (1024, 256, (4, 1, 2048, 8))])
def test_cuda_compressor_pair_full_size(WA, WB, launch):
    kc.case_compressor_pair("cuda", torch.Generator().manual_seed(WA + WB), WA, WB, 4096, 1235, launch)


@needs_cuda
@pytest.mark.parametrize("hd,index,p,first", [(512, False, 1235, False), (128, True, 1235, False),
                                               (512, False, 3, True), (128, True, 3, True)])
def test_cuda_compressor_emit_full_size(hd, index, p, first):
    """A ratio-4 compressor's emission at DS4's widths (kv rows of 512, index rows of 128)."""
    kc.case_compressor_emit("cuda", torch.Generator().manual_seed(p + hd), hd, 64, index, p, first)


@needs_cuda
@pytest.mark.parametrize("p,first", [(1235, False), (3, True)])
def test_cuda_compressor_emit_pair_full_size(p, first):
    """A ratio-4 layer's two emissions in one launch at DS4's widths (512 and 128)."""
    kc.case_compressor_emit_pair("cuda", torch.Generator().manual_seed(p), 512, 128, 64, p, first)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_compressor_emit_pair_compiles_for_sm90():
    """The two emissions' launch (a kv row of 512, an index row of 128) compiled to PTX for an
    H100/H200, with programmatic dependent launch."""
    from ds4tp.kernels import triton_attn as ta
    sig = {f"{j}{n}_ptr": "*fp32" for j in "ab" for n in ("fkv", "fsc", "norm", "cache")}
    sig.update(cos_ptr="*fp32", sin_ptr="*fp32", pos_ptr="*i64", eps="fp32")
    const = dict(HDA=512, INDEXA=False, LOGHDA=9, HDB=128, INDEXB=True, LOGHDB=7, NROT=64, PDL=True)
    assert "griddepcontrol" in _compile_sm90(ta._comp_emit_pair_kernel, sig, const, 4)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("hd,index", [(512, False), (128, True)])
def test_compressor_emit_compiles_for_sm90(hd, index):
    """The emission kernel (its Hadamard butterfly reshapes and permutes) compiled to PTX for an
    H100/H200, with programmatic dependent launch."""
    from ds4tp.kernels import triton_attn as ta
    sig = dict(fkv_ptr="*fp32", fsc_ptr="*fp32", norm_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32",
               pos_ptr="*i64", cache_ptr="*fp32", eps="fp32")
    const = dict(HD=hd, NROT=64, INDEX=index, LOGHD=hd.bit_length() - 1, POOL_ONLY=False, PDL=True)
    assert "griddepcontrol" in _compile_sm90(ta._comp_emit_kernel, sig, const, 4)
    # the pooling alone (a rank's share of the channels, compressors split by channel)
    const.update(HD=hd // 2, NROT=0, INDEX=False, LOGHD=0, POOL_ONLY=True)
    assert "griddepcontrol" in _compile_sm90(ta._comp_emit_kernel, sig, const, 4)


@needs_cuda
@pytest.mark.parametrize("T,p0,lead", [(2048, 0, 1024), (300, 4000, 0)])
def test_cuda_kv_rows_full_size(T, p0, lead):
    """A prefill's raw KV rows at DS4's width (512, RoPE on the last 64), sliced out of the
    q_a_kv projection as attention does."""
    kc.case_kv_rows("cuda", torch.Generator().manual_seed(T), T, 512, 64, p0, lead)


def test_kv_rows_argument_errors():
    from ds4tp.kernels import triton_attn
    cs = torch.zeros(3, 32)
    with pytest.raises(ValueError, match="head_dim 96"):
        triton_attn.kv_rows(torch.zeros(3, 96), torch.ones(96), cs, cs, 1e-6)
    with pytest.raises(ValueError, match="unit column stride"):
        triton_attn.kv_rows(torch.zeros(128, 3).t(), torch.ones(128), cs, cs, 1e-6)
    with pytest.raises(ValueError, match="kv_rows: cos"):
        triton_attn.kv_rows(torch.zeros(4, 128), torch.ones(128), cs, cs, 1e-6)


@needs_cuda
@pytest.mark.parametrize("ratio,hd,index,base,N,c0,n", [
    (4, 512, False, 0, 2048, 0, 512), (4, 128, True, 0, 2048, 0, 512),
    (4, 512, False, 2044, 2052, 512, 512), (128, 512, False, 0, 2048, 0, 16),
    (128, 512, False, 2048, 2048, 16, 16)])
def test_cuda_compressor_rows_full_size(ratio, hd, index, base, N, c0, n):
    """A 2048-token prefill's compressed rows at DS4's widths, from an empty cache and for the
    next chunk."""
    kc.case_compressor_rows("cuda", torch.Generator().manual_seed(N + hd), ratio, hd, 64, index,
                            base, N, c0, n)


@needs_cuda
@pytest.mark.parametrize("ratio,hd,index,p,world", [(4, 512, False, 1235, 2), (4, 128, True, 1235, 2),
                                                     (128, 512, False, 4000, 2), (4, 512, False, 39, 4)])
def test_cuda_compressor_split_full_size(ratio, hd, index, p, world):
    """The compressors split by channel at DS4's widths: each rank's pooling, gathered, finished."""
    kc.case_compressor_split("cuda", torch.Generator().manual_seed(p + hd), ratio, hd, 64, index, p, world)


def test_compressor_rows_argument_errors():
    """compressor_rows rejects projections that do not hold the positions its rows read, and
    widths or ratios it has no form for, naming them, before any launch (runs on CPU)."""
    from ds4tp.kernels import triton_attn
    cs = torch.zeros(4, 32)
    kv = torch.zeros(40, 256)
    with pytest.raises(ValueError, match="need positions 12..31, the projections hold 16..55"):
        triton_attn.compressor_rows(kv, kv, 16, 4, 4, 4, torch.ones(128), cs, cs, False, 1e-6)
    with pytest.raises(ValueError, match="need positions 0..43"):
        triton_attn.compressor_rows(kv, kv, 0, 0, 11, 4, torch.ones(128), torch.zeros(11, 32),
                                    torch.zeros(11, 32), False, 1e-6)
    with pytest.raises(ValueError, match="compressor_rows: gates"):
        triton_attn.compressor_rows(kv, kv[:, :128], 0, 0, 4, 4, torch.ones(128), cs, cs, False, 1e-6)
    with pytest.raises(ValueError, match="compressor_rows: cos"):
        triton_attn.compressor_rows(kv, kv, 0, 0, 4, 4, torch.ones(128), cs[:3], cs, False, 1e-6)
    with pytest.raises(ValueError, match="row width 96"):
        triton_attn.compressor_rows(torch.zeros(40, 192), torch.zeros(40, 192), 0, 0, 4, 4,
                                    torch.ones(96), cs, cs, False, 1e-6)
    with pytest.raises(ValueError, match="ratio 128 must be 4"):
        triton_attn.compressor_rows(kv[:, :128], kv[:, :128], 0, 0, 1, 128, torch.ones(128), cs[:1],
                                    cs[:1], True, 1e-6)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("ratio,hd,index", [(4, 512, False), (4, 128, True), (128, 512, False)])
def test_compressor_rows_compiles_for_sm90(ratio, hd, index):
    """The prefill's compressed-row kernel (and, with it, the KV-row kernel) compiled to PTX for
    an H100/H200."""
    from ds4tp.kernels import triton_attn as ta
    sig = dict(kv_ptr="*fp32", sc_ptr="*fp32", norm_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32",
               out_ptr="*fp32", c0="i32", base="i32", eps="fp32")
    const = dict(W=2 * hd if ratio == 4 else hd, HD=hd, NROT=64, RATIO=ratio, INDEX=index,
                 LOGHD=hd.bit_length() - 1, BR=8, POOL_ONLY=False)
    assert "ex2" in _compile_sm90(ta._comp_rows_kernel, sig, const, 4)
    # a rank's channels pooled alone (compressors split by channel), then the gathered rows
    # finished: prefill rows and a decode token's row into the cache
    const.update(W=const["W"] // 2, HD=hd // 2, POOL_ONLY=True)
    assert "ex2" in _compile_sm90(ta._comp_rows_kernel, sig, const, 4)
    fsig = dict(x_ptr="*fp32", norm_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32", pos_ptr="*i64",
                out_ptr="*fp32", eps="fp32")
    for decode in (False, True):
        fconst = dict(RATIO=ratio, HD=hd, NROT=64, INDEX=index, LOGHD=hd.bit_length() - 1,
                      DECODE=decode, PDL=decode)
        assert "cvt.rn.f16" in _compile_sm90(ta._comp_finish_kernel, fsig, fconst, 4)
    sig = dict(x_ptr="*fp32", sx="i32", w_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32",
               out_ptr="*fp32", eps="fp32")
    assert "cvt.rn.f16" in _compile_sm90(ta._kv_rows_kernel, sig, dict(D=hd, NROT=64), 4)


@needs_cuda
@pytest.mark.parametrize("N", [24, 4])
def test_cuda_hc_logits_full_size(N):
    kc.case_hc_logits("cuda", torch.Generator().manual_seed(N), 4, 4096, N)


def _compile_sm90(kernel, sig: dict, const: dict, warps: int):
    """PTX of a Triton kernel for an H100/H200, compiled here (no GPU needed); skips where this
    Triton has no PTX assembler."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {**sig, **{k: "constexpr" for k in const}}
    try:
        out = triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": warps})
    except RuntimeError as exc:
        if "ptxas" in str(exc) or "PTX" in str(exc):
            pytest.skip(f"no PTX assembler: {str(exc)[:100]}")
        raise
    return out.asm["ptx"]


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("pdl", [False, True])
def test_compressor_pair_compiles_for_sm90(pdl):
    """The two compressor steps' launch compiled to PTX for an H100/H200 at a TP=2 rank's
    widths (two branches on the program id, each its own rows per program)."""
    from ds4tp.kernels import triton_attn
    sig = {n: "*fp32" for n in ("x_ptr", "aape_ptr", "afkv_ptr", "afsc_ptr", "bape_ptr", "bfkv_ptr",
                                "bfsc_ptr")}
    sig.update({n: "*fp16" for n in ("akv_ptr", "asc_ptr", "bkv_ptr", "bsc_ptr")},
               pos_ptr="*i64", E="i32", ratio="i32", na="i32", WA="i32", WB="i32")
    ptx = _compile_sm90(triton_attn._comp_pair_kernel, sig, dict(BNA=2, BNB=1, BE=4096, PDL=pdl), 8)
    assert ("griddepcontrol" in ptx) == pdl


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("comp,mask", [(False, False), (True, False), (True, True)])
def test_decode_attention_compiles_for_sm90(comp, mask):
    """The decode attention kernel and the KV store at DS4's width compiled to PTX for an
    H100/H200 (raw rows, compressed rows, the indexer's mask): the interpreter does not check
    the compiler's rules (a loop-carried variable that changed type failed only there, s25f)."""
    from ds4tp.kernels import triton_attn as ta
    sig = dict(qb_ptr="*fp32", ring_ptr="*fp32", rpos_ptr="*i64", comp_ptr="*fp32", mask_ptr="*i8",
               sink_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32", pos_ptr="*i64", out_ptr="*fp32",
               ws_ptr="*fp32", cnt_ptr="*i32", n_swa="i32", ratio="i32", eps="fp32", scale="fp32")
    const = dict(D=512, NROT=64, BK=ta.ATTN_BK, S=ta.ATTN_SPLIT, HAS_COMP=comp, HAS_MASK=mask, PDL=True,
                 HOIST=ta.ATTN_HOIST, K_ROWS=0)
    for heads in (32, 64):           # a TP=2 rank's and TP=1's warps a program
        assert "griddepcontrol" in _compile_sm90(ta._attn_kernel, sig, const, ta.attn_warps(heads))
    if mask:                         # the indexer's rows listed (top-512) instead of the mask
        sig = dict(sig, mask_ptr="*i32")
        const = dict(const, HAS_MASK=False, K_ROWS=512)
        for heads in (32, 64):
            assert "griddepcontrol" in _compile_sm90(ta._attn_kernel, sig, const, ta.attn_warps(heads))
    if not comp:
        sig = dict(x_ptr="*fp32", w_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32", pos_ptr="*i64",
                   ring_ptr="*fp32", rpos_ptr="*i64", n_swa="i32", eps="fp32")
        _compile_sm90(ta._kv_store_kernel, sig, dict(D=512, NROT=64, PDL=True), 4)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("nb,pdl", [(8, True), (0, False)])
def test_pick_kernel_compiles_for_sm90(nb, pdl):
    """The greedy pick's launch (triton_pick) compiled to PTX for an H100/H200 at DS4's 129,280
    logits (64 programs), with the decode graphs' bias table and without one (log_norm)."""
    from ds4tp.kernels import triton_pick
    sig = dict(logit_ptr="*fp32", bid_ptr="*i64", bval_ptr="*fp64", part_ptr="*fp64", cnt_ptr="*i32",
               pick_ptr="*fp64", tok_ptr="*i64", norm_ptr="*fp64", V="i32")
    ptx = _compile_sm90(triton_pick._pick_kernel, sig, dict(NB=nb, BV=2048, P=64, PP=64, PDL=pdl), 8)
    assert ("griddepcontrol" in ptx) == pdl and "atom" in ptx


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("split,peer", [(1, False), (5, False), (32, False), (32, True), (5, True)])
def test_hc_kernels_compile_for_sm90(split, peer):
    """The fused HC step and the HC mixer compiled to PTX for an H100/H200: the CPU interpreter
    runs Python semantics and misses what only the compiler rejects (a value whose type changed
    inside a runtime branch did, once), one and two passes over the streams, with and without
    programmatic dependent launch, and with the all-reduce inside (peer): its flag's release
    and the wait's acquire at system scope, the timer and the trap; without peer, the first
    update's f read from a float16 table's row (ROW) where split is 1 or 32."""
    from ds4tp.kernels import triton_hc
    one_pass, pdl, row = split != 5, split == 32, split != 5 and not peer
    sig = {n: "*fp32" for n in ("f_ptr", "h_ptr", "post_ptr", "m_ptr", "out_ptr", "z_ptr", "ws_ptr",
                                "scale_ptr", "base_ptr", "norm_ptr", "x_ptr", "post2_ptr", "m2_ptr",
                                "ps_ptr", "ms_ptr")}
    sig.update(w_ptr="*fp16", ss_ptr="*fp64", cnt_ptr="*i32", E="i32", N="i32", eps="fp32", rms_eps="fp32",
               pf_ptr="*i64", mf_ptr="*i64", ctr_ptr="*i64", cap="i32", timeout_ns="i64",
               row_ptr="*i64")
    if row:
        sig["f_ptr"] = "*fp16"
    const = dict(NH=4, BE=128 if split == 32 else 64, BN=32, SPLIT=split,
                 SP2=triton.next_power_of_2(split), ITERS=20, XB=4096 if one_pass else 64,
                 ONE_PASS=one_pass, MIX=split != 5, PEER=peer, NFLAG=64, PDL=pdl, ROW=row)
    ptx = _compile_sm90(triton_hc._hc_step_kernel, sig, const, triton_hc.HC_STEP_WARPS)
    assert ("griddepcontrol" in ptx) == pdl
    marks = (r"atom\S*(\.sys\.release|\.release\.sys)", r"(ld|atom)\S*(\.sys\.acquire|\.acquire\.sys)",
             "globaltimer", r"\btrap;")
    assert [bool(re.search(m, ptx)) for m in marks] == [peer] * 4
    sig = {n: "*fp32" for n in ("z_ptr", "scale_ptr", "base_ptr", "post_ptr", "m_ptr")}
    sig.update(eps="fp32")
    assert ("griddepcontrol" in _compile_sm90(triton_hc._hc_mix_kernel, sig,
                                              dict(NH=4, ITERS=20, PDL=pdl), 8)) == pdl
    sig = {n: "*fp32" for n in ("z_ptr", "scale_ptr", "base_ptr", "hc_ptr", "norm_ptr", "x_ptr",
                                "post_ptr", "m_ptr")}
    sig.update(stride_z="i32", E="i32", eps="fp32", rms_eps="fp32")
    const = dict(NH=4, ITERS=20, BE=4096 if one_pass else 64, ONE_PASS=one_pass, PDL=pdl)
    assert ("griddepcontrol" in _compile_sm90(triton_hc._hc_combine_kernel, sig, const, 8)) == pdl


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("qt,mode", [(IQ2_XXS, 2), (Q2_K, 0)], ids=["IQ2_XXS-swiglu", "Q2_K-slots"])
def test_experts_h16_kernel_compiles_for_sm90(qt, mode):
    """The float16 routed experts decoded in registers (Triton) compiled to PTX for an H100/H200,
    tensor-core dots included: what the CPU interpreter cannot check."""
    from ds4tp.kernels import triton_gemm as tg
    sig = dict(w_ptr="*u8", w2_ptr="*u8", stride_we="i64", stride_wn="i32", x_ptr="*fp16",
               stride_xt="i32", stride_xk="i32", tiles_ptr="*i32", pairs_ptr="*i32", rw_ptr="*fp32",
               out_ptr="*fp32", stride_op="i32", grid_ptr="*i64", N="i32", K="i32", KB="i32",
               clamp="fp32")
    ptx = _compile_sm90(tg._experts_h16_kernel, sig, dict(QT=qt, BN=64, TQ=64, MODE=mode), 4)
    assert "mma" in ptx


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("comp", [True, False])
def test_prefill_attention_compiles_for_sm90(comp):
    """A prefill's attention kernel at DS4's width and default launch shape compiled to PTX for
    an H100/H200 (tensor-core dots, the [BH, 512] accumulator): what the interpreter cannot check."""
    from ds4tp.kernels import triton_attn as ta
    sig = dict(q_ptr="*fp32", raw_ptr="*fp16", comp_ptr="*fp16", cmask_ptr="*u8", sink_ptr="*fp32",
               o_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32", H="i32", C="i32", raw_prev="i32",
               n_swa="i32", p0="i32", ratio="i32", cmask_stride="i32", scale="fp32")
    const = dict(D=512, BH=ta.PREFILL_BH, BN=ta.PREFILL_BN, BD=ta.PREFILL_BD, HAS_COMP=comp, NROT=64)
    assert "mma" in _compile_sm90(ta._prefill_attn_kernel, sig, const, ta.PREFILL_WARPS)


@needs_cuda
@pytest.mark.parametrize("be,mix", [(128, True), (64, True), (128, False)])
def test_cuda_hc_step_full_size(be, mix):
    kc.case_hc_step("cuda", torch.Generator().manual_seed(be), 4096, be, mix)


@needs_cuda
@pytest.mark.parametrize("spread", [0.3, 3.0, 30.0])
@pytest.mark.parametrize("F", [2048, 1024])
def test_cuda_hc_sinkhorn_riding_in_the_launches(F, spread):
    """The next HC update's Sinkhorn as one more block of attn_output_b's and the routed down's
    launches (TP=1 and TP=2 widths): outputs unchanged, post and M the bits of hc_mix's."""
    if not _have_cupy():
        pytest.skip("the CUDA C kernels need CuPy (pip install ds4tp[gpu])")
    kc.case_cuda_mix_ride("cuda", torch.Generator().manual_seed(F + int(spread)), 16, F, 4096, 6, spread)


@needs_cuda
@pytest.mark.parametrize("be", [128, 4096])
def test_cuda_hc_step_from_a_table_row_full_size(be):
    kc.case_hc_step_row("cuda", torch.Generator().manual_seed(be + 1), 4096, be)


@needs_cuda
@pytest.mark.parametrize("peer", [False, True])
def test_cuda_hc_step_head_full_size(peer):
    """The last update with the output head's mix at DS4's width (with the all-reduce inside:
    on one GPU paired with itself)."""
    kc.case_hc_step_head("cuda", torch.Generator().manual_seed(5), 4096, None, peer)


@needs_cuda
@pytest.mark.parametrize("be,mix", [(128, False), (4096, True)])
def test_cuda_hc_step_with_the_all_reduce_inside_on_one_gpu(be, mix):
    """hc_step's peer exchange on one GPU paired with itself (f + f), at DS4's width."""
    kc.case_hc_step_peer("cuda", torch.Generator().manual_seed(be), 4096, be, mix)


@needs_cuda
def test_cuda_peer_all_reduce_on_one_gpu():
    """ar2_sum (cuda_allreduce) on one GPU paired with itself: x + x = 2x exactly, over both
    slots, eager and replayed from a CUDA graph (two GPUs: tests/test_tp.py, against NCCL)."""
    from ds4tp.kernels.cuda_allreduce import PeerAllReduce
    lb = PeerAllReduce.loopback(torch.device("cuda"))
    if lb.fn is None:
        pytest.skip("allreduce.cu did not compile (no CuPy)")
    g = torch.Generator(device="cuda").manual_seed(3)
    for n in (4, 4096, 65536, 4097 * 4):
        x = torch.randn(n, generator=g, device="cuda")
        assert torch.equal(lb.all_reduce(x.clone()), 2 * x), n
    x = torch.zeros(4096, device="cuda")
    y = lb.all_reduce(x.tanh())                      # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lb.all_reduce(x.tanh())
    for _ in range(5):
        x.copy_(torch.randn(4096, generator=g, device="cuda"))
        graph.replay()
        assert torch.equal(y, 2 * x.tanh())
    assert int(lb.ctr.item()) == 4 + 1 + 5         # eager calls, warm-up, replays (not the capture)


@needs_cuda
def test_cuda_linear_normed_q_b():
    """attn_q_b (32768 x 1024) with the q_a norm in the prologue."""
    kc.case_linear_normed("cuda", torch.Generator().manual_seed(5), 32768, 1024)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_decode_kernel_argument_errors():
    """The decode kernels' entry points reject mismatched inputs with a message naming the
    argument, before anything is launched (so this runs on CPU)."""
    from ds4tp.config import F16, Q8_0
    from ds4tp.kernels import triton_attn, triton_hc, triton_matvec as tm
    g = torch.Generator().manual_seed(0)
    D, n_swa, H = 128, 8, 3
    ring, rpos = torch.zeros(n_swa, D), torch.zeros(n_swa, dtype=torch.long)
    cos = sin = torch.zeros(10, 32)
    pos = torch.zeros(1, dtype=torch.long)
    sinks = torch.zeros(H)
    with pytest.raises(ValueError, match="attention: q"):
        triton_attn.attention(torch.zeros(1, H * D + 1), ring, rpos, None, 0, None, sinks, cos, sin, pos, 1e-6)
    with pytest.raises(ValueError, match="row mask or row list without compressed rows"):
        triton_attn.attention(torch.zeros(1, H * D), ring, rpos, None, 0,
                              torch.zeros(1, 4, dtype=torch.bool), sinks, cos, sin, pos, 1e-6)
    with pytest.raises(ValueError, match="row mask or row list without compressed rows"):
        triton_attn.attention(torch.zeros(1, H * D), ring, rpos, None, 0, None, sinks, cos, sin, pos,
                              1e-6, rows=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="selected rows must be a contiguous non-empty int32"):
        triton_attn.attention(torch.zeros(1, H * D), ring, rpos, torch.zeros(4, D), 4, None, sinks,
                              cos, sin, pos, 1e-6, rows=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="RoPE tables"):
        triton_attn.attention(torch.zeros(1, H * D), ring, rpos, None, 0, None, sinks,
                              torch.zeros(10, 16), sin, pos, 1e-6)
    with pytest.raises(ValueError, match="compression ratio 0"):
        triton_attn.attention(torch.zeros(1, H * D), ring, rpos, torch.zeros(4, D), 0, None, sinks,
                              cos, sin, pos, 1e-6)
    with pytest.raises(ValueError, match="kv_store: ring positions"):
        triton_attn.kv_store(torch.zeros(1, D), torch.ones(D), cos, sin, pos, ring,
                             torch.zeros(n_swa, dtype=torch.int32), 1e-6)
    with pytest.raises(ValueError, match="position"):
        triton_attn.kv_store(torch.zeros(1, D), torch.ones(D), cos, sin, torch.zeros(2, dtype=torch.long),
                             ring, rpos, 1e-6)
    w = kc.rand_weight(F16, (16, 64), g)
    with pytest.raises(ValueError, match="compressor_step: gate weight bytes"):
        triton_attn.compressor_step(torch.zeros(1, 64), w.raw, w.raw[:8], torch.zeros(4, 16), pos,
                                    torch.zeros(8, 16), torch.zeros(8, 16))
    with pytest.raises(ValueError, match="compressor_step: frontier kv"):
        triton_attn.compressor_step(torch.zeros(1, 64), w.raw, w.raw, torch.zeros(4, 16), pos,
                                    torch.zeros(4, 16), torch.zeros(8, 16))
    pair = (w.raw, w.raw, torch.zeros(4, 16), torch.zeros(8, 16), torch.zeros(8, 16))
    with pytest.raises(ValueError, match="compressor_pair: ratios 4 and 128 differ"):
        triton_attn.compressor_pair(torch.zeros(1, 64), pair, (w.raw, w.raw, torch.zeros(128, 16),
                                    torch.zeros(128, 16), torch.zeros(128, 16)), pos)
    with pytest.raises(ValueError, match="compressor_step: frontier gate"):
        triton_attn.compressor_pair(torch.zeros(1, 64), pair, pair[:4] + (torch.zeros(4, 16),), pos)
    with pytest.raises(ValueError, match="compressor_emit: frontier gate"):
        triton_attn.compressor_emit(torch.zeros(8, 256), torch.zeros(4, 256), torch.ones(128), cos,
                                    sin, pos, torch.zeros(4, 128), False, 1e-6)
    with pytest.raises(ValueError, match="row width 96"):
        triton_attn.compressor_emit(torch.zeros(8, 192), torch.zeros(8, 192), torch.ones(96), cos,
                                    sin, pos, torch.zeros(4, 96), False, 1e-6)
    with pytest.raises(ValueError, match="one token's float32 streams"):
        triton_hc.hc_logits(torch.zeros(2, 4, 16), w.raw, 1e-6)
    with pytest.raises(ValueError, match="do not match 64 inputs"):
        triton_hc.hc_logits(torch.zeros(1, 4, 16), w.raw[:, :64], 1e-6)
    q = kc.rand_weight(Q8_0, (16, 64), g)
    with pytest.raises(ValueError, match="linear_normed: norm weight"):
        tm.linear_normed(q, torch.zeros(1, 64), torch.ones(32), 1e-6)
    assert tm.linear_normed(w, torch.zeros(1, 64), torch.ones(64), 1e-6) is None      # F16: twin
    assert tm.linear_normed(q, torch.zeros(2, 64), torch.ones(64), 1e-6) is None      # 2 tokens: twin


@needs_cuda
@pytest.mark.parametrize("hashed,bias,T", [(False, True, 1), (True, False, 1), (False, True, 2048),
                                            (True, False, 300)])
def test_cuda_route_full_size(hashed, bias, T):
    """256 experts, 6 chosen, as DS4 (hash layers: tid2eid), for a decode token and a prefill."""
    kc.case_route("cuda", torch.Generator().manual_seed(3 + hashed), 256, 6, hashed, bias, T)


@needs_cuda
@pytest.mark.parametrize("T,K,E,tq", [(2048, 6, 256, None), (2048, 6, 256, 64), (1024, 6, 128, None)])
def test_cuda_expert_tiles_kernel_full_size(T, K, E, tq):
    """The expert tile table's Triton kernel against the torch twin at a prefill's size, with ids
    >= E and without; and the dispatcher takes the kernel on CUDA."""
    from ds4tp.kernels import triton_gemm as tg
    g = torch.Generator().manual_seed(T + E)
    kc.case_expert_tiles_kernel("cuda", g, T, K, E, tq)
    kc.case_expert_tiles_kernel("cuda", g, T, K, E, tq, True)
    ids = kc.rand_ids(T, K, E, g, "cuda").int()
    got, want = tg.expert_tiles_device(ids, E, tq), tg.expert_tiles_device_torch(ids, E, tq)
    assert all(torch.equal(a, b) for a, b in zip(got[:2], want[:2])) and got[2] == want[2]


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("ids_type", ["*i64", "*i32"])
def test_expert_tiles_kernel_compiles_for_sm90(ids_type):
    """The expert tile table's kernel compiled to PTX for an H100/H200 (the CPU interpreter runs
    Python semantics and misses what only the compiler rejects), int64 and int32 ids."""
    from ds4tp.kernels import triton_gemm as tg
    sig = dict(vals_ptr=ids_type, order_ptr="*i64", pairs_ptr="*i32", tiles_ptr="*i32", P="i32",
               M="i32", n_expert="i32", tq="i32", n_iter="i32")
    ptx = _compile_sm90(tg._expert_tiles_kernel, sig, dict(EB=256, BM=32, BP=4096), 4)
    assert ".entry" in ptx


def test_triton_defaults_fill_only_what_is_unset():
    """FP fusion pinned on (Triton 3.10 turns its default off) unless the environment says."""
    from ds4tp.kernels import triton_defaults
    env = {}
    assert triton_defaults(env) == {"TRITON_DEFAULT_FP_FUSION": "1"} == env
    env = {"TRITON_DEFAULT_FP_FUSION": "0"}
    assert triton_defaults(env) == {"TRITON_DEFAULT_FP_FUSION": "0"}


def test_pin_compile_cache_sets_one_directory_and_keeps_a_given_one(tmp_path):
    """The CLI pins TRITON_CACHE_DIR before anything compiles (torch.compile would otherwise
    repoint it mid-run); a directory the environment already names is kept."""
    from ds4tp.kernels import pin_compile_cache
    env = {"TRITON_HOME": str(tmp_path)}
    assert pin_compile_cache(env) == str(tmp_path / ".triton" / "cache") == env["TRITON_CACHE_DIR"]
    env = {"TRITON_CACHE_DIR": "/somewhere/else"}
    assert pin_compile_cache(env) == "/somewhere/else" == env["TRITON_CACHE_DIR"]
    env = {}
    assert pin_compile_cache(env) == os.path.join(os.path.expanduser("~"), ".triton", "cache")


def test_cli_pins_the_compile_cache_for_its_children():
    """`ds4tp` (here: `ds4tp plan`, which compiles nothing) runs with TRITON_CACHE_DIR set, so
    the workers and the gateway that `ds4tp launch` starts inherit it."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_CACHE_DIR", "TRITON_HOME")}
    code = ("import os, sys; from ds4tp import cli; cli.main(['plan', '--preset', 'tiny', '--json']);"
            "print('DIR=' + os.environ.get('TRITON_CACHE_DIR', ''), file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert "DIR=" + os.path.join(os.path.expanduser("~"), ".triton", "cache") in r.stderr
