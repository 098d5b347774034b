"""Shared by the profile scripts: every GPU kernel of a torch.profiler run, by name; one
process per GPU with rank 0's result saved as JSON."""


def kernel_table(prof, n_layer: int, top: int, what: str) -> None:
    """Print the launch count and GPU time of `what`, then the `top` kernels by total time."""
    kern = {}
    for ev in prof.events():
        if str(getattr(ev, "device_type", "")).endswith("CUDA") and ev.device_time_total > 0:
            k = kern.setdefault(ev.name[:90], [0, 0.0])
            k[0] += 1
            k[1] += ev.device_time_total
    tot_n = sum(v[0] for v in kern.values())
    tot_us = sum(v[1] for v in kern.values())
    print(f"GPU kernels in {what}: {tot_n} launches, {tot_us / 1e3:.2f} ms GPU time "
          f"({n_layer} layers: {tot_n / n_layer:.0f} launches per layer)")
    for name, (n, us) in sorted(kern.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{us:10.1f} us {n:6d}x {us / n:9.2f} us  {name}")


def prefill_experts(T: int = 2048, K: int = 6, seed: int = 0):
    """DS4's routed experts at TP=1 on cuda (random valid blocks): gate, up (IQ2_XXS [256, 2048,
    4096]), down (Q2_K [256, 4096, 2048]), ids [T, K] (distinct experts per token), x [T, 4096],
    router weights [T, K]."""
    import sys
    from pathlib import Path

    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import kernel_cases as kc
    from ds4tp.config import IQ2_XXS, Q2_K
    g = torch.Generator().manual_seed(seed)
    wg = kc.rand_weight(IQ2_XXS, (256, 2048, 4096), g, "cuda")
    wu = kc.rand_weight(IQ2_XXS, (256, 2048, 4096), g, "cuda")
    wd = kc.rand_weight(Q2_K, (256, 4096, 2048), g, "cuda")
    ids = torch.stack([torch.randperm(256, generator=g)[:K] for _ in range(T)]).cuda()
    x = kc.rand_act((T, 4096), g, "cuda")
    rw = torch.rand(T, K, generator=g).cuda()
    return wg, wu, wd, ids, x, rw


def graph_us(step, copies: int, reps: int = 10) -> float:
    """Microseconds per call of step(i) (i: which weight copy, 0..copies-1, so that L2 holds
    none of them between calls), warmed up on a side stream, captured once in a CUDA graph and
    replayed `reps` times."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):
            step(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            step(i)
    graph.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        graph.replay()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) * 1e3 / (reps * copies)


def traced_kernels(run, trace_path: str) -> list:
    """The GPU kernels of one call of `run` (a graph replay included: CUPTI records the kernels
    inside a graph), as chrome-trace events sorted by start; the trace is written to
    trace_path. Exits if none were recorded."""
    import json
    import sys

    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    prof.export_chrome_trace(trace_path)
    events = json.load(open(trace_path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    kern = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "Kernel")),
                  key=lambda e: e["ts"])
    if not kern:
        sys.exit("no kernel events in the trace (CUPTI did not record the graph's kernels)")
    return kern


def ranks_to_json(world: int, fn, cfg: dict, out: str | None, wall_s: float) -> dict:
    """fn(comm, dev, cfg) on `world` GPUs, one process each (ds4tp.comm.run_local_ranks);
    rank 0's result, also written to `out` as JSON when given."""
    import json

    from ds4tp.comm import run_local_ranks
    r = run_local_ranks(world, fn, cfg, device="cuda", timeout_s=300, wall_s=wall_s)
    if out:
        with open(out, "w") as f:
            json.dump(r, f, indent=1)
    return r


def finish(out, results: list) -> int:
    """A sweep's end: its results as JSON at out (if given) with the device's name; exit status
    1 if any result failed its check (`ok`)."""
    import json
    import torch
    if out:
        with open(out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)
    return 0 if all(x["ok"] for x in results) else 1
