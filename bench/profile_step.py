"""Where does a decode step's time go? Builds an N-layer full-width synthetic model on cuda:0,
runs warm static-decoder steps eagerly under torch.profiler and prints the top kernels by GPU
time, then the graph-replayed step time."""
import sys
import time

import torch

from ds4tp import config as C, kernels
from ds4tp.bench import build_model
from ds4tp.comm import SingleComm
from ds4tp.decode_graph import StaticDecoder

n_layer = int(sys.argv[1]) if len(sys.argv) > 1 else 4
print("kernels.available:", kernels.available())
m = build_model(C.Shape(n_layer=n_layer), 0, 1, SingleComm(), "cuda:0")
st = m.new_state()
m.forward([1], st)
dec = StaticDecoder(m, max_ctx=128, use_graphs=False)
dec.load_session(st)
for _ in range(3):
    dec.step(5)
torch.cuda.synchronize()
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    dec.step(5)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
# every GPU kernel of the step, by name: count, total and mean microseconds
kern = {}
for ev in prof.events():
    if str(getattr(ev, "device_type", "")).endswith("CUDA") and ev.device_time_total > 0:
        k = kern.setdefault(ev.name[:90], [0, 0.0])
        k[0] += 1
        k[1] += ev.device_time_total
tot_n = sum(v[0] for v in kern.values())
tot_us = sum(v[1] for v in kern.values())
print(f"GPU kernels in one eager step: {tot_n} launches, {tot_us / 1e3:.2f} ms GPU time "
      f"({n_layer} layers: {tot_n / n_layer:.0f} launches per layer)")
for name, (n, us) in sorted(kern.items(), key=lambda kv: -kv[1][1])[:70]:
    print(f"{us:9.1f} us {n:5d}x {us / n:7.2f} us  {name}")
t = time.perf_counter()
for _ in range(5):
    dec.step(5)
torch.cuda.synchronize()
print("eager step ms", 1e3 * (time.perf_counter() - t) / 5)
g = StaticDecoder(m, max_ctx=128, use_graphs=True)
g.load_session(st)
for _ in range(6):
    g.step(5)
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(20):
    g.step(5)
torch.cuda.synchronize()
print("graph step ms", 1e3 * (time.perf_counter() - t) / 20, "variants", len(g.graphs))
