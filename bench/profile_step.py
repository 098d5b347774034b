"""Where does a decode step's time go? Builds an N-layer full-width synthetic model on cuda:0,
prefills DEPTH tokens, runs warm static-decoder steps eagerly under torch.profiler and prints
the top kernels by GPU time, then the graph-replayed step time.

    python bench/profile_step.py [N_LAYERS=4] [DEPTH=1]
"""
import sys
import time

import torch

from ds4tp import config as C, kernels
from ds4tp.bench import build_model, prefilled
from ds4tp.comm import SingleComm
from ds4tp.decode_graph import StaticDecoder
from profile_common import kernel_table

n_layer = int(sys.argv[1]) if len(sys.argv) > 1 else 4
depth = int(sys.argv[2]) if len(sys.argv) > 2 else 1
print("kernels.available:", kernels.available(), "depth", depth)
m = build_model(C.Shape(n_layer=n_layer), 0, 1, SingleComm(), "cuda:0")
st = prefilled(m, depth)
max_ctx = depth + 128
dec = StaticDecoder(m, max_ctx=max_ctx, use_graphs=False)
dec.load_session(st)
for _ in range(3):
    dec.step(5)
torch.cuda.synchronize()
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    dec.step(5)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
kernel_table(prof, n_layer, 70, "one eager step")
t = time.perf_counter()
for _ in range(5):
    dec.step(5)
torch.cuda.synchronize()
print("eager step ms", 1e3 * (time.perf_counter() - t) / 5)
g = StaticDecoder(m, max_ctx=max_ctx, use_graphs=True)
g.load_session(st)
for _ in range(6):
    g.step(5)
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(20):
    g.step(5)
torch.cuda.synchronize()
print("graph step ms", 1e3 * (time.perf_counter() - t) / 20, "variants", len(g.graphs))
