"""Probe for the illegal address that graph replays of the decode step hit under programmatic
dependent launch (sessions 18, 21 and 22, docs/performance.md): capture the static decoder's
graph of a token that ends no window under one configuration, replay it many times, and report
the phase or replay where the first error surfaced (or that none did). One configuration per
process: an illegal address leaves the CUDA context unusable.

    python bench/pdl_race_probe.py [--world 2] [--layers 43] [--replays 2000] [--check]
        [--pdl on|off|cuda_c_off|triton_off] [--define NAME=VALUE ...]

Under cuda-gdb (`cuda-gdb -batch -ex run -ex "info cuda kernels" -ex bt --args python3 ...`)
a fault stops at the kernel and instruction (device_run.sh s22d). The cause found that way:
CUDA C kernels read an earlier kernel's output through the read-only path (common.cuh, prior).
"""
import argparse
import sys
import time

import torch

from ds4tp import config as C
from ds4tp.bench import NullComm, build_model, prefilled
from ds4tp.comm import SingleComm
from ds4tp.decode_graph import CAPTURE_PRIORITY, StaticDecoder
from ds4tp.kernels import pdl

ap = argparse.ArgumentParser()
ap.add_argument("--world", type=int, default=2)
ap.add_argument("--layers", type=int, default=C.Shape().n_layer)
ap.add_argument("--replays", type=int, default=2000)
ap.add_argument("--pdl", default="on", choices=("on", "off", "cuda_c_off", "triton_off"))
ap.add_argument("--check", action="store_true",
                help="after every replay: wait, read the token it picked, check the logits are finite")
ap.add_argument("--define", action="append", default=[],
                help="NAME=VALUE added to every CUDA C compile (cuda_c.VARIANT_DEFINES): a variant")
args = ap.parse_args()
if args.define:
    from ds4tp.kernels import cuda_c
    cuda_c.VARIANT_DEFINES = tuple(tuple(d.split("=", 1)) for d in args.define)

{"on": lambda: None, "off": lambda: pdl.set_enabled(False),
 "cuda_c_off": lambda: pdl.set_cuda_c_enabled(False),
 "triton_off": lambda: pdl.set_triton_enabled(False)}[args.pdl]()
tag = f"world {args.world}, {args.layers} layers, pdl {args.pdl}" + "".join(f", {d}" for d in args.define)
print("probe:", tag, flush=True)

comm = SingleComm() if args.world == 1 else NullComm(0, args.world)
m = build_model(C.Shape(n_layer=args.layers), 0, args.world, comm, "cuda:0")
dec = StaticDecoder(m, max_ctx=256, priority=CAPTURE_PRIORITY)
done = 0
history = []                     # (replay, token picked, logits all finite) with --check
steps_done = False
try:
    # each phase waited on, so that a failure names its phase: the eager prefill of one token,
    # an eager decode step (state restored after), the graph's capture, then its replays
    st = prefilled(m, 1)
    torch.cuda.synchronize()
    print("prefill done", flush=True)
    dec.load_session(st)
    var = dec._variant(dec.n)
    dec.pos.fill_(dec.n)
    dec.token.fill_(11)
    saved = dec.park()
    eager = dec._step(var)
    torch.cuda.synchronize()
    print(f"eager step done: logits finite {bool(torch.isfinite(eager).all())}", flush=True)
    dec.resume(saved)
    dec.graphs[var] = dec._capture(var)
    torch.cuda.synchronize()
    print("graph captured (after its own eager warm-up step)", flush=True)
    for i in range(8):           # graph replays
        logits = dec.step(11).clone()
        torch.cuda.synchronize()
        print(f"step {i}: logits finite {bool(torch.isfinite(logits).all())}, token picked "
              f"{int(dec.token.item())}", flush=True)
    print(f"8 steps replayed, logits sum {logits.double().sum().item():.6f}", flush=True)
    steps_done = True
    g, _ = dec.graphs[var]
    t0 = time.perf_counter()
    while done < args.replays:
        if args.check:
            g.replay()
            tok = int(dec.token.item())
            fin = bool(torch.isfinite(dec.logits).all().item())
            history.append((done, tok, fin))
            done += 1
            if not fin or not 0 <= tok < m.shape.vocab:
                print(f"replay {done - 1}: token {tok}, logits finite {fin}", flush=True)
            continue
        for _ in range(100):
            g.replay()
        torch.cuda.synchronize()
        done += 100
    dt = time.perf_counter() - t0
    if args.check:
        print(f"tokens: {len(set(t for _, t, _ in history))} distinct; not finite at "
              f"{[r for r, _, f in history if not f][:10]}; last {history[-3:]}", flush=True)
    print(f"OK: {done} replays, {1e6 * dt / done:.1f} us each; {tag}", flush=True)
except Exception as e:       # the error surfaces at the synchronize after the failing replay
    upto = done + (0 if args.check else 100)
    print(f"FAILED ({'after' if steps_done else 'before'} the 8 steps) after {done} to {upto} "
          f"replays: {type(e).__name__}: {str(e)[:200]}; {tag}", flush=True)
    if args.check:
        print("last replays (replay, token, logits finite):", history[-8:], flush=True)
    sys.exit(1)
