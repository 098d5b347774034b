"""Prefill of a 2048-token prompt on the full 43-layer synthetic model (TP=1, one GPU): the
default path and the same with the routed experts on the exact (Q8_K activation) path, same
run. Usage: python bench/prefill_ab.py [--out file.json] [--tokens 2048]"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds4tp import config as C  # noqa: E402
from ds4tp.bench import _routed_exact, build_model, time_prefill  # noqa: E402
from ds4tp.comm import SingleComm  # noqa: E402
from ds4tp.kernels import triton_gemm  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="prefill_ab.json")
ap.add_argument("--tokens", type=int, default=2048)
a = ap.parse_args()
m = build_model(C.FULL, 0, 1, SingleComm(), "cuda:0")
res = {"device": torch.cuda.get_device_name(), "tokens": a.tokens}
res["prefill"] = time_prefill(m, a.tokens)
with _routed_exact(triton_gemm):
    res["prefill_exact_experts"] = time_prefill(m, a.tokens)
res["prefill_again"] = time_prefill(m, a.tokens)
for k in ("prefill", "prefill_exact_experts", "prefill_again"):
    print(f"{k:24s} {res[k]['tok_s']:8.1f} tok/s ({res[k]['seconds']:.3f} s)", flush=True)
Path(a.out).write_text(json.dumps(res, indent=1))
