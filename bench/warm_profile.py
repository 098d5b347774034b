"""Where a worker's warm-up time goes: prefills of each length from 1 to 20 tokens (and a few
longer ones) on fresh states, each timed, in one process; the slow ones (over --slow-s) under
cProfile, whose top functions by cumulative time name what they spend it on (Triton or CuPy
compiling, torch.compile, or the model itself). Run it twice: the second process finds the
on-disk kernel caches warm.

    python bench/warm_profile.py [--layers 4] [--world 2] [--out warm.json]

One GPU; the model is rank 0's shard of a --world split (its shapes), built in GPU memory,
collectives removed (bench.NullComm).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch

from ds4tp import config as C
from ds4tp.bench import NullComm, build_model
from ds4tp.kernels import pin_compile_cache


def watch_specialisations(names: list) -> None:
    """Append the name and argument types of every Triton kernel specialisation this process
    creates (compiled, or loaded from the on-disk cache) to `names`."""
    import triton
    knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
    if knobs is None or not hasattr(knobs, "jit_cache_hook"):
        print("this Triton has no jit_cache_hook: specialisations not listed")
        return
    def hook(*args, repr="", **kwargs):
        names.append(repr)
        return False              # False: compile (or load) as usual

    knobs.jit_cache_hook = hook


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--lengths", default="1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,24,32,33,40,48,64,100,128,256,512,1000,1024,2048,2100,3000,4096")
    ap.add_argument("--chain", default="",
                    help="then feed these token counts one after another onto one state (a "
                         "prompt's suffix after prefix reuse, at growing positions)")
    ap.add_argument("--slow-s", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    print("TRITON_CACHE_DIR", pin_compile_cache())
    specs: list = []
    watch_specialisations(specs)
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)
    shape = C.Shape(n_layer=a.layers)
    model = build_model(shape, 0, a.world, NullComm(0, a.world), dev)
    torch.cuda.synchronize()
    res = {"layers": a.layers, "world": a.world, "steps": []}
    chained = model.new_state()
    plan = [(int(x), False) for x in a.lengths.split(",") if x]
    plan += [(int(x), True) for x in a.chain.split(",") if x]
    for n, chain in plan:
        specs.clear()
        st = chained if chain else model.new_state()
        ids = [(7 * i + 3) % shape.vocab for i in range(n)]
        prof = cProfile.Profile()
        torch.cuda.synchronize()
        t = time.perf_counter()
        prof.enable()
        model.forward(ids, st)
        torch.cuda.synchronize()
        prof.disable()
        dt = time.perf_counter() - t
        step = {"tokens": n, "at": st.n - n, "seconds": round(dt, 3), "specialisations": list(specs)}
        if dt > a.slow_s:
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(12)
            step["profile"] = buf.getvalue().splitlines()[-20:]
        res["steps"].append(step)
        print(f"prefill {n:5d} tokens at {st.n - n:5d}: {dt:8.3f} s, {len(specs)} new Triton "
              f"specialisations", flush=True)
        for r in specs[:12]:
            print("    +", r[:400])
        for line in step.get("profile", []):
            if line.strip():
                print("   ", line[:170])
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
