"""Does programmatic dependent launch (PDL) work here, inside a CUDA graph, and what does it buy?

    python bench/pdl_probe.py [--layers 16] [--out pdl_probe.json]

Builds the Q8_0 projections of `--layers` decode layers at full DS4 width (random valid blocks,
distinct per layer, so nothing is served from L2), runs them as one chain of one-token matvecs
(each reads the previous output where the shapes allow, like a layer's q/kv -> q_b -> output
projections -> shared expert), and reports for the chain replayed from a CUDA graph, with and
without PDL: microseconds per launch and whether the outputs are bit-identical. Exit status 1
when PDL changes any output.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ds4tp import kernels  # noqa: E402
from ds4tp.config import Q8_0  # noqa: E402
from ds4tp.kernels import triton_matvec as tm  # noqa: E402

import kernel_cases as kc  # noqa: E402

# (out, in, groups) of a layer's Q8_0 one-token matvecs, in decode order (TP=1)
LAYER = [(1536, 4096, 1), (32768, 1024, 1), (8192, 32768, 8), (4096, 8192, 1),
         (4096, 4096, 1), (4096, 2048, 1)]


def build(layers: int, dev):
    g = torch.Generator(device="cpu").manual_seed(0)
    ws = []
    for _ in range(layers):
        for n_out, n_in, groups in LAYER:
            w = kc.rand_weight(Q8_0, (n_out, n_in // groups), g, device=dev)
            tm.q8_0_split(w)
            ws.append((w, groups))
    return ws


def chain(ws, x0):
    x = x0
    outs = []
    for w, groups in ws:
        n_out, n_in = w.shape
        need = n_in * groups
        inp = x[:, :need] if x.shape[1] >= need else x0[:, :need]
        y = tm.linear(w, inp.contiguous(), groups=groups)
        outs.append(y)
        x = y * (1.0 / 64)
    return outs


def graph_us(fn, reps=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            out = fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    return times[len(times) // 2], [o.clone() for o in out]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    dev = torch.device("cuda")
    ws = build(a.layers, dev)
    x0 = torch.randn(1, 32768, device=dev)
    res = {"layers": a.layers, "launches": len(ws),
           "weight_bytes": sum(w.nbytes for w, _ in ws)}
    with kernels.no_pdl():
        t_off, out_off = graph_us(lambda: chain(ws, x0))
    t_on, out_on = graph_us(lambda: chain(ws, x0))
    same = all(torch.equal(a_, b_) for a_, b_ in zip(out_off, out_on))
    res.update(graph_us_no_pdl=t_off, graph_us_pdl=t_on, ratio=t_off / t_on,
               us_per_launch_no_pdl=t_off / len(ws), us_per_launch_pdl=t_on / len(ws),
               GBs_no_pdl=res["weight_bytes"] / t_off / 1e3, GBs_pdl=res["weight_bytes"] / t_on / 1e3,
               bit_identical=same)
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
