"""Where does a prefill's time go? Builds an N-layer full-width synthetic model on cuda:0 and
profiles one T-token prefill (after a warm-up prefill of the same length): the top GPU kernels
by time, the launch count, the wall time, the host's enqueue time against it, and the host's
time by function (cProfile). With world > 1 it builds rank 0 of that many ranks on the one GPU,
collectives removed: a TP rank's own work (the host's share of it is what a TP=2 prefill waits
on).
Usage: python bench/profile_prefill.py [n_layer=4] [tokens=2048] [world=1]"""
import cProfile
import pstats
import sys
import time

import torch

from ds4tp import config as C
from ds4tp.bench import NullComm, bench_prompt, build_model
from profile_common import kernel_table

n_layer = int(sys.argv[1]) if len(sys.argv) > 1 else 4
n_tok = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
world = int(sys.argv[3]) if len(sys.argv) > 3 else 1
m = build_model(C.Shape(n_layer=n_layer), 0, world, NullComm(0, world), "cuda:0")
prompt = bench_prompt(m.shape.vocab, n_tok)
t = time.perf_counter()
m.forward(prompt, m.new_state())
torch.cuda.synchronize()
print(f"first prefill (compilation included): {time.perf_counter() - t:.1f} s")
t = time.perf_counter()
m.forward(prompt, m.new_state())
torch.cuda.synchronize()
wall = time.perf_counter() - t
print(f"prefill {n_tok} tokens, {n_layer} layers, TP={world} rank 0: {wall * 1e3:.1f} ms "
      f"({wall / n_layer * 1e3:.1f} ms per layer, {n_tok / wall:.0f} tok/s)")
# when forward() returns, everything is enqueued: a small gap to the GPU's end means the GPU
# waited on the host's launches
for _ in range(3):
    t = time.perf_counter()
    m.forward(prompt, m.new_state())
    t_host = time.perf_counter() - t
    torch.cuda.synchronize()
    print(f"host enqueue {t_host * 1e3:.1f} ms, GPU done at {(time.perf_counter() - t) * 1e3:.1f} ms")
# the host's side: where a prefill's Python time goes (cProfile adds its own overhead, so the
# shares matter, not the absolute numbers)
cp = cProfile.Profile()
cp.enable()
m.forward(prompt, m.new_state())
torch.cuda.synchronize()
cp.disable()
print(f"host profile of one prefill (cProfile), {n_layer} layers: top functions by own time")
pstats.Stats(cp).sort_stats("tottime").print_stats(22)
print("the same, ds4tp's functions by cumulative time")
pstats.Stats(cp).sort_stats("cumulative").print_stats("ds4tp", 30)

# the GPU's side (after the host profile: once torch.profiler has run, later eager launches in
# the process may cost more)
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
    m.forward(prompt, m.new_state())
    torch.cuda.synchronize()
print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=25,
                                                        max_name_column_width=40, max_shapes_column_width=70))
kernel_table(prof, n_layer, 25, "one prefill")
