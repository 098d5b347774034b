"""The routed gate/up kernel on IQ2_XXS rows in the decode order (qtensor.IQ2_DECODE, experts.cu
A_DL) against GGUF's order, alone (the bench times it in the step: decode_d0_gguf_order).

The kernel stages each (slot, row) item's gate and up rows in shared memory because an IQ2_XXS
super-block is 66 bytes (fields only 2-byte aligned); Nsight Compute (s29a) put the largest
share of its stalls on shared-memory results (short scoreboard, 1.85 cycles an instruction of
7.5 at TP=2). In the decode layout a lane's four sub-blocks and its four scales are contiguous,
so each row comes straight into registers by two 16-byte loads and one 8-byte load a lane.

The decode layout also runs with its tables per bank pair off (decode_one_table: one 2 KB grid
table, the sign masks computed; experts.cu A_TAB), the kernel of the twenty-seventh session.
(The thirtieth session's s32d and s32e also timed the first decode order here, a lane's four
sub-blocks as 32 contiguous bytes: 4-5% slower; removed after, at 5027909.)

For TP=2 and TP=1 expert shapes (64 experts, 4096 inputs), a token's 6 ids drawn afresh for each
of 48 launches (so the rows come from HBM, not L2), both layouts: outputs compared bit for bit,
then the 48 launches captured in a CUDA graph and replayed; us per launch, best of 5.

    python bench/iq2_layout_probe.py [--json OUT]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kernel_cases as kc  # noqa: E402

from ds4tp.config import IQ2_XXS  # noqa: E402
from ds4tp.kernels import cuda_experts as ce  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--json", default="")
ap.add_argument("--launches", type=int, default=48)
args = ap.parse_args()
VARIANTS = ("gguf", "decode_one_table", "decode_layout")


def launches(wg, wu, x, ids_list, rw):
    return [ce.swiglu(wg, wu, x, ids, rw, 10.0) for ids in ids_list]


res = {}
for tp in (2, 1):
    F, E = 2048 // tp, 64
    g = torch.Generator().manual_seed(tp)
    w = {"gguf": (kc.rand_weight(IQ2_XXS, (E, F, 4096), g, "cuda"),
                  kc.rand_weight(IQ2_XXS, (E, F, 4096), g, "cuda"))}
    w["decode_layout"] = w["decode_one_table"] = tuple(kc.decode_order(t) for t in w["gguf"])
    x = kc.rand_act((1, 4096), g, "cuda")
    rw = torch.rand(1, 6, generator=g).cuda()
    ids_list = [torch.randperm(E, generator=g)[:6].reshape(1, 6).cuda() for _ in range(args.launches)]
    outs, times = {}, {}
    for name in VARIANTS:
        ce.set_tables_enabled(name != "decode_one_table")
        outs[name] = [o.clone() for o in launches(*w[name], x, ids_list, rw)]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                launches(*w[name], x, ids_list, rw)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launches(*w[name], x, ids_list, rw)
        best = float("inf")
        for _ in range(5):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ev[0].record()
            graph.replay()
            ev[1].record()
            torch.cuda.synchronize()
            best = min(best, ev[0].elapsed_time(ev[1]) * 1e3 / args.launches)
        times[name] = best
    ce.set_tables_enabled(True)
    same = all(torch.equal(a, b) for v in VARIANTS[1:] for a, b in zip(outs["gguf"], outs[v]))
    res[f"tp{tp}"] = {"us_per_launch": times, "bit_identical": same,
                      "ratio": times["decode_layout"] / times["gguf"],
                      "ratio_tables": times["decode_layout"] / times["decode_one_table"]}
    print(f"TP={tp} rows {F}: " + ", ".join(f"{k} {v:.2f} us" for k, v in times.items())
          + f"; decode layout / gguf {res[f'tp{tp}']['ratio']:.3f}, tables / one table "
          f"{res[f'tp{tp}']['ratio_tables']:.3f}; outputs bit-identical: {same}", flush=True)
if args.json:
    Path(args.json).write_text(json.dumps(res, indent=1))
