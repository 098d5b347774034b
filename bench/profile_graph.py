"""Where does a graph-replayed decode step's time go? Builds an N-layer full-width synthetic model
on cuda:0, captures the static decoder's graphs, warms them, then traces one replay with
torch.profiler (CUPTI records the kernels inside a graph) and prints:
  * the step's span, and per stream the kernels' busy time;
  * the idle time of the busiest stream: the gaps between one kernel's end and the next one's
    start on that stream (launch latency, waits for the side stream), summed by the kernel that
    follows the gap;
  * the kernels by in-graph time (count, mean), which includes any slowdown from kernels that
    run at the same time on the other stream.

    python bench/profile_graph.py [N_LAYERS=4] [DEPTH=1] [TRACE_JSON] [--pdl]

Traced without programmatic dependent launch unless --pdl: with it, a kernel's early-launched
blocks wait inside it for the kernel ahead, CUPTI counts that wait as the kernel's time, and
the per-stream gaps no longer show where the step waits (bench/results/*_s8_final8_*).
"""
import sys
import tempfile
from collections import defaultdict

import torch

from ds4tp import config as C
from ds4tp.bench import build_model, prefilled
from ds4tp.comm import SingleComm
from ds4tp.decode_graph import StaticDecoder
from ds4tp.kernels import pdl
from profile_common import traced_kernels

args = [a for a in sys.argv[1:] if a != "--pdl"]
pdl.set_enabled("--pdl" in sys.argv[1:])
n_layer = int(args[0]) if len(args) > 0 else 4
depth = int(args[1]) if len(args) > 1 else 1
trace_path = args[2] if len(args) > 2 else tempfile.mktemp(suffix=".json")
print(f"programmatic dependent launch: {'on' if '--pdl' in sys.argv[1:] else 'off'}")
m = build_model(C.Shape(n_layer=n_layer), 0, 1, SingleComm(), "cuda:0")
st = prefilled(m, depth)
g = StaticDecoder(m, max_ctx=depth + 128, use_graphs=True)
g.load_session(st)
for _ in range(6):
    g.step(5)
torch.cuda.synchronize()

kern = traced_kernels(lambda: g.step(5), trace_path)
last = kern                       # one replay (splitting several at their largest gaps was wrong:
t0 = last[0]["ts"]                # a stream can wait longer inside a step than between steps)
t1 = max(e["ts"] + e["dur"] for e in last)
by_stream = defaultdict(list)
for e in last:
    by_stream[e.get("args", {}).get("stream", 0)].append(e)
print(f"{n_layer} layers, depth {depth}, one replay: {len(last)} kernels, span {t1 - t0:.1f} us "
      f"({(t1 - t0) / n_layer:.1f} us per layer)")
busiest = max(by_stream, key=lambda s: sum(e["dur"] for e in by_stream[s]))
for s, evs in sorted(by_stream.items(), key=lambda kv: -len(kv[1])):
    busy = sum(e["dur"] for e in evs)
    print(f"  stream {s}: {len(evs)} kernels, busy {busy:.1f} us ({100 * busy / (t1 - t0):.0f}% of the span)"
          + ("  <- busiest" if s == busiest else ""))
main = by_stream[busiest]
idle = defaultdict(lambda: [0, 0.0])
prev_end = t0
for e in main:
    gap = e["ts"] - prev_end
    if gap > 0:
        k = idle[e["name"][:80]]
        k[0] += 1
        k[1] += gap
    prev_end = max(prev_end, e["ts"] + e["dur"])
tot_idle = sum(v[1] for v in idle.values())
print(f"idle on the busiest stream: {tot_idle:.1f} us ({tot_idle / n_layer:.1f} us per layer), "
      f"by the kernel after the gap:")
for name, (n, us) in sorted(idle.items(), key=lambda kv: -kv[1][1])[:20]:
    print(f"{us:10.1f} us {n:5d}x {us / n:7.2f} us  {name}")
tot = defaultdict(lambda: [0, 0.0])
for e in last:
    k = tot[e["name"][:80]]
    k[0] += 1
    k[1] += e["dur"]
print("kernels by in-graph time (all streams):")
for name, (n, us) in sorted(tot.items(), key=lambda kv: -kv[1][1])[:30]:
    print(f"{us:10.1f} us {n:5d}x {us / n:7.2f} us  {name}")
