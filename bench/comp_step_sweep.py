"""Launch shapes of the decode compressor step (triton_attn.compressor_step: two F16
projections [W, 4096] against one token, into the frontier) at DS4's widths, graph-timed over
enough weight copies that L2 holds none of them between launches.

The bench's per-kernel profile (fifteenth session) put this launch at 462 us of a TP=2 rank's
eager step for 0.30 GB: 0.66 TB/s, the slowest weight stream of the step. Each shape is timed
at the default launch and a grid of (rows per program, columns per step, warps); every result
is checked against decode_graph.compressor_step_torch.

--pairs: a ratio-4 layer's two compressor steps (attention's, indexer's) at a TP=2 rank's and
the whole widths, as two launches (the defaults) and as one (triton_attn.compressor_pair) at
its default and a grid of (rows per program of each, columns per step, warps).

    python bench/comp_step_sweep.py --out comp_step.json [--pairs]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (name, ratio, W): W = rows of each projection on a rank (kv rows = gate rows)
SHAPES = [("ratio-4 kv, TP=2 share", 4, 512), ("ratio-4 indexer, TP=2 share", 4, 128),
          ("ratio-128 kv, TP=2 share", 128, 256), ("ratio-4 kv, whole", 4, 1024),
          ("ratio-4 indexer, whole", 4, 256), ("ratio-128 kv, whole", 128, 512)]
E = 4096


def _timed(results: list, name: str, cfg, run, pairs: list, copies: int, nbytes: int, **keys) -> None:
    """One launch shape: run(0) once, its outputs checked against the twin's (pairs of (got,
    want)), then graph-timed over the weight copies (run(i)); appended to results. A shape
    Triton rejects (registers, shared memory) is printed and left out."""
    from profile_common import graph_us
    try:
        run(0)
        torch.cuda.synchronize()
        err = max(float((a - b).abs().max() / b.abs().max()) for a, b in pairs)
        us = graph_us(run, copies, 20)
    except Exception as e:
        print(f"{name:28s} {str(cfg):20s} failed: {str(e)[:80]}")
        return
    rec = {"shape": name, **keys, "cfg": cfg, "us": us, "GBps": nbytes / us / 1e3, "rel_err": err,
           "ok": err < 1e-5}
    results.append(rec)
    print(f"{name:28s} {str(cfg):20s} {us:7.2f} us {rec['GBps']:7.0f} GB/s err {err:.1e}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--pairs", action="store_true")
    a = ap.parse_args()
    if a.pairs:
        return pairs(a.out)
    import kernel_cases as kc
    from profile_common import finish
    from ds4tp.config import F16
    from ds4tp.decode_graph import compressor_step_torch
    from ds4tp.kernels import triton_attn
    from ds4tp.model import CompressorWeights
    g = torch.Generator().manual_seed(0)
    results = []
    for name, r, W in SHAPES:
        nbytes = 2 * W * E * 2
        copies = max(2, -(-(200 << 20) // nbytes))          # > 200 MB of weights in the loop
        ws = [(kc.rand_weight(F16, (W, E), g, "cuda"), kc.rand_weight(F16, (W, E), g, "cuda"))
              for _ in range(copies)]
        ape = torch.randn(r, W, generator=g).cuda()
        x = torch.randn(1, E, generator=g).cuda()
        rows = 8 if r == 4 else r
        pos = torch.tensor([1234], device="cuda")
        fronts = [torch.zeros(rows, W, device="cuda") for _ in range(2)]
        cw = CompressorWeights(r, ape, ws[0][0], ws[0][1], torch.ones(W, device="cuda"))
        want = [torch.zeros(rows, W, device="cuda") for _ in range(2)]
        compressor_step_torch(cw, x, pos, *want)
        cfgs = [None] + list(itertools.product((1, 2, 4, 8), (1024, 2048, 4096), (4, 8, 16)))
        for cfg in cfgs:
            if cfg is not None and cfg[0] * cfg[1] > 16384:
                continue
            for f in fronts:
                f.zero_()
            _timed(results, name, cfg, lambda i, c=cfg: triton_attn.compressor_step(
                       x, ws[i][0].raw, ws[i][1].raw, ape, pos, *fronts, launch=c),
                   list(zip(fronts, want)), copies, nbytes, ratio=r, W=W)
        best = min((x for x in results if x["shape"] == name and x["ok"]), key=lambda x: x["us"])
        default = next(x for x in results if x["shape"] == name and x["cfg"] is None)
        print(f"== {name}: default {default['us']:.2f} us, best {best['us']:.2f} us at {best['cfg']}")
        ws = None
        torch.cuda.empty_cache()
    return finish(a.out, results)


PAIRS = [("ratio-4 pair, TP=2 share", 512, 128), ("ratio-4 pair, whole", 1024, 256)]


def pairs(out) -> int:
    from profile_common import finish
    from ds4tp.decode_graph import compressor_step_torch
    from ds4tp.kernels import triton_attn
    from ds4tp.config import F16
    import kernel_cases as kc
    from ds4tp.model import CompressorWeights
    g = torch.Generator().manual_seed(0)
    results = []
    for name, WA, WB in PAIRS:
        nbytes = 2 * (WA + WB) * E * 2
        copies = max(2, -(-(200 << 20) // nbytes))
        ws = [[(kc.rand_weight(F16, (W, E), g, "cuda"), kc.rand_weight(F16, (W, E), g, "cuda"))
               for W in (WA, WB)] for _ in range(copies)]
        apes = [torch.randn(4, W, generator=g).cuda() for W in (WA, WB)]
        x = torch.randn(1, E, generator=g).cuda()
        pos = torch.tensor([1234], device="cuda")
        fronts = [(torch.zeros(8, W, device="cuda"), torch.zeros(8, W, device="cuda")) for W in (WA, WB)]
        want = [(torch.zeros(8, W, device="cuda"), torch.zeros(8, W, device="cuda")) for W in (WA, WB)]
        for (wk, wg), ape, wt, W in zip(ws[0], apes, want, (WA, WB)):
            compressor_step_torch(CompressorWeights(4, ape, wk, wg, torch.ones(W, device="cuda")), x, pos, *wt)

        def args(i, j):
            return (ws[i][j][0].raw, ws[i][j][1].raw, apes[j], *fronts[j])

        def two(i):
            for j in range(2):
                triton_attn.compressor_step(x, *args(i, j)[:3], pos, *fronts[j])

        cfgs = ["two launches", None] + list(itertools.product((1, 2, 4), (1, 2), (2048, 4096), (4, 8, 16)))
        for cfg in cfgs:
            if cfg not in ("two launches", None) and cfg[0] * cfg[2] > 16384:
                continue
            for f in fronts:
                for t in f:
                    t.zero_()
            run = two if cfg == "two launches" else \
                (lambda i, c=cfg: triton_attn.compressor_pair(x, args(i, 0), args(i, 1), pos, launch=c))
            _timed(results, name, cfg, run, [p for fg, fw in zip(fronts, want) for p in zip(fg, fw)],
                   copies, nbytes, WA=WA, WB=WB)
        mine = [r for r in results if r["shape"] == name]
        best = min((r for r in mine if r["ok"] and r["cfg"] != "two launches"), key=lambda r: r["us"])
        print(f"== {name}: two launches {mine[0]['us']:.2f} us, pair default {mine[1]['us']:.2f} us, "
              f"best pair {best['us']:.2f} us at {best['cfg']}")
        ws = None
        torch.cuda.empty_cache()
    return finish(out, results)


if __name__ == "__main__":
    sys.exit(main())
