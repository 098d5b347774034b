"""`ds4tp bench`: full-size DS4 decode/prefill on CUDA, TP=1 and TP=2, against the roofline.

Weights are full-size and synthetic: every tensor of the real shape and quant type, random
valid blocks scaled like `ds4tp synth` (activations stay sane), generated directly in GPU memory
per rank from the shard plan (no file needed). With --gguf, the load of that file at TP=2 is
timed too.

Per TP degree, one run reports: device-to-device copy bandwidth (the roofline's bandwidth),
decode tok/s at depth 0 and 4096 (CUDA graphs, steady state, first token excluded), decode
with collectives removed (the weight-streaming part, giving achieved GB/s per rank), the time of
one token's collectives alone, and prefill tok/s for a 2048-token prompt.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import torch

from ds4tp import config as C


# ---- synthetic full-size weights, made on the GPU ----------------------------------------------
Q8_SIGMA = 30.0


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).view(torch.uint8).reshape(*x.shape, 2)


def _quant_blocks(qtype: int, lead: tuple, n_in: int, std: torch.Tensor, g: torch.Generator, dev):
    """Random valid encoded rows [*lead, row_bytes]; std broadcasts over lead (per row/expert)."""
    from ds4tp.synth import Q2_K_UNIT_RMS, _iq2_xxs_unit_rms
    epb, bpb = C.BLOCK[qtype]
    nb = n_in // epb
    shape = (*lead, nb)
    std = std.to(dev, torch.float32).reshape(*std.shape, *([1] * (len(shape) - std.dim())))
    std = std.expand(*shape)
    if qtype == C.F16:
        return (torch.randn(*lead, n_in, generator=g, device=dev) * std[..., :1]).to(torch.float16) \
            .view(torch.uint8).reshape(*lead, n_in * 2)
    out = torch.empty(*shape, bpb, dtype=torch.uint8, device=dev)
    if qtype == C.Q8_0:
        q = torch.randn(*shape, 32, generator=g, device=dev).mul_(Q8_SIGMA).round_().clamp_(-127, 127)
        out[..., 2:] = q.to(torch.int8).view(torch.uint8)
        out[..., :2] = _f16_bytes(std / Q8_SIGMA)
    elif qtype == C.IQ2_XXS:
        out[..., 2:] = torch.randint(0, 256, (*shape, 64), generator=g, device=dev, dtype=torch.uint8)
        out[..., :2] = _f16_bytes(std / _iq2_xxs_unit_rms())
    elif qtype == C.Q2_K:
        sc = torch.randint(1, 16, (*shape, 16), generator=g, device=dev, dtype=torch.uint8)
        out[..., :16] = sc | (sc << 4)
        out[..., 16:80] = torch.randint(0, 256, (*shape, 64), generator=g, device=dev, dtype=torch.uint8)
        d = (std / Q2_K_UNIT_RMS).to(torch.float16)
        out[..., 80:82] = d.view(torch.uint8).reshape(*shape, 2)
        out[..., 82:84] = _f16_bytes(d.float() * 1.5)
    else:
        raise ValueError(f"no generator for {C.type_name(qtype)}")
    return out.reshape(*lead, nb * bpb)


def synthetic_rank_tensors(shape: C.Shape, plan, rank: int, dev, seed: int = 0) -> dict:
    """name -> QTensor/Tensor of this rank's shard, random, with synth's scaling."""
    from ds4tp.qtensor import QTensor
    from ds4tp.shard.load import _is_matrix
    from ds4tp.synth import tensor_target_std
    specs = C.expected_tensors(shape)
    g = torch.Generator(device=dev)
    out = {}
    for i, tp in enumerate(plan.tensors):
        g.manual_seed(seed * 100003 + i)
        name, local = tp.name, tp.local_shape(rank)
        spec = specs[name]
        role = name.split(".", 2)[-1] if name.startswith("blk.") else name
        if tp.qtype == C.F32:
            n = local[0]
            if "hc_" in role and role.endswith("scale.weight"):
                t = torch.rand(n, generator=g, device=dev) + 0.5
            elif "hc_" in role and role.endswith("base.weight"):
                t = 0.5 * torch.randn(n, generator=g, device=dev)
                if n == shape.hc_mix:
                    t[2 * shape.n_hc + torch.arange(shape.n_hc, device=dev) * (shape.n_hc + 1)] += 1
            elif role == "attn_sinks.weight":
                t = 0.5 + torch.randn(n, generator=g, device=dev)
            elif role == "exp_probs_b.bias":
                t = 0.1 * torch.randn(n, generator=g, device=dev)
            else:                                              # norms
                t = 1 + 0.1 * torch.randn(n, generator=g, device=dev)
            out[name] = t
            continue
        if tp.qtype == C.I32:                                  # tid2eid: distinct ids per token
            V, K = local
            out[name] = torch.rand(V, shape.n_expert, generator=g, device=dev).argsort(-1)[:, :K]
            continue
        std = torch.tensor(tensor_target_std(name, spec, shape))
        if not _is_matrix(name, local):                        # F16 tables (embedding, APE)
            out[name] = (torch.randn(*local, generator=g, device=dev) * std).to(torch.float16)
            continue
        if len(local) == 3 and role in ("ffn_gate_exps.weight", "ffn_up_exps.weight"):
            std = std * torch.exp(torch.empty(local[0]).uniform_(math.log(0.5), math.log(3.5)))
            std = std.reshape(-1, 1)                           # per expert
        raw = _quant_blocks(tp.qtype, local[:-1], local[-1], std, g, dev)
        out[name] = QTensor(tp.qtype, tuple(local), raw)
    return out


def build_model(shape, rank, world, comm, dev, seed=0, split_compressors=True):
    from ds4tp.model import DS4Model, Weights
    from ds4tp.shard.plan import make_plan
    plan = make_plan(shape, world, split_compressors=split_compressors)
    tensors = synthetic_rank_tensors(shape, plan, rank, dev, seed)
    m = DS4Model(shape, Weights.bind(tensors, shape), rank=rank, world=world, comm=comm, device=dev)
    m.plan = plan
    return m


# ---- measurements ------------------------------------------------------------------------------
def _sync():
    torch.cuda.synchronize()


def copy_bandwidth(dev, nbytes=4 << 30, iters=20) -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    _sync()
    t = time.perf_counter()
    for _ in range(iters):
        b.copy_(a)
    _sync()
    bw = 2 * nbytes * iters / (time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return bw


class NullComm:
    """Collectives removed: same work per rank, no communication (weight-streaming timing)."""

    def __init__(self, rank, world):
        from ds4tp.comm import Counter
        self.rank, self.world, self.counter = rank, world, Counter()

    def all_reduce(self, x):
        return x

    def all_gather(self, x, dim=-1):
        return torch.cat([x] * self.world, dim=dim)

    def peer_sum(self, x):
        return None


def prefilled(model, depth: int):
    """A session holding a synthetic prompt of `depth` tokens (at least one), prefilled in
    chunks of 2048: the starting point of a decode at that depth."""
    st = model.new_state()
    prompt = [(7 * i + 3) % model.shape.vocab for i in range(max(1, depth))]
    for a in range(0, len(prompt), 2048):
        model.forward(prompt[a:a + 2048], st)
    return st


def time_decode(model, depth: int, steps: int, max_ctx: int, warm: int = 8,
                priority: int | None = None, chained: bool = False) -> dict:
    """Greedy decode after a `depth`-token prefill: tok/s over `steps` steps (graphs captured
    and first tokens excluded). priority: of the stream the graphs are captured on (None: the
    decoder's default). chained: each step consumes the greedy pick the step before left on
    the device and is queued before the host reads that pick (the served path's chaining,
    worker.runtime.Runtime._chain); otherwise the host reads each token before the next step."""
    from ds4tp.decode_graph import CAPTURE_PRIORITY, StaticDecoder
    st = prefilled(model, depth)
    dec = StaticDecoder(model, max_ctx=max_ctx,
                        priority=CAPTURE_PRIORITY if priority is None else priority)
    dec.load_session(st)
    tok = 11
    for _ in range(warm):
        tok = int(dec.step(tok).argmax())
    # capture every variant the timed window will meet
    _sync()
    t = time.perf_counter()
    if chained:
        held = None
        for _ in range(steps):
            dec.step(None)
            host = torch.empty(2, dtype=torch.float64, pin_memory=True)
            host.copy_(dec.pick, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            if held is not None:
                held[1].synchronize()
                tok = int(held[0][0])
            held = (host, ev)
        held[1].synchronize()
    else:
        for _ in range(steps):
            tok = int(dec.step(tok).argmax())
    el = time.perf_counter() - t
    res = {"depth": depth, "steps": steps, "tok_s": steps / el, "ms_per_token": 1e3 * el / steps,
           "variants_captured": len(dec.graphs), "chained": chained}
    # each captured variant replayed alone (the tokens ending a ratio-4 window emit compressed
    # rows: one step in four): ms per replay, keyed "emit4,emit128,indexer"
    if dec.graphs:
        res["variant_ms"] = {}
        for var, (g, _) in dec.graphs.items():
            g.replay()
            _sync()
            t = time.perf_counter()
            for _ in range(20):
                g.replay()
            _sync()
            res["variant_ms"][",".join(str(int(v)) for v in var)] = 1e3 * (time.perf_counter() - t) / 20
    return res


def decode_logits(model, steps: int, max_ctx: int = 256) -> torch.Tensor:
    """[steps, V] logits of a greedy decode through the graphs after a one-token prompt."""
    from ds4tp.decode_graph import StaticDecoder
    dec = StaticDecoder(model, max_ctx=max_ctx)
    dec.load_session(prefilled(model, 1))
    tok, out = 11, []
    for _ in range(steps):
        lg = dec.step(tok).clone()
        out.append(lg)
        tok = int(lg.argmax())
    return torch.stack(out)


def all_reduces_per_token(shape) -> int:
    """A decoded token's all-reduces at TP > 1: the attention's and the FFN's output per layer."""
    return 2 * shape.n_layer


def time_collectives(comm, shape, dev, iters=50) -> dict:
    """One decoded token's collectives alone: 2 all-reduces of E floats per layer + the logits
    gather, eager (per_token_ms: bound by the host's launches as much as by the link) and
    replayed from a CUDA graph, as the decode graphs issue them (graph_per_token_ms)."""
    if comm.world == 1:
        return {"per_token_ms": 0.0, "n_all_reduce": 0}
    x = torch.ones(1, shape.n_embd, device=dev)
    lg = torch.ones(1, shape.vocab // comm.world, device=dev)
    n = all_reduces_per_token(shape)

    def token():
        for _ in range(n):
            comm.all_reduce(x)
        comm.all_gather(lg)
    for _ in range(5):
        comm.all_reduce(x)
    _sync()
    t = time.perf_counter()
    for _ in range(iters):
        token()
    _sync()
    per = (time.perf_counter() - t) / iters
    res = {"per_token_ms": 1e3 * per, "n_all_reduce": n, "per_all_reduce_us": 1e6 * per / (n + 1)}
    try:
        g = graph_seconds(token, torch.device(dev), reps=iters, rounds=1, warm=1)
        res.update(graph_per_token_ms=1e3 * g, graph_per_collective_us=1e6 * g / (n + 1))
    except Exception as e:      # (a measurement only: the run goes on without it)
        res["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    return res


def captured(fn, dev: torch.device, warm: int = 1):
    """fn() run `warm` times on a side stream (allocator, compilation, communicators; as the
    decoder warms up), then captured once in a CUDA graph: (the graph, what fn returned in it)."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_seconds(fn, dev: torch.device, reps: int = 50, rounds: int = 3, warm: int = 2) -> float:
    """GPU seconds per call of fn() replayed from a CUDA graph (`captured`), replayed `reps`
    times back to back, timed by events; the best of `rounds`."""
    graph, _ = captured(fn, dev, warm)
    graph.replay()
    torch.cuda.synchronize(dev)
    best = float("inf")
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            graph.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3 / reps)
    return best


# The Triton and CUDA C kernels that stream weights (and quantise their activations); everything
# else in a step (Inductor's fused small ops, attention, copies) is "other". The HC steps
# (_hc_step_kernel, _hc_logits_kernel) read the F16 mixer weights (1.6 MB a layer, 1.4% of a TP=2
# rank's bytes) but also update the streams, so they count as other work; the compressor step
# (_comp_step_kernel: two F16 projections into the frontier; _comp_pair_kernel: a ratio-4 layer's
# two compressors in one launch) was counted there too before the fifteenth session.
WEIGHT_KERNELS = {"_linear_kernel", "_q8s_matvec_kernel", "_expert_kernel", "_expert_small_kernel",
                  "_q2k_sum_kernel", "_quant_kernel", "iq2xxs_swiglu", "q2k_down_sum", "q8_0_matvec",
                  "_comp_step_kernel", "_comp_pair_kernel",
                  "f16_matvec",   # f16_matvec: the router, as _linear_kernel was
                  "iq2xxs_swiglu_mma", "iq2xxs_slots_mma", "q2k_slots_mma",   # (a prefill's)
                  "q8_0_matvec_mix", "q2k_down_sum_mix"}   # (carrying an HC Sinkhorn block)


COLLECTIVE_KERNELS = {"ar2_sum"}     # kernels.cuda_allreduce: the within-host all-reduce


def profile_split(model, max_ctx: int = 256) -> dict:
    """GPU time of one eager decode step, split into the weight matvec kernels (our Triton
    kernels that stream weights) and everything else (small fused ops, attention, copies).
    Programmatic dependent launch is off for it: with it, a kernel starts before the one ahead
    ends and its measured time takes in part of that one's. So is the within-host all-reduce
    inside the HC step: eager, a rank's HC step would wait there for the other rank's host, and
    that wait belongs to the collectives (ar2_sum's launches, left out), not to the kernel."""
    from torch.profiler import ProfilerActivity, profile

    from ds4tp.decode_graph import StaticDecoder
    from ds4tp.kernels import pdl
    st = model.new_state()
    model.forward([1], st)
    dec = StaticDecoder(model, max_ctx=max_ctx, use_graphs=False)
    dec.load_session(st)
    peer = getattr(model.comm, "peer", None)
    unfused = _setting(peer, "fuse", False) if peer is not None else contextlib.nullcontext()
    with _switched_off(pdl.set_enabled), unfused:
        for _ in range(3):
            dec.step(5)
        _sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dec.step(5)
            _sync()
    mv = other = 0.0
    kernels = {}
    for ev in prof.key_averages():
        t = ev.self_device_time_total if hasattr(ev, "self_device_time_total") else ev.self_cuda_time_total
        if t <= 0:
            continue
        name = ev.key
        if name in WEIGHT_KERNELS:                       # ds4tp.kernels that stream weights
            mv += t
        elif name.startswith("nccl") or name in COLLECTIVE_KERNELS:   # collectives (waits included)
            continue
        elif not name.startswith("aten::") and not name.startswith("cuda"):
            other += t
        else:
            continue
        kernels[name[:60]] = {"us": round(t, 1), "n": ev.count, "weights": name in WEIGHT_KERNELS}
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1]["us"])[:30])
    return {"matvec_ms": mv / 1e3, "other_gpu_ms": other / 1e3, "kernels": top}


def compressor_gathers_per_token(plan) -> float:
    """All-gathers a decoded token makes on average for compressors split by channel: a layer
    gathers its compressors' pooled rows once per window (every r-th token)."""
    s = plan.shape
    if plan.world == 1 or not plan.compressors_split:
        return 0.0
    return sum(1 / s.ratio(il) for il in range(s.n_layer) if s.ratio(il))


SPARK_BW = 230e9      # a DGX Spark's memory bandwidth, bytes/s (the projection)
SPARK_AR_S = 31e-6    # one all-reduce between two Sparks over RoCE, seconds


def spark_projection(run: dict, bw_spark=SPARK_BW, ar_s=SPARK_AR_S) -> dict:
    """Paper projection to two Sparks from one TP=2 run's measured pieces: per-rank weight
    bytes at the matvec kernels' achieved fraction of the measured copy bandwidth, plus the
    token's collectives at 31 us each, plus the measured non-matvec time of a step."""
    bytes_rank = run["bytes_per_token"]
    mv_s = run["profile"]["matvec_ms"] / 1e3
    frac = bytes_rank / mv_s / (run["copy_bw_GBs"] * 1e9)
    step_nocomm = run["decode_d0_nocomm"]["ms_per_token"] / 1e3
    fixed = max(0.0, step_nocomm - mv_s)
    return {"achieved_fraction": frac, "fixed_overhead_ms": 1e3 * fixed,
            **spark_token(run, frac, fixed, bw_spark, ar_s),
            "formula": "bytes_rank/(fraction*230GB/s) + collectives*31us + fixed"}


def spark_token(run: dict, frac: float, fixed: float, bw_spark: float = SPARK_BW,
                ar_s: float = SPARK_AR_S) -> dict:
    """The projection's formula for one TP=2 run: its per-rank bytes at frac of bw_spark, its
    token's collectives at ar_s each (the all-reduces, the logits gather and, on average, the
    compressors' row gathers when split by channel), plus fixed seconds."""
    n_coll = run["collectives"]["n_all_reduce"] + 1 + run.get("compressor_gathers_per_token", 0.0)
    t = run["bytes_per_token"] / (frac * bw_spark) + n_coll * ar_s + fixed
    return {"collectives": n_coll, "ms_per_token": 1e3 * t, "tok_s": 1 / t}


# The weights each decode weight kernel streams (GGUF tensor names without "blk.N."): the
# key to splitting a kernel's time into a part per byte and a fixed part (streaming_fit).
# q8_0_matvec: q_a|kv (one launch), q_b, output_a, output_b, the LM head; the routed launches
# carry the shared expert's rows; the router (f16_matvec) is replicated at every TP size.
KERNEL_WEIGHTS = {
    "q8_0_matvec": ("attn_q_a", "attn_kv", "attn_q_b", "attn_output_a", "attn_output_b", "output"),
    "iq2xxs_swiglu": ("ffn_gate_exps", "ffn_up_exps", "ffn_gate_shexp", "ffn_up_shexp"),
    "q2k_down_sum": ("ffn_down_exps", "ffn_down_shexp"),
    "_comp_step_kernel": ("attn_compressor_kv", "attn_compressor_gate", "indexer_compressor_kv",
                          "indexer_compressor_gate"),
    "f16_matvec": ("ffn_gate_inp",),
}
# Several kernels' launches counted as one key of KERNEL_WEIGHTS: the compressors' weights go
# through a launch each (ratio-128 layers, and ratio-4 layers before the thirty-first session)
# or a ratio-4 layer's two through one (_comp_pair_kernel); the decode graphs' attn_output_b and
# routed down run as the _mix kernels, which carry the next HC update's Sinkhorn as one block.
KERNEL_ALIASES = {"_comp_step_kernel": ("_comp_step_kernel", "_comp_pair_kernel"),
                  "q8_0_matvec": ("q8_0_matvec", "q8_0_matvec_mix"),
                  "q2k_down_sum": ("q2k_down_sum", "q2k_down_sum_mix")}


def kernel_time(kernels: dict, key: str) -> dict | None:
    """A KERNEL_WEIGHTS key's eager time in a profile's kernels: {"us", "n"} summed over its
    KERNEL_ALIASES (None if none of them ran)."""
    rows = [kernels[n] for n in KERNEL_ALIASES.get(key, (key,)) if n in kernels]
    if not rows:
        return None
    return {"us": sum(r["us"] for r in rows), "n": sum(r["n"] for r in rows)}


def kernel_bytes(plan, rank: int = 0) -> dict:
    """Bytes a decoded token streams per weight kernel of KERNEL_WEIGHTS on this rank."""
    import re
    owner = {w: k for k, ws in KERNEL_WEIGHTS.items() for w in ws}
    out = dict.fromkeys(KERNEL_WEIGHTS, 0)
    for t in plan.tensors:
        base = re.sub(r"^blk\.\d+\.", "", t.name).removesuffix(".weight")
        if base in owner:
            out[owner[base]] += t.rank_token_bytes[rank]
    return out


def line_fit(xs: list, ys: list) -> tuple:
    """Least squares y = a + b x over the points -> (a, b, largest |residual|)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    return a, b, max(abs(y - a - b * x) for x, y in zip(xs, ys))


def streaming_fit_many(runs: list, kbytes: list, note: str) -> dict:
    """Each weight kernel's eager time in runs that stream different bytes through the same
    launches (TP sizes of one model: ranks of other widths), fitted by least squares as
    time = fixed + bytes / rate: the rate is what an extra byte costs (the kernel's streaming
    rate), the fixed part what it costs whatever its bytes (launch, prologue, latency chains,
    tail). runs: bench results with "profile" and "copy_bw_GBs"; kbytes: kernel_bytes of each.
    Kernels with the same bytes in every run (the replicated router) or whose launches differ
    between runs are left out, and so is a slope at or above copy speed (the runs' noise, not a
    rate). The streaming fraction weighs the kernels by the first run's bytes (the TP=2 rank's,
    for spark_projection_fit). With more than two runs, max_residual_us says how well one line
    holds."""
    copy = sum(r["copy_bw_GBs"] for r in runs) / len(runs) * 1e9
    per, fit_bytes, fit_s = {}, 0, 0.0
    for k in KERNEL_WEIGHTS:
        pts = [kernel_time(r["profile"]["kernels"], k) for r in runs]
        if any(p is None for p in pts) or len({p["n"] for p in pts}) != 1:
            continue
        bs = [kb[k] for kb in kbytes]
        us = [p["us"] for p in pts]
        row = {"launches": pts[0]["n"], "bytes": bs, "us": us}
        fixed_us, us_per_byte, resid = line_fit(bs, us)
        if us_per_byte <= 0 or 1e6 / us_per_byte > copy:
            # no byte difference to fit, or a rate above the copy's: the runs' noise (seen for
            # the compressor step, s31c), not a streaming rate
            row["fit"] = None
        else:
            rate = 1e6 / us_per_byte
            row.update(fit=True, rate_GBs=rate / 1e9, fraction_of_copy=rate / copy,
                       fixed_us=fixed_us, fixed_us_per_launch=fixed_us / pts[0]["n"])
            if len(runs) > 2:
                row["max_residual_us"] = resid
            fit_bytes += bs[0]
            fit_s += bs[0] / rate
        per[k] = row
    frac = fit_bytes / fit_s / copy if fit_s else None
    return {"kernels": per, "copy_GBs": copy / 1e9, "fitted_bytes": fit_bytes,
            "streaming_fraction": frac, "note": note}


def streaming_fit(run_a: dict, run_b: dict, bytes_a: dict, bytes_b: dict) -> dict:
    """streaming_fit_many of two runs, a TP=2 and a TP=1 one of one bench run (run a's step
    without collectives feeds spark_projection_fit)."""
    return streaming_fit_many([run_a, run_b], [bytes_a, bytes_b],
                              "two-point fit per kernel: eager profile (PDL off) of run a (TP=2) and b (TP=1)")


def spark_projection_fit(run: dict, fit: dict, bw_spark=SPARK_BW, ar_s=SPARK_AR_S) -> dict | None:
    """spark_projection with its two pieces taken from streaming_fit instead: the fraction is
    the weight kernels' streaming rate (what a byte costs them) over the copy bandwidth, and the
    fixed time is the rest of the measured step without collectives once every byte of the
    rank is streamed at that rate. Same formula; the fixed time stays at the H200's."""
    frac = fit.get("streaming_fraction")
    if not frac:
        return None
    step_nocomm = run["decode_d0_nocomm"]["ms_per_token"] / 1e3
    streaming = run["bytes_per_token"] / (frac * run["copy_bw_GBs"] * 1e9)
    fixed = max(0.0, step_nocomm - streaming)
    return {"achieved_fraction": frac, "h200_streaming_ms": 1e3 * streaming,
            "fixed_overhead_ms": 1e3 * fixed, **spark_token(run, frac, fixed, bw_spark, ar_s),
            "formula": "bytes_rank/(fitted fraction*230GB/s) + collectives*31us + "
                       "(H200 step without collectives - its streaming part)"}


def fit_runs(out: dict) -> None:
    """streaming_fit and spark_projection_fit into a bench result holding TP=2 and TP=1 runs
    with profiles (in place; nothing without both)."""
    from ds4tp.shard.plan import make_plan
    runs = out.get("runs", {})
    r2, r1 = runs.get("tp2"), runs.get("tp1")
    if not (r2 and r1 and "profile" in r2 and "profile" in r1):
        return
    shape = C.Shape(n_layer=out["shape"]["n_layer"])
    split = out.get("cfg", {}).get("split_compressors", True)
    fit = streaming_fit(r2, r1, kernel_bytes(make_plan(shape, 2, split_compressors=split)),
                        kernel_bytes(make_plan(shape, 1, split_compressors=split)))
    out["streaming_fit"] = fit
    if "decode_d0_nocomm" in r2:
        out["spark_projection_fit"] = spark_projection_fit(r2, fit)


def bench_prompt(vocab: int, n_tok: int) -> list:
    """The benchmarks' prompt of n_tok token ids (a fixed spread over the vocabulary)."""
    return [(5 * i + 1) % vocab for i in range(n_tok)]


def time_prefill(model, n_tok: int, reps: int = 3) -> dict:
    """Prefill of an n_tok-token prompt into a fresh session: tok/s of the median of `reps`
    timed calls (after one untimed call that compiles kernels for this T); every time kept."""
    prompt = bench_prompt(model.shape.vocab, n_tok)
    model.forward(prompt, model.new_state())      # kernel compilation (launch shapes follow T)
    _sync()
    times, host = [], []
    for _ in range(reps):
        t = time.perf_counter()
        model.forward(prompt, model.new_state())
        host.append(time.perf_counter() - t)
        _sync()
        times.append(time.perf_counter() - t)
    el = sorted(times)[len(times) // 2]
    # host_seconds: when forward() returned (all queued); close to all_seconds, the host's
    # launches were the bound (a TP=2 prefill's are: performance.md, eighteenth session)
    return {"tokens": n_tok, "seconds": el, "tok_s": n_tok / el, "all_seconds": times,
            "host_seconds": host}


PLAIN_WEIGHT_LOADS = (("WEIGHT_LD", 0),)   # cuda_c.VARIANT_DEFINES: common.cuh's wld as plain __ldg


@contextlib.contextmanager
def _setting(module, name: str, value):
    """A module's launch-rule constant set for an A/B timing, then the default again."""
    keep = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, keep)


@contextlib.contextmanager
def _switched_off(set_enabled):
    """A kernel path switched off for an A/B timing in the same run, and on again after."""
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(True)


def _decode_variants(model, dev, steps, save, res) -> None:
    """The same-run A/B variants of the depth-0 decode (each path switched off in turn)."""
    # the same without programmatic dependent launch (ds4tp.kernels.pdl: every kernel then
    # starts only after the one ahead has finished), then with it again (the run's noise)
    from ds4tp.kernels import cuda_experts, cuda_matvec, pdl, triton_hc
    if pdl.enabled(torch.device(dev)):
        with _switched_off(pdl.set_enabled):
            res["decode_d0_no_pdl"] = time_decode(model, 1, steps, max_ctx=256)
        res["decode_d0_again"] = time_decode(model, 1, steps, max_ctx=256)
        save()
    # the HC stream update and the next mixer as three launches instead of one (triton_hc.hc_step)
    with _switched_off(triton_hc.set_step_enabled):
        res["decode_d0_hc_three_launches"] = time_decode(model, 1, steps, max_ctx=256)
    save()
    # the same decode with every sublayer's work on one stream (no shared-expert / compressor
    # overlap, ds4tp.streams): what the second stream buys, measured in this run
    model.overlap = False
    res["decode_d0_one_stream"] = time_decode(model, 1, steps, max_ctx=256)
    model.overlap = True
    save()
    # the routed experts (cuda_experts), then the one-token Q8_0 matvecs (cuda_matvec) on the
    # Triton kernels instead of the CUDA C ones, one at a time, same run
    for key, path in (("decode_d0_triton_experts", cuda_experts), ("decode_d0_triton_q8_0", cuda_matvec)):
        if path.available():
            with _switched_off(path.set_enabled):
                res[key] = time_decode(model, 1, steps, max_ctx=256)
            save()
    # a ratio-4 compressor's emission (every fourth token) as its torch twin (~20 launches per
    # compressor) instead of one Triton launch (triton_attn.compressor_emit)
    from ds4tp.kernels import triton_attn
    with _switched_off(triton_attn.set_emit_enabled):
        res["decode_d0_emit_torch"] = time_decode(model, 1, steps, max_ctx=256)
    save()
    # the graph captured on a stream of the default priority 0 instead of decode_graph.
    # CAPTURE_PRIORITY (-1: the main stream's kernels go before the side lanes' at 0)
    res["decode_d0_priority_default"] = time_decode(model, 1, steps, max_ctx=256, priority=0)
    save()


def _prefill_variants(model, n, save, res) -> None:
    """The same-run A/B variants of the prefill (each piece on its previous path in turn)."""
    # the same prefill with the routed experts on the exact path (Q8_K activations, Triton:
    # the default before the tensor-core float16 kernels of cuda_experts.many), same run
    from ds4tp.kernels import triton_attn, triton_gemm
    with _setting(triton_gemm, "H16_MIN_PAIRS", None):
        res["prefill_exact_experts"] = time_prefill(model, n)
    save()
    # the same prefill with the F16 weights' products in 3xTF32 (the Triton kernel) instead
    # of the split activation on cuBLAS (triton_gemm.f16_split_mm)
    with _setting(triton_gemm, "F16_CUBLAS", False):
        res["prefill_f16_3xtf32"] = time_prefill(model, n)
    save()
    # the same prefill with attention in query chunks of torch ops (model.attend_many's twin)
    # instead of one Triton launch per layer (triton_attn.prefill_attention)
    with _switched_off(triton_attn.set_prefill_enabled):
        res["prefill_attention_chunks"] = time_prefill(model, n)
    save()
    # the same prefill with the compressors' emitted rows as model.compressed_rows' torch
    # twin (~60 launches per compressor) instead of one Triton launch (compressor_rows)
    with _switched_off(triton_attn.set_rows_enabled):
        res["prefill_compressor_rows_torch"] = time_prefill(model, n)
    save()


def _logits_diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Two variants' greedy logits [steps, V] whose float sums differ in order: the first step's
    largest difference (the same input), its largest logit, and the steps whose picks agree."""
    return {"first_step_max_abs_diff": float((a[0] - b[0]).abs().max()),
            "first_step_max_abs_logit": float(b[0].abs().max()),
            "same_picks": int((a.argmax(-1) == b.argmax(-1)).sum()), "steps": a.shape[0]}


def _decode_and_logits(model, steps: int, priority: int | None = None):
    """An A/B variant's depth-0 decode, plain and chained, and its logits of 8 greedy steps."""
    return (time_decode(model, 1, steps, max_ctx=256, priority=priority),
            time_decode(model, 1, steps, max_ctx=256, chained=True, priority=priority),
            decode_logits(model, 8))


def _bench_rank(comm, dev, cfg):
    torch.cuda.set_device(dev)

    def save():   # partial results survive a run cut short
        if cfg.get("partial") and comm.rank == 0:
            with open(f"{cfg['partial']}.tp{comm.world}.json", "w") as f:
                json.dump(res, f, indent=1)

    shape = C.Shape(n_layer=cfg["layers"]) if cfg["layers"] else C.FULL
    res = {"rank": comm.rank, "world": comm.world, "device": torch.cuda.get_device_name(dev)}
    res["copy_bw_GBs"] = copy_bandwidth(dev) / 1e9
    t = time.perf_counter()
    model = build_model(shape, comm.rank, comm.world, comm, dev,
                        split_compressors=cfg.get("split_compressors", True))
    _sync()
    res["build_s"] = time.perf_counter() - t
    res["bytes_per_token"] = model.plan.token_bytes(comm.rank)
    res["compressor_gathers_per_token"] = compressor_gathers_per_token(model.plan)
    res["collectives"] = time_collectives(comm, shape, dev)
    save()
    steps = cfg["steps"]
    res["decode_d0"] = time_decode(model, 1, steps, max_ctx=256)
    save()
    res["decode_d0_chained"] = time_decode(model, 1, steps, max_ctx=256, chained=True)
    save()
    mine = decode_logits(model, 8)      # the default path's logits, for every A/B below
    # the within-host all-reduce (kernels.cuda_allreduce, on where two ranks share a host)
    # against NCCL's in the same run, and the logits of both bit for bit
    peer = getattr(comm, "peer", None)
    res["peer_all_reduce"] = "on" if peer is not None else getattr(comm, "peer_why", None)
    if peer is not None:
        # the sublayers' all-reduces in a launch of their own (ar2_sum) instead of inside the
        # HC step that consumes them (PeerAllReduce.fused), and the logits of both
        with _setting(peer, "fuse", False):
            res["decode_d0_ar2"], res["decode_d0_chained_ar2"], ref = _decode_and_logits(model, steps)
        res["peer_fused_logits_equal_ar2"] = bool(torch.equal(mine, ref))
        save()
        with _setting(peer, "on", False):
            res["collectives_nccl"] = time_collectives(comm, shape, dev)
            res["decode_d0_nccl"], res["decode_d0_chained_nccl"], ref = _decode_and_logits(model, steps)
        res["peer_logits_equal_nccl"] = bool(torch.equal(mine, ref))
        save()
    # the HC mixers' Sinkhorn inside the one-launch hc_step instead of beside the sublayer
    from ds4tp import decode_graph
    with _switched_off(decode_graph.set_mix_side_enabled):
        res["decode_d0_chained_sinkhorn_inline"] = time_decode(model, 1, steps, max_ctx=256, chained=True)
    save()
    # the same Sinkhorn beside the sublayer on a side stream of its own, joined before the
    # update (as up to the thirty-ninth session), instead of riding in the sublayer's last launch
    with _switched_off(decode_graph.set_mix_ride_enabled):
        res["decode_d0_chained_mix_beside"] = time_decode(model, 1, steps, max_ctx=256, chained=True)
    save()
    # the shared expert in launches of its own on its side lane (as up to the twenty-first
    # session) instead of riding in the routed experts' two launches (cuda_experts)
    from ds4tp.kernels import cuda_experts
    if cuda_experts.takes_shared():
        with _switched_off(cuda_experts.set_shared_enabled):
            res["decode_d0_chained_shared_own_launches"] = time_decode(model, 1, steps, max_ctx=256,
                                                                        chained=True)
        save()
    # the routed gate/up rows in GGUF's byte order (as up to the twenty-sixth session) instead of
    # the decode order (kernels.prepare_weights), and the logits of both
    from ds4tp import kernels
    res["iq2_decode_order_weights"] = kernels.prepare_weights(model.w)     # (done at build: counts)
    if res["iq2_decode_order_weights"]:
        kernels.prepare_weights(model.w, decode_order=False)
        try:
            res["decode_d0_gguf_order"], res["decode_d0_chained_gguf_order"], ref = \
                _decode_and_logits(model, steps)
        finally:
            kernels.prepare_weights(model.w)
        res["decode_order_logits_equal_gguf"] = bool(torch.equal(mine, ref))
        save()
        # the decode order's gate/up through one grid table, the sign masks computed (as up to
        # the twenty-seventh session), instead of the tables per bank pair (experts.cu A_TAB)
        with _switched_off(cuda_experts.set_tables_enabled):
            res["decode_d0_one_table"], res["decode_d0_chained_one_table"], ref = \
                _decode_and_logits(model, steps)
        res["tables_logits_equal_one_table"] = bool(torch.equal(mine, ref))
        save()
    # the HC step at 8 warps a program (as up to the twenty-eighth session) instead of
    # triton_hc.HC_STEP_WARPS (sums in another order: the logits are compared by the first
    # step's largest difference and by the greedy picks; an expert choice near a tie flips)
    from ds4tp.kernels import triton_hc
    with _setting(triton_hc, "HC_STEP_WARPS", 8):
        res["decode_d0_hc_step_8_warps"], res["decode_d0_chained_hc_step_8_warps"], ref = \
            _decode_and_logits(model, steps)
    res["hc_step_warps_logits_vs_8"] = _logits_diff(mine, ref)
    save()
    # a ratio-4 layer's two compressor steps in a launch each (as up to the thirtieth session)
    # instead of one (triton_attn.compressor_pair; sums in another order where the launch
    # shapes differ: the logits are compared as above)
    from ds4tp.kernels import triton_attn
    with _switched_off(triton_attn.set_pair_enabled):
        res["decode_d0_comp_two"], res["decode_d0_chained_comp_two"], ref = _decode_and_logits(model, steps)
    res["comp_pair_logits_vs_two"] = _logits_diff(mine, ref)
    save()
    # the decode attention at 4 warps a program for 64 heads (as up to the thirtieth session)
    # instead of triton_attn.ATTN_WARPS_MANY (other sums' order: logits compared as above)
    if triton_attn.attn_warps(model.shape.n_head // model.world) != triton_attn.ATTN_WARPS:
        with _setting(triton_attn, "ATTN_WARPS_MANY", 4):
            res["decode_d0_attn_w4"], res["decode_d0_chained_attn_w4"], ref = _decode_and_logits(model, steps)
        res["attn_warps_logits_vs_4"] = _logits_diff(mine, ref)
        save()
    # the compressors joined before the attention on every token and the graphs captured at
    # the default priority 0 (as up to the thirty-sixth session, and from ceaa5f6 to session 39)
    # instead of joined at the step's end on a token that ends no window, at priority -1
    # (decode_graph.COMP_JOIN, CAPTURE_PRIORITY): the same math on other streams, so the same bits
    with _setting(decode_graph, "COMP_JOIN", "attention"):
        res["decode_d0_comp_join_attention"], res["decode_d0_chained_comp_join_attention"], ref = \
            _decode_and_logits(model, steps, priority=0)
    res["comp_join_logits_equal_attention"] = bool(torch.equal(mine, ref))
    save()
    # the streamed weights' loads as plain __ldg (as up to the thirty-fifth session) instead of
    # with the streaming operator (common.cuh wld): the same math, so the same bits
    from ds4tp.kernels import cuda_c
    with _setting(cuda_c, "VARIANT_DEFINES", PLAIN_WEIGHT_LOADS):
        res["decode_d0_weights_ldg"], res["decode_d0_chained_weights_ldg"], ref = \
            _decode_and_logits(model, steps)
    res["weights_ldg_logits_equal"] = bool(torch.equal(mine, ref))
    save()
    if cfg["ab"]:
        _decode_variants(model, dev, steps, save, res)
    # weight streaming alone: the same decode with the collectives removed
    real = model.comm
    model.comm = NullComm(comm.rank, comm.world)
    res["decode_d0_nocomm"] = time_decode(model, 1, steps, max_ctx=256)
    model.comm = real
    save()
    if cfg["prefill"]:
        res["prefill"] = time_prefill(model, cfg["prefill"])
        save()
        if cfg["ab"]:
            _prefill_variants(model, cfg["prefill"], save, res)
    # after the prefills: once the torch profiler has run, later eager launches in the process
    # may cost more (bench/prefill_ab.py times a prefill after it)
    res["profile"] = profile_split(model)
    save()
    if cfg["depth"]:
        from ds4tp.kernels import triton_attn
        depth, ctx, big = cfg["depth"], cfg["depth"] + steps + 64, max(65536, cfg["depth"] + steps + 64)
        res["decode_deep"] = time_decode(model, depth, steps, max_ctx=ctx)
        save()
        res["decode_deep_chained"] = time_decode(model, depth, steps, max_ctx=ctx, chained=True)
        save()
        with _setting(cuda_c, "VARIANT_DEFINES", PLAIN_WEIGHT_LOADS):   # as at depth 0 above
            res["decode_deep_chained_weights_ldg"] = time_decode(model, depth, steps, max_ctx=ctx,
                                                                 chained=True)
        save()
        # the same with the compressors joined before the attention, at priority 0 (as at depth 0)
        with _setting(decode_graph, "COMP_JOIN", "attention"):
            res["decode_deep_chained_comp_join_attention"] = time_decode(
                model, depth, steps, max_ctx=ctx, chained=True, priority=0)
        save()
        # the same with the HC step at 8 warps a program
        with _setting(triton_hc, "HC_STEP_WARPS", 8):
            res["decode_deep_chained_hc_step_8_warps"] = time_decode(model, depth, steps, max_ctx=ctx,
                                                                     chained=True)
        save()
        # the same depth in a decoder sized for 65536 tokens (16385 index rows per ratio-4
        # layer): the indexer's launches read only the visible rows, so this should not be slower
        res["decode_deep_chained_ctx64k"] = time_decode(model, depth, steps, max_ctx=big, chained=True)
        save()
        # the indexer's scores and selection on their torch twins (a GEMM over every cached
        # row, a stable sort of the row) instead of triton_attn.index_scores / topk_mask
        with _switched_off(triton_attn.set_index_enabled):
            res["decode_deep_chained_index_torch"] = time_decode(model, depth, steps, max_ctx=ctx,
                                                                 chained=True)
            save()
            res["decode_deep_chained_ctx64k_index_torch"] = time_decode(model, depth, steps,
                                                                        max_ctx=big, chained=True)
            save()
    return res


def _load_rank(comm, dev, path):
    from ds4tp.model import DS4Model
    torch.cuda.set_device(dev)
    t = time.perf_counter()
    m = DS4Model.load(path, rank=comm.rank, world=comm.world, comm=comm, device=dev)
    _sync()
    from ds4tp import kernels
    return {"load_s": time.perf_counter() - t, "bytes": m.plan.load_bytes(comm.rank),
            # the routed gate/up weights re-ordered for the decode kernel within load_s (done at
            # load: this call only counts them)
            "iq2_decode_order_weights": kernels.prepare_weights(m.w)}


def main(args) -> int:
    from ds4tp.comm import SingleComm, run_local_ranks
    from ds4tp.shard.plan import make_plan
    if not torch.cuda.is_available():
        print("ds4tp bench needs CUDA", file=sys.stderr)
        return 2
    cfg = {"layers": args.layers, "steps": 16 if args.quick else 64,
           "depth": 0 if args.quick else args.depth, "prefill": 256 if args.quick else 2048,
           "ab": not getattr(args, "no_ab", False),
           "split_compressors": not getattr(args, "replicate_compressors", False),
           "partial": os.path.splitext(args.out)[0] if args.out else None}
    shape = C.Shape(n_layer=args.layers) if args.layers else C.FULL
    out = {"shape": {"n_layer": shape.n_layer}, "cfg": cfg,
           "tp1_bytes_per_token": make_plan(shape, 1).token_bytes(0), "runs": {}}
    if getattr(args, "load_only", False) and not getattr(args, "gguf", None):
        print("--load-only needs --gguf", file=sys.stderr)
        return 2
    for tp in ([] if getattr(args, "load_only", False) else [int(x) for x in args.tp.split(",")]):
        t = time.perf_counter()
        if tp == 1:
            r = _bench_rank(SingleComm(), "cuda:0", cfg)
        else:
            r = run_local_ranks(tp, _bench_rank, cfg, device="cuda", timeout_s=300, wall_s=1500)
        if tp == 2 and "profile" in r and "decode_d0_nocomm" in r:
            r["spark_projection"] = spark_projection(r)
        r["wall_s"] = time.perf_counter() - t
        out["runs"][f"tp{tp}"] = r
        print(json.dumps({f"tp{tp}": r}), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
    fit_runs(out)
    if "spark_projection_fit" in out:
        print(json.dumps({"streaming_fit": out["streaming_fit"],
                          "spark_projection_fit": out["spark_projection_fit"]}), flush=True)
    if getattr(args, "gguf", None):
        world = max(int(x) for x in args.tp.split(","))
        out["load"] = run_local_ranks(world, _load_rank, args.gguf, device="cuda", timeout_s=300)
        print(json.dumps({"load": out["load"]}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0
