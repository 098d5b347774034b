"""Each weight kernel's time split into a part per byte and a fixed part, fitted over three rank
widths on one GPU: the full model's rank 0 at TP=2, 1 and 4 (the collectives removed,
bench.NullComm), so one GPU gives three points on each kernel's line where a TP=2,1 bench run
gives two (ds4tp.bench.streaming_fit; the thirtieth session found that two-point fit noisy:
0.700-0.753 over four runs). Per width: the copy bandwidth, the eager profile (PDL off) and the
graph-replayed step (plain and chained). Then:

  per kernel   least squares of its eager time against the bytes it streams
               (bench.streaming_fit_many): rate, fixed time, and the largest residual, which
               says whether one line holds at all three widths;
  whole step   least squares of the replayed step against the rank's bytes: its slope is
               what a byte costs the step as the graphs run it, its intercept the step's time
               with no bytes. The attention's and other per-head work shrinks with the width
               too, so the slope takes in some of that (an upper bound on the cost per byte);
  projection   the issue's Spark formula (bench.spark_projection_fit) at the TP=2 width with
               each fit's fraction and fixed time.

    python bench/streaming_sizes.py --out sizes.json [--worlds 2,1,4] [--steps 64] [--layers N]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--worlds", default="2,1,4", help="rank widths; the first is the projection's")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--layers", type=int, default=None)
    a = ap.parse_args()
    import torch
    from ds4tp import bench, config as C
    worlds = [int(w) for w in a.worlds.split(",")]
    if len(worlds) < 2:
        ap.error("--worlds needs at least two widths")
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    shape = C.Shape(n_layer=a.layers) if a.layers else C.FULL
    out = {"device": torch.cuda.get_device_name(dev), "n_layer": shape.n_layer, "worlds": worlds,
           "runs": []}

    def save():
        if a.out:
            with open(a.out, "w") as f:
                json.dump(out, f, indent=1)

    # the copy bandwidth every fraction is taken of: measured on the bare GPU before any model
    # (s33a measured it before each width instead: 4,300 GB/s first, 3,847 and 3,842 after a
    # model had been built and freed; each width's own figure is kept as copy_bw_GBs_here)
    out["copy_bw_GBs_bare"] = [bench.copy_bandwidth(dev) / 1e9 for _ in range(3)]
    ref_copy = max(out["copy_bw_GBs_bare"])
    kbs = []
    for w in worlds:
        res = {"world": w, "copy_bw_GBs": ref_copy, "copy_bw_GBs_here": bench.copy_bandwidth(dev) / 1e9,
               "memory_reserved_GB_before": torch.cuda.memory_reserved(dev) / 1e9}
        t = time.perf_counter()
        model = bench.build_model(shape, 0, w, bench.NullComm(0, w), dev)
        torch.cuda.synchronize()
        res["build_s"] = time.perf_counter() - t
        res["bytes_per_token"] = model.plan.token_bytes(0)
        res["kernel_bytes"] = bench.kernel_bytes(model.plan, 0)
        res["collectives"] = {"n_all_reduce": bench.all_reduces_per_token(shape)}   # (at TP > 1)
        res["compressor_gathers_per_token"] = bench.compressor_gathers_per_token(model.plan)
        res["profile"] = bench.profile_split(model)
        res["decode_d0_nocomm"] = bench.time_decode(model, 1, a.steps, max_ctx=256)
        res["decode_d0_nocomm_chained"] = bench.time_decode(model, 1, a.steps, max_ctx=256, chained=True)
        kbs.append(res["kernel_bytes"])
        out["runs"].append(res)
        print(f"world {w}: {res['bytes_per_token'] / 1e9:.3f} GB a token, copy here {res['copy_bw_GBs_here']:.0f} GB/s "
              f"({res['memory_reserved_GB_before']:.1f} GB reserved before), "
              f"step {res['decode_d0_nocomm']['ms_per_token']:.3f} ms "
              f"(chained {res['decode_d0_nocomm_chained']['ms_per_token']:.3f}), eager weight kernels "
              f"{res['profile']['matvec_ms']:.3f} ms + other {res['profile']['other_gpu_ms']:.3f} ms", flush=True)
        save()
        del model
        gc.collect()
        torch.cuda.empty_cache()

    runs = out["runs"]
    fit = bench.streaming_fit_many(runs, kbs, f"least squares per kernel over TP widths {worlds} "
                                   "(rank 0, collectives removed, eager profile with PDL off), one GPU")
    out["streaming_fit"] = fit
    copy = fit["copy_GBs"]
    print(f"per kernel (copy {copy:.0f} GB/s on the bare GPU; there {out['copy_bw_GBs_bare']}):")
    for k, r in fit["kernels"].items():
        mb = "/".join(f"{b / 1e6:.0f}" for b in r["bytes"])
        us = "/".join(f"{u:.0f}" for u in r["us"])
        if r["fit"]:
            print(f"  {k:18s} {r['launches']:4d} launches, MB {mb}, us {us}: {r['rate_GBs']:.0f} GB/s "
                  f"({r['fraction_of_copy']:.3f} of copy), fixed {r['fixed_us']:.1f} us "
                  f"({r['fixed_us_per_launch']:.2f} a launch), largest residual "
                  f"{r.get('max_residual_us', 0.0):.1f} us")
        else:
            print(f"  {k:18s} {r['launches']:4d} launches, MB {mb}, us {us}: no fit")
    print(f"  streaming fraction (weighed by the TP={worlds[0]} bytes): {fit['streaming_fraction']:.3f}")
    steps = {}
    for key in ("decode_d0_nocomm", "decode_d0_nocomm_chained"):
        xs = [r["bytes_per_token"] for r in runs]
        ys = [r[key]["ms_per_token"] for r in runs]
        fixed_ms, ms_per_byte, resid = bench.line_fit(xs, ys)
        rate = 1e3 / ms_per_byte if ms_per_byte > 0 else None
        steps[key] = {"fixed_ms": fixed_ms, "rate_GBs": rate / 1e9 if rate else None,
                      "fraction_of_copy": rate / (copy * 1e9) if rate else None,
                      "max_residual_ms": resid}
        print(f"  whole step ({key}): {fixed_ms:.3f} ms with no bytes, "
              f"{(rate or 0) / 1e9:.0f} GB/s a byte ({steps[key]['fraction_of_copy'] or 0:.3f} of copy), "
              f"largest residual {resid:.3f} ms")
    out["step_fit"] = steps
    ref = runs[0]
    proj = {"per_kernel": bench.spark_projection_fit(ref, fit)}
    for key, sf in steps.items():
        if sf["fraction_of_copy"]:
            proj[f"step_{key}"] = {"achieved_fraction": sf["fraction_of_copy"], "fixed_overhead_ms": sf["fixed_ms"],
                                   **bench.spark_token(ref, sf["fraction_of_copy"], sf["fixed_ms"] / 1e3)}
    out["spark_projection"] = proj
    for k, p in proj.items():
        if p:
            print(f"  Spark projection at TP={worlds[0]} ({k}): {p['tok_s']:.1f} tok/s "
                  f"(fraction {p['achieved_fraction']:.3f}, fixed {p['fixed_overhead_ms']:.2f} ms, "
                  f"{p['collectives']:.1f} collectives)")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
