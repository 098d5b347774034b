"""Where does a TP=2 prefill's time go? On two GPUs (one process per rank, NCCL), at full size:
the all-reduce of a prefill-sized activation alone, the 2048-token prefill with and without its
collectives (median of three each), the host's enqueue time against the GPU's, the
synchronising calls in a prefill, rank 0's host profile (cProfile), then a torch.profiler kernel
table of one prefill on rank 0 (--no-profiles: without the two profiles).
Every rank prints its own lines.
Usage: python bench/prefill_tp2.py [--layers 43] [--tokens 2048] [--out prefill_tp2.json]"""
import argparse
import time

import torch

from ds4tp import config as C
from ds4tp.bench import NullComm, bench_prompt, build_model, time_prefill


def _allreduce_ms(comm, shape, dtype, dev, iters=20) -> float:
    x = torch.ones(shape, device=dev, dtype=dtype)
    for _ in range(3):
        comm.all_reduce(x)
    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(iters):
        comm.all_reduce(x)
    torch.cuda.synchronize(dev)
    return 1e3 * (time.perf_counter() - t) / iters


def _rank(comm, dev, cfg):
    torch.cuda.set_device(dev)
    say = lambda *a: print(f"[rank {comm.rank}]", *a, flush=True)   # noqa: E731
    shape = C.Shape(n_layer=cfg["layers"]) if cfg["layers"] != C.FULL.n_layer else C.FULL
    T = cfg["tokens"]
    res = {"rank": comm.rank}
    for rows, dt in ((T, torch.float32), (T, torch.bfloat16), (1, torch.float32)):
        ms = _allreduce_ms(comm, (rows, shape.n_embd), dt, dev)
        nbytes = rows * shape.n_embd * (4 if dt == torch.float32 else 2)
        key = f"all_reduce_{rows}x{shape.n_embd}_{str(dt).split('.')[-1]}"
        res[key] = {"ms": ms, "GBs": nbytes / ms / 1e6}
        say(key, f"{ms:.3f} ms, {nbytes / ms / 1e6:.1f} GB/s algorithm bandwidth")
    model = build_model(shape, comm.rank, comm.world, comm, dev)
    torch.cuda.synchronize(dev)
    res["prefill"] = time_prefill(model, T)
    say("prefill", round(res["prefill"]["tok_s"], 1), "tok/s", res["prefill"]["all_seconds"])
    real = model.comm
    model.comm = NullComm(comm.rank, comm.world)
    res["prefill_nocomm"] = time_prefill(model, T)
    say("prefill without collectives", round(res["prefill_nocomm"]["tok_s"], 1), "tok/s",
        res["prefill_nocomm"]["all_seconds"])
    prompt = bench_prompt(shape.vocab, T)
    # the host's side: when forward() returns (everything enqueued) against when the GPU is done;
    # a small gap means the GPU waited on the host's launches
    for label in ("nocomm", "comm"):
        model.comm = real if label == "comm" else NullComm(comm.rank, comm.world)
        gaps = []
        for _ in range(3):
            torch.cuda.synchronize(dev)
            t = time.perf_counter()
            model.forward(prompt, model.new_state())
            t_host = time.perf_counter() - t
            torch.cuda.synchronize(dev)
            gaps.append((round(1e3 * t_host, 1), round(1e3 * (time.perf_counter() - t), 1)))
        res[f"host_enqueue_vs_total_ms_{label}"] = gaps
        say(f"host enqueue ms vs total ms ({label}):", gaps)
    model.comm = real
    # synchronising calls inside one prefill (torch's sync debug mode, as warnings)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        model.forward(prompt, model.new_state())
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message)[:160] for w in caught if "synchroniz" in str(w.message)]
    res["host_syncs"] = len(syncs)
    say(f"synchronising calls in one prefill: {len(syncs)}", sorted(set(syncs))[:6])
    # the bench times its prefill after the decode graphs (collectives captured in them): the
    # same prefill after one decode timing, to see whether that order costs anything
    if torch.cuda.is_available():
        from ds4tp.bench import time_decode
        res["decode_d0"] = time_decode(model, 1, 16, max_ctx=256)
        res["prefill_after_decode_graphs"] = time_prefill(model, T)
        say("decode", round(res["decode_d0"]["tok_s"], 1), "tok/s; prefill after the decode graphs",
            round(res["prefill_after_decode_graphs"]["tok_s"], 1), "tok/s",
            res["prefill_after_decode_graphs"]["all_seconds"])
    if not cfg["profiles"]:
        return res
    if comm.rank == 0:
        import cProfile
        import pstats
        cp = cProfile.Profile()
        cp.enable()
        model.forward(prompt, model.new_state())
        torch.cuda.synchronize(dev)
        cp.disable()
        say("host profile of one prefill (cProfile): top functions by own time")
        pstats.Stats(cp).sort_stats("tottime").print_stats(14)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.forward(prompt, model.new_state())
        torch.cuda.synchronize(dev)
    if comm.rank == 0:
        import sys
        from pathlib import Path
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from profile_common import kernel_table
        kernel_table(prof, shape.n_layer, 25, f"one TP={comm.world} prefill, rank 0")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=C.FULL.n_layer)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--no-profiles", action="store_true", help="skip the host and kernel profiles")
    ap.add_argument("--out")
    a = ap.parse_args()
    from profile_common import ranks_to_json
    ranks_to_json(a.world, _rank, {"layers": a.layers, "tokens": a.tokens, "profiles": not a.no_profiles},
                  a.out, 500)


if __name__ == "__main__":
    main()
