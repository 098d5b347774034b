"""Where the device sampler's time goes (ds4tp.worker.sampling.sample_device), on one GPU.

The served path queues a sampled request's sample between two decode graph steps, so its GPU
time adds to every sampled token (~0.3 ms at TP=2 in s26f: 222.0 sampled against 237.8 greedy).
This times sample_device for several parameter sets on vocabulary-sized logits, with its draw
on the CUDA C kernels (kernels.cuda_sample) and on their twin (_draw_torch), in the same run:
queued back to back (CUDA events over many calls, no host waits between; where the host is
slower than the GPU this is the host's time) and replayed from a CUDA graph (the GPU's own time,
as when the served path queues it behind a decode step); then the pieces, and one call's
kernels from torch.profiler.

    python bench/sampler_bench.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ds4tp.worker import sampling
from ds4tp.worker.sampling import SamplingParams

VOCAB = 129280
PARAMS = {
    "greedy": SamplingParams(),
    "T0.7_top_p0.9": SamplingParams(temperature=0.7, top_p=0.9, seed=1),
    "T1.0": SamplingParams(temperature=1.0, seed=2),
    "T0.8_top_k40": SamplingParams(temperature=0.8, top_k=40, seed=3),
    "T1.0_min_p0.05": SamplingParams(temperature=1.0, min_p=0.05, seed=4),
    "T0.6_top_k50_top_p0.95": SamplingParams(temperature=0.6, top_k=50, top_p=0.95, seed=5),
    "T1.0_top_logprobs5": SamplingParams(temperature=1.0, top_logprobs=5, seed=6),
}


def gpu_us(fn, reps: int = 100, warm: int = 5) -> float:
    """Mean GPU time of fn() in microseconds, calls queued back to back (best of 3 rounds)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) * 1000.0 / reps)
    return best


def graph_us(fn) -> float:
    """GPU time of fn() captured in a CUDA graph, replayed back to back."""
    from ds4tp.bench import graph_seconds
    return graph_seconds(fn, torch.device("cuda", torch.cuda.current_device()), reps=100, warm=3) * 1e6


def host_us(fn, reps: int = 50) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    dt = (time.perf_counter() - t) * 1e6 / reps
    torch.cuda.synchronize()
    return dt


def logits_like(kind: str, g: torch.Generator) -> torch.Tensor:
    """float32 [VOCAB]: 'peaked' (sd 3, one token 8 above) or 'flat' (sd 1)."""
    x = torch.randn(VOCAB, generator=g) * (3.0 if kind == "peaked" else 1.0)
    if kind == "peaked":
        x[1234] += 8.0
    return x.cuda()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.cuda.init()
    g = torch.Generator().manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "vocab": VOCAB,
           "sample_device_us": {}, "pieces_us": {}}
    from ds4tp.kernels import cuda_sample
    res["graph_us"] = {}
    for kind in ("peaked", "flat"):
        x = logits_like(kind, g)
        for name, p in PARAMS.items():
            for path in ("kernels", "twin"):        # kernels.cuda_sample, or _draw_torch
                cuda_sample.set_enabled(path == "kernels")
                step = [0]

                def call():
                    step[0] += 1
                    sampling.sample_device(x, p, step[0])
                key = f"{kind}/{name}/{path}"
                res["sample_device_us"][key] = {"gpu": gpu_us(call), "host": host_us(call)}
                # the GPU's own time: the same call replayed from a CUDA graph (no launch gaps)
                res["graph_us"][key] = graph_us(lambda: sampling.sample_device(x, p, 7))
    cuda_sample.set_enabled(True)
    x = logits_like("peaked", g)
    x64 = x.double()
    pieces = {
        "to_float64": lambda: x.to(torch.float64),
        "sort_f64_stable": lambda: torch.sort(x64, descending=True, stable=True),
        "sort_f32_stable": lambda: torch.sort(x, descending=True, stable=True),
        "sort_f32_unstable": lambda: torch.sort(x, descending=True),
        "topk_f32_64": lambda: torch.topk(x, 64),
        "topk_f32_1024": lambda: torch.topk(x, 1024),
        "topk_f32_4096": lambda: torch.topk(x, 4096),
        "running_sums_f64": lambda: sampling._running_sums(x64),
        "exp_norm_f64": lambda: torch.exp(x64 - x64.max()) / torch.exp(x64 - x64.max()).sum(),
        "log_norm": lambda: sampling.log_norm(x),
        "max_f64": lambda: x64.max(),
        "sum_f64": lambda: x64.sum(),
        "add_f64": lambda: x64 + 1.0,
    }
    for name, fn in pieces.items():
        res["pieces_us"][name] = gpu_us(fn)
    res["pieces_graph_us"] = {k: graph_us(pieces[k]) for k in ("sort_f64_stable", "sort_f32_stable")}
    # one call's kernels
    p = PARAMS["T0.7_top_p0.9"]
    from torch.profiler import ProfilerActivity, profile
    sampling.sample_device(x, p, 3)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(10):
            sampling.sample_device(x, p, 10 + i)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    print(table)
    res["profile_T0.7_top_p0.9_10calls"] = table
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("profile")}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
