"""What an L2 prefetch (ds4tp/kernels/l2.py) buys one Q8_0 matvec of a decode step, on a GPU.

Each variant is one CUDA graph, replayed over rotating weight copies so every replay starts cold
(the copies together are larger than L2; a 256 MB scratch add between replays evicts the rest):

  flush                      the scratch add alone (subtracted from the others)
  flush, sleep S             a latency-bound stretch of S microseconds (torch.cuda._sleep)
  flush, sleep, matvec       the matvec read cold from HBM after the stretch
  flush, pf, sleep, matvec   the same with the weight's prefetch queued before the stretch
  flush, pf, matvec          the prefetch right before its reader (what it costs in the chain)
  flush, side pf, sleep, matvec  the prefetch on a second stream beside the stretch (joined
                             before the matvec)
  flush, pf                  the prefetch alone

for each prefetch mode of l2.cu (0: bulk prefetch, 1: a prefetch per line, 2: loads dropped).
The matvec is attn_output_b's shape at TP=1 (4096 x 8192 Q8_0, 35.7 MB). Prints microseconds
per replay and writes JSON with --out.

    python3 bench/l2_probe.py [--sleep-us 20] [--out l2_probe.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import kernel_cases as kc  # noqa: E402
from ds4tp import ops  # noqa: E402
from ds4tp.config import Q8_0  # noqa: E402
from ds4tp.kernels import l2  # noqa: E402
from ds4tp.streams import Side  # noqa: E402


def sleep_cycles(us: float) -> int:
    clock_khz = torch.cuda.get_device_properties(0).clock_rate if hasattr(
        torch.cuda.get_device_properties(0), "clock_rate") else 1_980_000
    return int(us * clock_khz / 1e3)


def graph_us(body, copies: int, reps: int = 5) -> float:
    """Mean microseconds per call of body(i) for i over the copies, captured as one graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):
            body(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            body(i)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return 1e3 * a.elapsed_time(b) / (reps * copies)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sleep-us", type=float, default=20.0)
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = torch.device("cuda:0")
    g = torch.Generator().manual_seed(0)
    ws = [kc.rand_weight(Q8_0, (4096, 8192), g, "cuda") for _ in range(a.copies)]
    x = kc.rand_act((1, 8192), g, "cuda")
    scratch = torch.zeros(64 << 20, device=dev)          # 256 MB
    cyc = sleep_cycles(a.sleep_us)
    for w in ws:
        ops.linear(w, x)                                 # compile; split layouts built
    res = {"sleep_us": a.sleep_us, "bytes": sum(t.numel() * t.element_size() for t in l2.read_tensors(ws[0]))}

    def flush(i):
        scratch.add_(1.0)

    res["flush"] = graph_us(flush, a.copies)
    res["flush_sleep"] = graph_us(lambda i: (flush(i), torch.cuda._sleep(cyc)), a.copies)
    res["flush_sleep_matvec"] = graph_us(lambda i: (flush(i), torch.cuda._sleep(cyc), ops.linear(ws[i], x)), a.copies)
    res["flush_matvec"] = graph_us(lambda i: (flush(i), ops.linear(ws[i], x)), a.copies)
    for mode, chunk in ((0, 8 << 10), (0, 64 << 10), (1, 8 << 10), (2, 2 << 10)):
        tag = f"mode{mode}_chunk{chunk >> 10}k"

        def pf(i):
            l2.warm((ws[i],), dev, mode=mode, chunk=chunk)

        res[f"{tag}_flush_pf"] = graph_us(lambda i: (flush(i), pf(i)), a.copies)
        res[f"{tag}_flush_pf_sleep_matvec"] = graph_us(
            lambda i: (flush(i), pf(i), torch.cuda._sleep(cyc), ops.linear(ws[i], x)), a.copies)
        res[f"{tag}_flush_pf_matvec"] = graph_us(lambda i: (flush(i), pf(i), ops.linear(ws[i], x)), a.copies)

        def side(i):
            flush(i)
            sd = Side(x)
            with sd:
                pf(i)
            torch.cuda._sleep(cyc)
            sd.join()
            ops.linear(ws[i], x)

        res[f"{tag}_flush_sidepf_sleep_matvec"] = graph_us(side, a.copies)
    base = res["flush"]
    for k, v in res.items():
        if k not in ("sleep_us", "bytes", "flush") and isinstance(v, float):
            print(f"{k:40s} {v:9.2f} us  (less flush: {v - base:8.2f})")
    print(f"flush {base:.2f} us; weight {res['bytes'] / 1e6:.1f} MB; sleep {a.sleep_us} us")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
