"""Each weight kernel's time split into a part per byte and a fixed part, from a recorded
`ds4tp bench --tp 2,1` result (its TP=2 and TP=1 eager profiles), and the Spark projection with
that split (ds4tp.bench.streaming_fit, spark_projection_fit). Needs no GPU:

    python bench/streaming_fit.py bench/results/bench_h200x2_s32_a_20261201.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="bench JSON files with tp2 and tp1 runs")
    a = ap.parse_args()
    from ds4tp.bench import fit_runs
    for path in a.results:
        out = json.load(open(path))
        fit_runs(out)
        if "streaming_fit" not in out:
            print(f"{path}: needs TP=2 and TP=1 runs with profiles")
            continue
        fit, proj = out["streaming_fit"], out.get("spark_projection_fit")
        print(f"{path} (copy {fit['copy_GBs']:.0f} GB/s)")
        print(f"  {'kernel':18s} {'launches':>8s} {'MB tp2/tp1':>15s} {'us tp2/tp1':>15s} "
              f"{'GB/s':>7s} {'of copy':>7s} {'fixed us':>9s} {'/launch':>8s}")
        for k, r in fit["kernels"].items():
            mb = f"{r['bytes'][0] / 1e6:.0f}/{r['bytes'][1] / 1e6:.0f}"
            us = f"{r['us'][0]:.0f}/{r['us'][1]:.0f}"
            if r["fit"]:
                print(f"  {k:18s} {r['launches']:8d} {mb:>15s} {us:>15s} {r['rate_GBs']:7.0f} "
                      f"{r['fraction_of_copy']:7.3f} {r['fixed_us']:9.1f} {r['fixed_us_per_launch']:8.2f}")
            else:
                print(f"  {k:18s} {r['launches']:8d} {mb:>15s} {us:>15s}  (no fit: the same bytes at both sizes, or a rate above copy)")
        print(f"  streaming fraction over the fitted kernels' {fit['fitted_bytes'] / 1e9:.3f} GB: "
              f"{fit['streaming_fraction']:.3f}")
        if proj:
            orig = out["runs"]["tp2"].get("spark_projection") or {}
            print(f"  TP=2: streaming {proj['h200_streaming_ms']:.2f} ms + fixed "
                  f"{proj['fixed_overhead_ms']:.2f} ms of the step without collectives")
            print(f"  Spark projection with the fit: {proj['tok_s']:.1f} tok/s ({proj['ms_per_token']:.1f} ms:"
                  f" fraction {proj['achieved_fraction']:.3f}, fixed {proj['fixed_overhead_ms']:.2f} ms,"
                  f" {proj['collectives']:.1f} collectives); the run's own: "
                  f"{orig.get('tok_s', float('nan')):.1f} (fraction {orig.get('achieved_fraction', float('nan')):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
