"""Prefill of a 2048-token prompt on the full 43-layer synthetic model (TP=1, one GPU): the
default path, then with one piece at a time on its previous path, then the default again, same
run: attention in query chunks of torch ops (instead of triton_attn.prefill_attention), the F16
weights in 3xTF32 (instead of the split activation on cuBLAS), the routed experts on the exact
(Q8_K activation) path (instead of the tensor-core float16 kernels); last, the default once
more after an eager decode step under torch.profiler (the bench profiled before its prefill
until the ninth session).
Usage: python bench/prefill_ab.py [--out file.json] [--tokens 2048]"""
import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds4tp import config as C  # noqa: E402
from ds4tp.bench import _setting, _switched_off, build_model, profile_split, time_prefill  # noqa: E402
from ds4tp.comm import SingleComm  # noqa: E402
from ds4tp.kernels import triton_attn, triton_gemm  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="prefill_ab.json")
ap.add_argument("--tokens", type=int, default=2048)
a = ap.parse_args()
m = build_model(C.FULL, 0, 1, SingleComm(), "cuda:0")
res = {"device": torch.cuda.get_device_name(), "tokens": a.tokens}
variants = [("prefill", contextlib.nullcontext()),
            ("prefill_attention_chunks", _switched_off(triton_attn.set_prefill_enabled)),
            ("prefill_f16_3xtf32", _setting(triton_gemm, "F16_CUBLAS", False)),
            ("prefill_exact_experts", _setting(triton_gemm, "H16_MIN_PAIRS", None)),
            ("prefill_again", contextlib.nullcontext())]


@contextlib.contextmanager
def _after_profiler():
    """The bench's eager decode step under torch.profiler first (bench.profile_split): does a
    prefill after it in the same process run slower?"""
    res["profile"] = profile_split(m)
    yield


variants.append(("prefill_after_profiler", _after_profiler()))
for key, ctx in variants:
    with ctx:
        res[key] = time_prefill(m, a.tokens)
    print(f"{key:26s} {res[key]['tok_s']:8.1f} tok/s ({res[key]['seconds']:.3f} s)", flush=True)
Path(a.out).write_text(json.dumps(res, indent=1))
