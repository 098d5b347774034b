"""Why is an eager prefill slower once decode graphs exist? (performance.md, "What would move
these numbers next", items 5 and 6: 7,651 → 6,329 tok/s for 2,048 tokens at TP=2, and the served
path's first prompts of 130-1,111 tokens at 0.34-0.37 s against 0.19-0.24 s before.)

On one GPU per rank at full size, the same measurements in several phases of one process:
  before      the model built, kernels compiled;
  graphs      a StaticDecoder's graphs captured and replayed, the decoder kept alive (as in
              the served path);
  frozen      the same, after gc.collect() and gc.freeze() (the collector's long-lived objects
              no longer traversed);
  freed       the decoder dropped, gc.collect(), torch.cuda.empty_cache().
Each phase: prefills of 512 and 2,048 tokens (median of three; the host's enqueue time against
the GPU's), the 512 one without collectives too, the collector's time during them, the
allocator's device mallocs and retries, the host time of 2,000 tiny eager launches, and
(rank 0) a cProfile of one 512-token prefill, top functions by own time.
Usage: python bench/prefill_after_graphs.py [--world 2] [--layers 43] [--out FILE.json]"""
import argparse
import cProfile
import gc
import io
import os
import pstats
import resource
import time

import torch

from ds4tp import config as C
from ds4tp.bench import NullComm, bench_prompt, build_model, prefilled, time_prefill


class GcClock:
    """The cyclic collector's time and collections per generation while installed."""

    def __init__(self):
        self.t0, self.seconds, self.count = 0.0, [0.0, 0.0, 0.0], [0, 0, 0]

    def __call__(self, phase, info):
        if phase == "start":
            self.t0 = time.perf_counter()
        else:
            g = info["generation"]
            self.seconds[g] += time.perf_counter() - self.t0
            self.count[g] += 1

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def _one_thread_per_core() -> list:
    """This machine's CPUs, one hardware thread of each core (SMT siblings left out)."""
    import glob
    seen, cpus = set(), []
    for path in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/topology/thread_siblings_list"),
                       key=lambda p: int(p.split("/cpu")[-1].split("/")[0])):
        sib = open(path).read().strip()
        if sib not in seen:
            seen.add(sib)
            cpus.append(int(path.split("/cpu")[-1].split("/")[0]))
    return cpus


def _cpu_now() -> int:
    """The CPU this thread last ran on (/proc/thread-self/stat field 39)."""
    return int(open("/proc/thread-self/stat").read().rsplit(")", 1)[1].split()[36])


def _mem(dev) -> dict:
    s = torch.cuda.memory_stats(dev)
    return {k: s.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free",
                                      "num_sync_all_streams")}


def _prefills(model, n_tok: int, dev, reps: int = 3) -> dict:
    """bench.time_prefill (its host and total times in ms), with the collector's time, the
    allocator's counts and the thread's context switches over it (its untimed first call
    included)."""
    m0 = _mem(dev)
    ru0 = resource.getrusage(resource.RUSAGE_THREAD)
    with GcClock() as gcc:
        r = time_prefill(model, n_tok, reps)
    m1 = _mem(dev)
    ru1 = resource.getrusage(resource.RUSAGE_THREAD)
    return {"cpu": _cpu_now(), "ctx_switches": [ru1.ru_nvcsw - ru0.ru_nvcsw, ru1.ru_nivcsw - ru0.ru_nivcsw],
            "tok_s": r["tok_s"], "host_ms": [round(1e3 * h, 1) for h in r["host_seconds"]],
            "total_ms": [round(1e3 * x, 1) for x in r["all_seconds"]],
            "gc_ms": [round(1e3 * s, 2) for s in gcc.seconds], "gc_count": gcc.count,
            "alloc": {k: m1[k] - m0[k] for k in m0}}


def _tiny_launches(dev, n: int = 2000) -> float:
    """Host µs per eager launch of a one-element add (the launch path alone)."""
    x = torch.zeros(1, device=dev)
    for _ in range(50):
        x.add_(1.0)
    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(n):
        x.add_(1.0)
    us = 1e6 * (time.perf_counter() - t) / n
    torch.cuda.synchronize(dev)
    return round(us, 2)


def _collectives_us(comm, dev, n: int = 200) -> dict:
    """Host and total µs per eager all-reduce of one 4,096-wide float32 row, and per all-gather
    of 512 floats (a compressor's rows), each in a loop of n."""
    out = {}
    for name, x, op in (("all_reduce_16KB", torch.ones(1, 4096, device=dev), comm.all_reduce),
                        ("all_gather_2KB", torch.ones(1, 512, device=dev), comm.all_gather)):
        for _ in range(10):
            op(x)
        torch.cuda.synchronize(dev)
        t = time.perf_counter()
        for _ in range(n):
            op(x)
        host = time.perf_counter() - t
        torch.cuda.synchronize(dev)
        out[name] = {"host_us": round(1e6 * host / n, 1), "total_us": round(1e6 * (time.perf_counter() - t) / n, 1)}
    return out


def _phase(model, real, dev, say, name: str) -> dict:
    res = {"objects_tracked": len(gc.get_objects()), "tiny_launch_us": _tiny_launches(dev),
           "collectives": _collectives_us(real, dev) if real.world > 1 else {}}
    for n in (512, 2048):
        res[f"prefill_{n}"] = _prefills(model, n, dev)
    model.comm = NullComm(real.rank, real.world)
    res["prefill_512_nocomm"] = _prefills(model, 512, dev)
    model.comm = real
    prompt = bench_prompt(model.shape.vocab, 512)
    cp = cProfile.Profile()           # every rank runs the prefill (its collectives); rank 0 reports
    cp.enable()
    model.forward(prompt, model.new_state())
    torch.cuda.synchronize(dev)
    cp.disable()
    if real.rank == 0:
        buf = io.StringIO()
        pstats.Stats(cp, stream=buf).sort_stats("tottime").print_stats(14)
        res["cprofile_512"] = buf.getvalue()
    for k in ("prefill_512", "prefill_2048", "prefill_512_nocomm"):
        r = res[k]
        say(f"{name:7s} {k:18s} {r['tok_s']:8.1f} tok/s host {r['host_ms']} total {r['total_ms']} "
            f"gc ms {r['gc_ms']} cpu {r['cpu']} voluntary/involuntary switches {r['ctx_switches']}")
    say(f"{name:7s} tiny launch {res['tiny_launch_us']} us, gc-tracked objects {res['objects_tracked']}, "
        f"eager collectives {res['collectives']}")
    return res


def _rank(comm, dev, cfg):
    from ds4tp.decode_graph import CAPTURE_PRIORITY, StaticDecoder
    torch.cuda.set_device(dev)
    if cfg["pin"]:     # this rank's main thread (and threads it starts) on cores of its own
        cores = _one_thread_per_core()
        share = len(cores) // comm.world
        os.sched_setaffinity(0, cores[comm.rank * share:(comm.rank + 1) * share])
    say = lambda *a: print(f"[rank {comm.rank}]", *a, flush=True)   # noqa: E731
    shape = C.Shape(n_layer=cfg["layers"]) if cfg["layers"] != C.FULL.n_layer else C.FULL
    model = build_model(shape, comm.rank, comm.world, comm, dev)
    torch.cuda.synchronize(dev)
    out = {"rank": comm.rank, "world": comm.world, "affinity": sorted(os.sched_getaffinity(0)),
           "cores": len(_one_thread_per_core()), "cpus": os.cpu_count()}
    say(f"pinned {cfg['pin']}: affinity {out['affinity']}, {out['cores']} cores of {out['cpus']} CPUs")
    out["before"] = _phase(model, comm, dev, say, "before")
    dec = StaticDecoder(model, max_ctx=cfg["max_ctx"], priority=CAPTURE_PRIORITY)
    dec.load_session(prefilled(model, 1))
    tok = 11
    t = time.perf_counter()
    for _ in range(24):
        tok = int(dec.step(tok).argmax())
    say(f"decode graphs: {len(dec.graphs)} variants, 24 steps in {time.perf_counter() - t:.2f} s")
    out["graphs"] = _phase(model, comm, dev, say, "graphs")
    gc.collect()
    gc.freeze()
    out["frozen"] = _phase(model, comm, dev, say, "frozen")
    gc.unfreeze()
    del dec
    gc.collect()
    torch.cuda.empty_cache()
    out["freed"] = _phase(model, comm, dev, say, "freed")
    if comm.rank == 0:
        for ph in ("before", "graphs"):
            print(f"---- rank 0, {ph}: cProfile of one 512-token prefill\n" + out[ph]["cprofile_512"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--layers", type=int, default=C.FULL.n_layer)
    ap.add_argument("--max-ctx", type=int, default=4096)
    ap.add_argument("--pin", action="store_true", help="each rank's main thread on cores of its own")
    ap.add_argument("--out")
    a = ap.parse_args()
    from profile_common import ranks_to_json
    ranks_to_json(a.world, _rank, {"layers": a.layers, "max_ctx": a.max_ctx, "pin": a.pin}, a.out, 560)


if __name__ == "__main__":
    main()
