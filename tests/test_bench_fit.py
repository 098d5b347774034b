"""The bench's split of each weight kernel's time into a part per byte and a fixed part
(ds4tp.bench.streaming_fit) and the Spark projection built on it, on made-up profiles whose
answer is known; and the table of which weights each kernel streams, against the real plan."""
from __future__ import annotations

import pytest

from ds4tp import bench
from ds4tp import config as C
from ds4tp.shard.plan import make_plan


def _run(kbytes: dict, fixed_us: dict, rate_GBs: dict, copy=4000.0, launches=43, extra=None):
    kernels = {k: {"us": fixed_us[k] + kbytes[k] / (rate_GBs[k] * 1e3), "n": launches, "weights": True}
               for k in kbytes}
    return {"copy_bw_GBs": copy, "profile": {"kernels": {**kernels, **(extra or {})}}}


def test_kernel_weights_name_real_tensors():
    """Every weight name in the table is a tensor of the full model, and the table covers all
    of a rank's bytes but the HC mixers' and the norms' (which no weight kernel streams)."""
    for world in (1, 2):
        plan = make_plan(C.FULL, world)
        names = {t.name.split(".", 2)[-1].removesuffix(".weight") if t.name.startswith("blk.")
                 else t.name.removesuffix(".weight") for t in plan.tensors}
        for k, ws in bench.KERNEL_WEIGHTS.items():
            assert set(ws) <= names, (k, set(ws) - names)
        kb = bench.kernel_bytes(plan, 0)
        assert all(v > 0 for v in kb.values()), kb
        left = plan.token_bytes(0) - sum(kb.values())
        assert 0 < left < 0.02 * plan.token_bytes(0), left


def test_streaming_fit_recovers_rates_and_fixed_time():
    b2 = bench.kernel_bytes(make_plan(C.FULL, 2), 0)
    b1 = bench.kernel_bytes(make_plan(C.FULL, 1), 0)
    fixed = {k: 100.0 + 10 * i for i, k in enumerate(b2)}
    rate = {k: 1500.0 + 500 * i for i, k in enumerate(b2)}
    fit = bench.streaming_fit(_run(b2, fixed, rate), _run(b1, fixed, rate), b2, b1)
    for k, row in fit["kernels"].items():
        if b2[k] == b1[k]:                 # the replicated router: nothing to fit
            assert row["fit"] is None
            continue
        assert row["rate_GBs"] == pytest.approx(rate[k], rel=1e-4)
        assert row["fixed_us"] == pytest.approx(fixed[k], rel=1e-4)
        assert row["fraction_of_copy"] == pytest.approx(rate[k] / 4000.0, rel=1e-4)
    fitted = [k for k in b2 if b2[k] != b1[k]]
    want = sum(b2[k] for k in fitted) / sum(b2[k] / (rate[k] * 1e9) for k in fitted) / 4e12
    assert fit["streaming_fraction"] == pytest.approx(want, rel=1e-4)
    assert fit["fitted_bytes"] == sum(b2[k] for k in fitted)


def test_streaming_fit_drops_rates_above_copy_and_missing_kernels():
    b2 = {"q8_0_matvec": 1e9, "iq2xxs_swiglu": 5e8}
    b1 = {"q8_0_matvec": 2e9, "iq2xxs_swiglu": 1e9}
    fixed = {"q8_0_matvec": 50.0, "iq2xxs_swiglu": 80.0}
    r2 = _run(b2, fixed, {"q8_0_matvec": 3000.0, "iq2xxs_swiglu": 9000.0})   # 9000 > copy: noise
    r1 = _run(b1, fixed, {"q8_0_matvec": 3000.0, "iq2xxs_swiglu": 9000.0})
    full2 = dict.fromkeys(bench.KERNEL_WEIGHTS, 0) | b2
    full1 = dict.fromkeys(bench.KERNEL_WEIGHTS, 0) | b1
    fit = bench.streaming_fit(r2, r1, full2, full1)
    assert fit["kernels"]["iq2xxs_swiglu"]["fit"] is None
    assert set(fit["kernels"]) == {"q8_0_matvec", "iq2xxs_swiglu"}    # the rest not profiled
    assert fit["streaming_fraction"] == pytest.approx(3000 / 4000, rel=1e-4)


def test_spark_projection_fit_is_the_formula_with_the_fitted_pieces():
    fit = {"streaming_fraction": 0.7}
    run = {"bytes_per_token": 4.8e9, "copy_bw_GBs": 4000.0, "decode_d0_nocomm": {"ms_per_token": 3.5},
           "collectives": {"n_all_reduce": 86}, "compressor_gathers_per_token": 5.4}
    p = bench.spark_projection_fit(run, fit)
    streaming = 4.8e9 / (0.7 * 4e12)
    assert p["h200_streaming_ms"] == pytest.approx(1e3 * streaming)
    assert p["fixed_overhead_ms"] == pytest.approx(3.5 - 1e3 * streaming)
    t = 4.8e9 / (0.7 * 230e9) + 92.4 * 31e-6 + (3.5e-3 - streaming)
    assert p["tok_s"] == pytest.approx(1 / t)
    assert bench.spark_projection_fit(run, {"streaming_fraction": None}) is None


def test_fit_runs_on_a_recorded_result_shape():
    """fit_runs fills both entries only when the result holds TP=2 and TP=1 profiles."""
    b2 = bench.kernel_bytes(make_plan(C.FULL, 2), 0)
    b1 = bench.kernel_bytes(make_plan(C.FULL, 1), 0)
    fixed = dict.fromkeys(b2, 100.0)
    rate = dict.fromkeys(b2, 2500.0)
    r2 = _run(b2, fixed, rate) | {"bytes_per_token": 4.82e9, "decode_d0_nocomm": {"ms_per_token": 3.4},
                                  "collectives": {"n_all_reduce": 86}}
    out = {"shape": {"n_layer": C.FULL.n_layer}, "cfg": {"split_compressors": True},
           "runs": {"tp2": r2}}
    bench.fit_runs(out)
    assert "streaming_fit" not in out
    out["runs"]["tp1"] = _run(b1, fixed, rate)
    bench.fit_runs(out)
    assert out["streaming_fit"]["streaming_fraction"] == pytest.approx(2500 / 4000, rel=1e-4)
    assert out["spark_projection_fit"]["achieved_fraction"] == pytest.approx(2500 / 4000, rel=1e-4)


def test_streaming_fit_many_three_sizes_and_residual():
    """Three TP sizes on one line recover rate and fixed time with no residual; one point off
    the line shows up as the largest residual (and moves the fit)."""
    kbs = [bench.kernel_bytes(make_plan(C.FULL, w), 0) for w in (2, 1, 4)]
    fixed = {k: 200.0 + 5 * i for i, k in enumerate(kbs[0])}
    rate = {k: 2000.0 + 300 * i for i, k in enumerate(kbs[0])}
    runs = [_run(kb, fixed, rate, copy=4000.0 + i) for i, kb in enumerate(kbs)]
    fit = bench.streaming_fit_many(runs, kbs, "three sizes")
    assert fit["copy_GBs"] == pytest.approx(4001.0)
    for k, row in fit["kernels"].items():
        if kbs[0][k] == kbs[1][k]:
            assert row["fit"] is None
            continue
        assert row["rate_GBs"] == pytest.approx(rate[k], rel=1e-6)
        assert row["fixed_us"] == pytest.approx(fixed[k], rel=1e-6)
        assert row["max_residual_us"] == pytest.approx(0.0, abs=1e-6)
    runs[2]["profile"]["kernels"]["q8_0_matvec"]["us"] += 30.0
    row = bench.streaming_fit_many(runs, kbs, "three sizes")["kernels"]["q8_0_matvec"]
    assert 10.0 < row["max_residual_us"] < 30.0
    assert row["rate_GBs"] != pytest.approx(rate["q8_0_matvec"], rel=1e-3)


def test_line_fit():
    a, b, r = bench.line_fit([1.0, 2.0, 3.0], [3.0, 5.0, 7.0])
    assert (a, b, r) == pytest.approx((1.0, 2.0, 0.0))
    a, b, r = bench.line_fit([0.0, 1.0, 2.0], [0.0, 2.0, 1.0])
    assert b == pytest.approx(0.5) and a == pytest.approx(0.5) and r == pytest.approx(1.0)


def test_kernel_time_sums_aliases():
    """A ratio-4 layer's two compressors in one launch (_comp_pair_kernel) count with the
    compressor steps of the other layers under one key; missing kernels give None."""
    ks = {"_comp_step_kernel": {"us": 100.0, "n": 20}, "_comp_pair_kernel": {"us": 90.0, "n": 21}}
    assert bench.kernel_time(ks, "_comp_step_kernel") == {"us": 190.0, "n": 41}
    assert bench.kernel_time({"_comp_step_kernel": {"us": 5.0, "n": 2}}, "_comp_step_kernel") == {"us": 5.0, "n": 2}
    assert bench.kernel_time(ks, "q8_0_matvec") is None
