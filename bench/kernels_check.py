"""Check and time the Triton decode kernels on a CUDA GPU (written for one H200), full DS4 shapes.

    python bench/kernels_check.py --out kernels_h200.json [--budget-s 480] [--no-sweep]

For every DS4 decode matvec (TP=1 and the per-rank TP=2 shards, real strided views included) it
  1. checks the kernel against its torch twin (ds4tp.ops) at T = 1 and 16 tokens on fresh random
     valid weights: relative error (max |diff| / max |ref|), expected ~1e-6;
  2. times it at T in --tokens: a CUDA graph replays the launch over enough distinct weight
     copies (>= 256 MB together) that nothing is served from L2, as in a decode step;
  3. reports GB/s of weight bytes and the fraction of the device-to-device copy bandwidth
     (read + write bytes / time) measured in the same run.
With sweeps on (default) it also times alternative launch configs on the main shapes and
writes, per shape and T, the fastest config found ("best") next to the default.
Every step is guarded: failures (compile errors, mismatches) are recorded and the run goes on.
The JSON is rewritten after every measurement, so a run cut short still leaves its results.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ds4tp import numerics, ops  # noqa: E402
from ds4tp.config import BLOCK, F16, IQ2_XXS, Q2_K, Q4_K, Q8_0, type_name  # noqa: E402
from ds4tp.qtensor import QTensor  # noqa: E402

import kernel_cases as kc  # noqa: E402

MB = 1 << 20
DEV = "cuda"   # "cpu" only for --selftest-cpu (Triton interpreter, tiny shapes, no real timing)
L2_FLUSH_BYTES = 256 * MB          # distinct weight bytes per timed graph (H200 L2: 60 MB)


# ---- shapes ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    name: str
    kind: str          # linear | grouped | swiglu | experts | experts_sum
    qtype: int
    shape: tuple       # weight shape (out, in) or (E, out, in)
    tp: int = 1
    groups: int = 1
    shard: str = ""    # "": whole tensor; "cols": strided column half; "rows": row half of experts
    sweep: bool = False

    @property
    def label(self):
        return f"{self.name} tp{self.tp}"


def ds4_cases() -> list[Case]:
    c = []
    L = lambda *a, **k: c.append(Case(*a, **k))  # noqa: E731
    # ---- TP=1 (and replicated tensors, identical under TP=2)
    L("attn_q_a", "linear", Q8_0, (1024, 4096), sweep=True)
    L("attn_kv", "linear", Q8_0, (512, 4096))
    L("attn_q_b", "linear", Q8_0, (32768, 1024), sweep=True)
    L("attn_out_a", "grouped", Q8_0, (8192, 4096), groups=8, sweep=True)
    L("attn_out_b", "linear", Q8_0, (4096, 8192), sweep=True)
    L("shexp_gate_up", "linear", Q8_0, (2048, 4096))
    L("shexp_down", "linear", Q8_0, (4096, 2048), sweep=True)
    L("attn_q_a_kv", "linear", Q8_0, (1536, 4096), sweep=True)        # one launch in the model
    L("shexp_gate_up_fused", "linear", Q8_0, (4096, 4096), sweep=True)  # one launch in the model
    L("output_vocab", "linear", Q8_0, (129280, 4096), sweep=True)
    L("hc_fn", "linear", F16, (24, 16384), sweep=True)
    L("router", "linear", F16, (256, 4096), sweep=True)
    L("compressor_r4", "linear", F16, (1024, 4096), sweep=True)
    L("compressor_r128", "linear", F16, (512, 4096))
    L("indexer_q_b", "linear", F16, (8192, 1024))
    L("indexer_proj", "linear", F16, (64, 4096))
    L("indexer_compressor", "linear", F16, (256, 4096))
    L("routed_gate_up", "swiglu", IQ2_XXS, (256, 2048, 4096), sweep=True)
    L("routed_gate", "experts", IQ2_XXS, (256, 2048, 4096))
    L("routed_down", "experts_sum", Q2_K, (256, 4096, 2048), sweep=True)
    L("routed_down_slots", "experts", Q2_K, (256, 4096, 2048))
    L("routed_gate_up_q4k", "swiglu", Q4_K, (256, 2048, 4096))
    L("routed_down_q4k", "experts_sum", Q4_K, (256, 4096, 2048))
    # ---- TP=2, per rank
    L("attn_q_b", "linear", Q8_0, (16384, 1024), tp=2)
    L("attn_out_a", "grouped", Q8_0, (4096, 4096), tp=2, groups=4)
    L("attn_out_b", "linear", Q8_0, (4096, 4096), tp=2, shard="cols", sweep=True)
    L("shexp_gate_up", "linear", Q8_0, (1024, 4096), tp=2)
    L("shexp_down", "linear", Q8_0, (4096, 1024), tp=2, shard="cols")
    L("output_vocab", "linear", Q8_0, (64640, 4096), tp=2)
    L("indexer_q_b", "linear", F16, (4096, 1024), tp=2)
    L("routed_gate_up", "swiglu", IQ2_XXS, (256, 1024, 4096), tp=2, shard="rows", sweep=True)
    L("routed_down", "experts_sum", Q2_K, (256, 4096, 1024), tp=2, shard="cols", sweep=True)
    return c


# ---- random weights on the GPU ---------------------------------------------------------------------
def gpu_raw(qtype, lead, n_in, gen):
    epb, bpb = BLOCK[qtype]
    nb = n_in // epb
    rows = math.prod(lead)
    if qtype == F16:
        w = torch.randn(rows, n_in, device=DEV, generator=gen).mul_(0.5).half()
        return w.view(torch.uint8).reshape(*lead, nb * bpb)
    raw = torch.randint(0, 256, (rows, nb, bpb), device=DEV, generator=gen, dtype=torch.uint8)
    for at in kc._F16_FIELDS[qtype]:
        raw[..., at:at + 2] = (torch.randn(rows, nb, 1, device=DEV, generator=gen) * 0.01).half().view(torch.uint8)
    return raw.reshape(*lead, nb * bpb)


def make_weight(case: Case, gen) -> QTensor:
    """The weight as the rank holds it: for shards, a view into the full tensor's bytes."""
    qt, shape = case.qtype, case.shape
    if case.shard == "cols":                      # input columns [0, in) of a 2*in wide tensor
        full = gpu_raw(qt, shape[:-1], 2 * shape[-1], gen)
        return kc.column_shard(QTensor(qt, (*shape[:-1], 2 * shape[-1]), full), 1, 2)
    if case.shard == "rows":                      # rows [out, 2*out) of each expert
        E, n_out, n_in = shape
        full = gpu_raw(qt, (E, 2 * n_out), n_in, gen)
        return QTensor(qt, shape, full[:, n_out:])
    return QTensor(qt, shape, gpu_raw(qt, shape[:-1], shape[-1], gen))


def weight_bytes(w: QTensor) -> int:
    return math.prod(w.shape[:-1]) * w.row_bytes


# ---- the ops under test ----------------------------------------------------------------------------
class Op:
    """Inputs for one case at T tokens, the kernel call and its twin."""

    def __init__(self, case: Case, w, w2, T, gen):
        """gen: a CPU generator (activations and ids are drawn on the CPU, then moved)."""
        self.case, self.w, self.w2, self.T = case, w, w2, T
        n_in = case.shape[-1]
        if case.kind == "grouped":
            self.x = kc.rand_act((T, case.groups * n_in), gen, DEV)
        elif case.kind in ("swiglu", "experts"):
            self.x = kc.rand_act((T, n_in), gen, DEV)
        elif case.kind == "experts_sum":
            self.x = kc.rand_act((T, 6, n_in), gen, DEV)
        else:
            self.x = kc.rand_act((T, n_in), gen, DEV)
        if case.kind in ("swiglu", "experts", "experts_sum"):
            self.ids = kc.rand_ids(T, 6, case.shape[0], gen, DEV, skip=0.0)
            self.rw = torch.rand(T, 6, device=DEV)

    def kernel(self, w, w2, cfg):
        from ds4tp.kernels import triton_matvec as tm
        k = self.case.kind
        if isinstance(cfg, CudaCfg) and k in ("linear", "grouped"):   # CUDA C Q8_0 (cuda_matvec)
            from ds4tp.kernels import cuda_matvec as cm
            y = cm.q8_0(w, self.x, self.case.groups, rpb=cfg.rpc, warps=cfg.warps, loads=cfg.loads,
                        minb=cfg.minb)
            if y is None:
                raise ValueError("the CUDA C path does not cover this case")
            return y
        if isinstance(cfg, CudaCfg):                   # the CUDA C routed kernels (cuda_experts)
            from ds4tp.kernels import cuda_experts as ce
            if k == "swiglu":
                y = ce.swiglu(w, w2, self.x, self.ids, self.rw, 10.0, rpc=cfg.rpc, warps=cfg.warps)
            else:
                y = (ce.down_sum(w, self.x, self.ids, rpc=cfg.rpc, warps=cfg.warps)
                     if k == "experts_sum" else None)
            if y is None:
                raise ValueError("the CUDA C path does not cover this case")
            return y
        if k == "linear":
            return tm.linear(w, self.x, cfg=cfg)
        if k == "grouped":
            return tm.linear(w, self.x, groups=self.case.groups, cfg=cfg)
        if k == "swiglu":
            return tm.expert_swiglu(w, w2, self.x, self.ids, self.rw, 10.0, cfg=cfg)
        return tm.expert_linear(w, self.x, self.ids, sum_slots=(k == "experts_sum"), cfg=cfg)

    def twin(self):
        k, w = self.case.kind, self.w
        if k == "linear":
            return ops.linear_torch(w, self.x)
        if k == "grouped":
            G = self.case.groups
            return ops.grouped_linear_torch(w, self.x.view(self.T, G, -1)).reshape(self.T, -1)
        # only the selected experts are dequantised: gather their bytes, remap the ids
        used = torch.unique(self.ids[self.ids >= 0])
        remap = torch.full((w.shape[0],), -1, dtype=torch.long, device=DEV)
        remap[used] = torch.arange(len(used), device=DEV)
        ids = torch.where(self.ids >= 0, remap[self.ids.clamp_min(0)], -1)
        sub = lambda q: QTensor(q.qtype, (len(used), *q.shape[1:]), q.raw[used])  # noqa: E731
        if k == "swiglu":
            g = ops.expert_linear_torch(sub(w), self.x, ids)
            u = ops.expert_linear_torch(sub(self.w2), self.x, ids)
            return numerics.swiglu_clamped(g, u, 10.0) * self.rw[..., None], g, u
        y = ops.expert_linear_torch(sub(w), self.x, ids)
        return y.sum(1) if k == "experts_sum" else y


def shrink(c: Case) -> Case:
    """Tiny stand-in of a case for the CPU self-test (same kinds, types and sharding)."""
    n_in = min(c.shape[-1], 512 if c.qtype != F16 else 256)
    n_out = min(c.shape[-2], 32 * c.groups)
    shape = (8, n_out, n_in) if len(c.shape) == 3 else (n_out, n_in)
    return dataclasses.replace(c, shape=shape)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(op: Op, cfg=None) -> float:
    got = op.kernel(op.w, op.w2, cfg)
    ref = op.twin()
    op.w.drop_cache()
    if op.case.kind == "swiglu":
        ref, g, u = ref
        err = (got - ref).abs().max().item()
        return err / (11 * (g.abs().max() + u.abs().max()).item())   # comparable to rel_err
    return rel_err(got, ref)


# ---- timing ----------------------------------------------------------------------------------------
def graph_time_ms(fn, reps=20) -> float:
    """Median ms of fn() replayed from a CUDA graph (no CPU launch overhead)."""
    import triton.testing as tt
    if DEV == "cpu":      # self-test: exercise the code, the number means nothing
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    fn()
    torch.cuda.synchronize()
    if hasattr(tt, "do_bench_cudagraph"):
        try:
            return tt.do_bench_cudagraph(fn, rep=reps, return_mode="median")
        except TypeError:
            return tt.do_bench_cudagraph(fn, rep=reps)
    return tt.do_bench(fn, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s, counting read + write bytes."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=DEV).fill_(1)
    dst = torch.empty_like(src)
    ms = graph_time_ms(lambda: dst.copy_(src), reps=50)
    del src, dst
    return 2 * n / (ms * 1e-3) / 1e9


def time_op(op: Op, copies, copies2, cfg) -> float:
    """Microseconds per launch, averaged over a graph that runs the op on each weight copy."""
    def run():
        for i, w in enumerate(copies):
            op.kernel(w, copies2[i] if copies2 else None, cfg)
    return graph_time_ms(run) * 1e3 / len(copies)


# ---- sweeps ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CudaCfg:
    """A launch of the CUDA C kernels (routed experts, Q8_0 matvec): rows per block (None: their
    default) and warps per block."""
    rpc: int | None = None
    warps: int = 16
    path: str = "cuda_c"
    loads: int = 8         # Q8_0: 16-byte loads in flight per lane
    minb: int = 0          # Q8_0: blocks per SM the register allocation must allow (0: any)


def cuda_cfgs(case: Case, T: int) -> list:
    from ds4tp.kernels import cuda_experts as ce
    from ds4tp.kernels import cuda_matvec as cm
    if DEV == "cuda" and cm.available() and T == 1 and case.qtype == Q8_0 and case.kind in ("linear", "grouped"):
        return [CudaCfg(None, 8), CudaCfg(None, 16), CudaCfg(None, 8, loads=4), CudaCfg(None, 16, loads=4),
                CudaCfg(None, 4, loads=4), CudaCfg(None, 8, loads=16), CudaCfg(None, 8, minb=3),
                CudaCfg(32, 8)]
    if not (DEV == "cuda" and ce.available() and T <= ce.MAX_T and case.kind in ("swiglu", "experts_sum")
            and case.qtype in (IQ2_XXS, Q2_K)):
        return []
    if case.kind == "swiglu":
        return [CudaCfg(None), CudaCfg(None, 8), CudaCfg(8), CudaCfg(16)]
    return [CudaCfg(None), CudaCfg(None, 8), CudaCfg(4), CudaCfg(8), CudaCfg(16), CudaCfg(32)]


def sweep_cfgs(case: Case, T: int):
    """Alternative launch configs, most promising first (the sweep stops at the deadline)."""
    return cuda_cfgs(case, T) + sweep_cfgs_triton(case, T)


def sweep_cfgs_triton(case: Case, T: int):
    from ds4tp.kernels import triton_matvec as tm
    Cfg = tm.Cfg
    if small_path(case, T):   # few-token routed experts: rows per program, unroll, warps, slots
        if case.kind == "experts_sum":
            return [Cfg(bn=8, nb=2), Cfg(bn=8, nb=4), Cfg(bn=16, nb=2), Cfg(bn=4, nb=4),
                    Cfg(bn=8, nb=4, warps=8), Cfg(bn=16, nb=2, warps=8), Cfg(bn=8, nb=1),
                    Cfg(bn=4, nb=2, warps=2), Cfg(bn=32, nb=1, warps=8), Cfg(bn=16, nb=4, warps=8)]
        return [Cfg(bn=16, nb=4), Cfg(bn=4, nb=4, warps=1), Cfg(bn=8, nb=4, warps=1),
                Cfg(bn=4, nb=8, warps=1), Cfg(bn=8, nb=4, warps=2), Cfg(bn=4, nb=4, warps=2),
                Cfg(bn=16, nb=2), Cfg(bn=32, nb=2), Cfg(bn=8, nb=2),
                Cfg(bn=8, nb=4), Cfg(bn=32, nb=1), Cfg(bn=16, nb=2, warps=2), Cfg(bn=16, nb=2, warps=8),
                Cfg(bn=32, nb=4, warps=8), Cfg(bn=64, nb=1, warps=8), Cfg(bn=16, nb=2, split=2),
                Cfg(bn=8, nb=2, split=2)]
    if case.kind == "experts_sum" and case.qtype == Q2_K and T <= tm.Q2K_SUM_MAX_T:
        return [Cfg(bn=4, warps=1, q2s=True), Cfg(bn=2, warps=1, q2s=True), Cfg(bn=8, warps=1, q2s=True),
                Cfg(bn=4, warps=2, q2s=True), Cfg(bn=16, q2s=True), Cfg(bn=32, q2s=True), Cfg(bn=8, q2s=True),
                Cfg(bn=16, warps=2, q2s=True), Cfg(bn=32, warps=8, q2s=True),
                Cfg(bn=64, warps=8, q2s=True), Cfg(bn=8, warps=2, q2s=True),
                Cfg(bn=32, nb=1, split=6, q2s=False), Cfg(bn=128, nb=1, split=6, q2s=False)]
    if case.qtype == Q8_0 and T == 1:   # split-layout kernel shapes, then the tile kernel's
        return [Cfg(bn=16, nb=16), Cfg(bn=16, nb=32), Cfg(bn=32, nb=32), Cfg(bn=32, nb=32, warps=8),
                Cfg(bn=64, nb=16, warps=8), Cfg(bn=16, nb=64, warps=8), Cfg(bn=32, nb=16, warps=2),
                Cfg(bn=8, nb=32), Cfg(bn=32, nb=16), Cfg(bn=8, nb=16), Cfg(bn=64, nb=8, warps=8),
                Cfg(bn=16, nb=32, warps=8), Cfg(bn=4, nb=32), Cfg(bn=32, nb=8, q8s=False)]
    if case.qtype == Q8_0:
        return [Cfg(bn=64, nb=4, warps=4, mma=True), Cfg(bn=32, nb=8, warps=4), Cfg(bn=64, nb=8, warps=8),
                Cfg(bn=16, nb=8, warps=4), Cfg(bn=128, nb=4, warps=8, mma=True),
                Cfg(bn=64, nb=4, warps=4, mma=True, tq_min=16), Cfg(bn=32, nb=8, warps=4, pre=True),
                Cfg(bn=64, nb=4, warps=4, mma=True, pre=True), Cfg(bn=32, nb=4, warps=4, mma=True),
                Cfg(bn=128, nb=4, warps=8)]
    if case.qtype == F16:
        return [Cfg(bn=16, nb=256, warps=4), Cfg(bn=32, nb=128, warps=4), Cfg(bn=64, nb=64, warps=4),
                Cfg(bn=64, nb=128, warps=8), Cfg(bn=16, nb=128, warps=4), Cfg(bn=128, nb=32, warps=8)]
    return [Cfg(bn=64, nb=1, warps=4), Cfg(bn=32, nb=1, warps=4), Cfg(bn=64, nb=2, warps=4),
            Cfg(bn=128, nb=1, warps=8), Cfg(bn=32, nb=2, warps=4), Cfg(bn=64, nb=1, warps=8),
            Cfg(bn=16, nb=1, warps=4),
            Cfg(bn=64, nb=1, warps=4, pre=T < 2), Cfg(bn=64, nb=1, warps=4, tq_min=16),
            Cfg(bn=64, nb=1, warps=4, stages=3), Cfg(bn=128, nb=1, warps=4)]


def small_path(case: Case, T: int) -> bool:
    """Whether the expert launch of this case at T tokens (K = 6) takes the few-token path."""
    from ds4tp.kernels import triton_matvec as tm
    return (case.kind in ("swiglu", "experts", "experts_sum") and case.qtype in tm.SMALL_TYPES
            and T * 6 <= tm.SMALL_MAX_PAIRS)


def with_split(cfg, case: Case, T: int, factor: float = 1.0):
    """cfg with the default heuristic's split for its row tile (scaled by factor); the
    few-token expert path's configs stay as they are (split = slots per program there)."""
    from ds4tp.kernels import triton_matvec as tm
    if small_path(case, T) or isinstance(cfg, CudaCfg):
        return cfg
    n_rows, n_in = case.shape[-2], case.shape[-1]
    if case.kind in ("swiglu", "experts"):
        return dataclasses.replace(cfg, split=1)
    if case.kind == "experts_sum" and cfg.q2s and case.qtype == Q2_K and T <= tm.Q2K_SUM_MAX_T:
        return cfg
    if case.kind == "experts_sum" and cfg.q2s is False:
        return cfg
    if case.kind == "experts_sum":
        return dataclasses.replace(cfg, split=max(1, int(min(6 * T, 16) * factor)))
    if case.qtype == Q8_0 and T == 1 and cfg.q8s:      # the split-layout kernel's own heuristic
        split = tm.q8s_cfg(n_rows, n_in, DEV, cfg.bn, 32 * cfg.nb).split
        return dataclasses.replace(cfg, split=max(1, int(split * factor)))
    sms = tm._sm_count(torch.device(DEV))
    tiles = -(-n_rows // cfg.bn)
    steps = n_in // tm._EPB[case.qtype] // max(1, tm._fit(cfg, case.qtype, n_in).nb)
    split = 1
    if tiles < 2 * sms:
        split = max(1, min(-(-2 * sms // tiles), steps // 2, 32))
    return dataclasses.replace(cfg, split=max(1, int(split * factor)))


def default_cfg_of(case: Case, T: int, w):
    """The launch shape the entry point picks by itself (w: the case's weight)."""
    from ds4tp.kernels import triton_matvec as tm
    n_rows, n_in = case.shape[-2], case.shape[-1]
    if case.kind in ("swiglu", "experts", "experts_sum"):
        mode = tm.MODE_SUM if case.kind == "experts_sum" else tm.MODE_SLOTS
        if tm.q2k_sum_path(w, T, 6, mode):
            return tm.Cfg(bn=tm.Q2K_SUM_BN, warps=tm.Q2K_SUM_WARPS)
        return tm.expert_cfg(w, T, 6, mode, DEV)
    if case.qtype == Q8_0 and T == 1:
        return tm.q8s_cfg(n_rows, n_in, DEV)
    return tm.default_cfg(case.qtype, n_rows, n_in, T, DEV)


def cfg_dict(c):
    return dataclasses.asdict(c) if c is not None else None


# ---- main ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON report path")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting new work after this")
    ap.add_argument("--tokens", default="1,4,16", help="T values to time")
    ap.add_argument("--no-sweep", action="store_true", help="time the default configs only")
    ap.add_argument("--sweep-only", action="store_true", help="skip the default pass, only sweep")
    ap.add_argument("--only", default="", help="comma-separated case names to run")
    ap.add_argument("--sweep-tokens", default="1,16", help="T values to sweep")
    ap.add_argument("--sweep-cuda-c-only", action="store_true",
                    help="sweep only the CUDA C routed launches (against the Triton default)")
    ap.add_argument("--selftest-cpu", action="store_true",
                    help="run the script's own logic under TRITON_INTERPRET=1 on tiny shapes")
    args = ap.parse_args(argv)
    global DEV
    if args.selftest_cpu:
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--selftest-cpu needs TRITON_INTERPRET=1")
        DEV = "cpu"
    t_start = time.time()
    deadline = t_start + args.budget_s
    out_path = Path(args.out)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "host": platform.node(),
              "results": [], "sweeps": [], "failures": [], "quantizers": None}

    def save():
        report["elapsed_s"] = round(time.time() - t_start, 1)
        out_path.write_text(json.dumps(report, indent=1, default=str))

    def fail(where, exc):
        report["failures"].append({"where": where, "error": f"{type(exc).__name__}: {exc}",
                                   "trace": traceback.format_exc()[-3000:]})
        print(f"  FAIL {where}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        save()

    if DEV == "cuda" and not torch.cuda.is_available():
        report["failures"].append({"where": "setup", "error": "no CUDA device"})
        save()
        print("no CUDA device", file=sys.stderr)
        return 2
    import triton
    from ds4tp.kernels import triton_matvec as tm
    props = torch.cuda.get_device_properties(0) if DEV == "cuda" else argparse.Namespace(
        name="cpu (Triton interpreter self-test)", multi_processor_count=tm._sm_count(torch.device("cpu")))
    report.update(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                  triton=triton.__version__, cuda=torch.version.cuda,
                  constants=dict(TQ_MAX=tm.TQ_MAX, TQ_MIN=tm.TQ_MIN, FMA_MAX_T=tm.FMA_MAX_T,
                                 PRE_MIN_T_Q8_0=tm.PRE_MIN_T_Q8_0, PRE_MIN_T_KQ=tm.PRE_MIN_T_KQ))
    tokens = [int(t) for t in args.tokens.split(",") if t]
    gen = torch.Generator(device=DEV).manual_seed(1234)      # weights
    cgen = torch.Generator().manual_seed(4321)                 # activations, ids

    try:
        report["copy_GBps"] = copy_bandwidth() if DEV == "cuda" else None
        print(f"device {props.name}: copy bandwidth {report['copy_GBps']} GB/s (read+write)", flush=True)
    except Exception as exc:
        report["copy_GBps"] = None
        fail("copy bandwidth", exc)
    save()
    copy_bw = report.get("copy_GBps")

    # ---- activation quantisers: bit-identical round trips
    try:
        qres = {}
        for width in ((4096, 32768) if DEV == "cuda" else (512,)):
            x = kc.rand_act((16, width), torch.Generator().manual_seed(width), DEV)
            q, d = tm.quantize_q8_0(x)
            ok0 = torch.equal((q.float().view(16, -1, 32) * d[..., None]).view(16, -1), numerics.q8_0_act(x))
            q, d, bs = tm.quantize_q8_k(x)
            okk = torch.equal((q.float().view(16, -1, 256) * d[..., None]).view(16, -1), numerics.q8_k_act(x))
            okb = torch.equal(bs, q.int().view(16, -1, 16).sum(-1))
            qres[str(width)] = dict(q8_0_bit_identical=ok0, q8_k_bit_identical=okk, q8_k_sums=okb)
            if not (ok0 and okk and okb):
                report["failures"].append({"where": f"quantizers width {width}", "error": str(qres[str(width)])})
        x = kc.rand_act((1, 4096), cgen, DEV)
        qres["q8_0_us_T1_4096"] = graph_time_ms(lambda: tm.quantize_q8_0(x)) * 1e3
        qres["q8_k_us_T1_4096"] = graph_time_ms(lambda: tm.quantize_q8_k(x)) * 1e3
        report["quantizers"] = qres
        print(f"quantizers: {qres}", flush=True)
    except Exception as exc:
        fail("quantizers", exc)
    save()

    cases = ds4_cases()
    if DEV == "cpu":
        cases = [shrink(c) for c in cases]
    if args.only:
        keep = set(args.only.split(","))
        cases = [c for c in cases if c.name in keep]
    def prepare(case):
        w = make_weight(case, gen)
        w2 = make_weight(case, gen) if case.kind == "swiglu" else None
        n_copies = max(1, min(32, -(-L2_FLUSH_BYTES // max(1, weight_bytes(w)))))
        copies = [w] + [make_weight(case, gen) for _ in range(n_copies - 1)]
        copies2 = ([w2] + [make_weight(case, gen) for _ in range(n_copies - 1)]) if w2 is not None else None
        return w, w2, copies, copies2

    def bytes_read(case, op, w, w2):
        if case.kind in ("swiglu", "experts", "experts_sum"):
            return nbytes_experts(op, w, w2)
        return weight_bytes(w)

    def release():
        if DEV == "cuda":
            torch.cuda.empty_cache()

    # ---- phase 1: every case with its default launch config
    t_values = sorted(set(tokens) | {1, 16}) if DEV == "cuda" else [1, 3]
    for case in ([] if args.sweep_only else cases):
        if time.time() > deadline:
            report["failures"].append({"where": case.label, "error": "skipped: time budget"})
            continue
        print(f"{case.label}: {type_name(case.qtype)} {case.kind} {case.shape}", flush=True)
        try:
            w, w2, copies, copies2 = prepare(case)
        except Exception as exc:
            fail(f"{case.label} setup", exc)
            continue
        for T in t_values:
            if time.time() > deadline:
                break
            rec = {"case": case.name, "tp": case.tp, "kind": case.kind, "qtype": type_name(case.qtype),
                   "shape": list(case.shape), "shard": case.shard, "T": T}
            try:
                op = Op(case, w, w2, T, cgen)
                rec["bytes_read"] = bytes_read(case, op, w, w2)
                rec["cfg"] = cfg_dict(default_cfg_of(case, T, w))
                rec["path"] = "small" if small_path(case, T) else "tiles"
                if T in (1, 16) or DEV == "cpu":
                    rec["rel_err"] = check(op)
                    rec["ok"] = rec["rel_err"] < 1e-5
                    if not rec["ok"]:
                        report["failures"].append({"where": f"{case.label} T={T}",
                                                   "error": f"mismatch rel_err {rec['rel_err']:.3g}"})
                if T in tokens or DEV == "cpu":
                    us = time_op(op, copies, copies2, None)
                    rec["time_us"] = us
                    rec["GBps"] = rec["bytes_read"] / (us * 1e-6) / 1e9
                    if copy_bw:
                        rec["frac_copy"] = rec["GBps"] / copy_bw
                print(f"  T={T:2d} err={rec.get('rel_err', float('nan')):.1e} "
                      f"{rec.get('time_us', float('nan')):8.1f} us {rec.get('GBps', float('nan')):7.0f} GB/s "
                      f"({100 * rec.get('frac_copy', float('nan')):.0f}% of copy) cfg={rec['cfg']}", flush=True)
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                fail(f"{case.label} T={T}", exc)
            report["results"].append(rec)
            save()
        del copies, copies2, w, w2
        release()
    try:
        report["summary"] = summarize(report, copy_bw)
    except Exception as exc:
        fail("summary", exc)
    save()

    # ---- phase 2: alternative configs on the main shapes, T = 1 first, until the deadline
    best = {}
    sw_t = tuple(int(t) for t in args.sweep_tokens.split(",") if t)
    sweeps = [] if args.no_sweep else [(T, c) for T in (sw_t if DEV == "cuda" else (1,))
                                       for c in cases if c.sweep]
    prepared = (None, None)
    for T, case in sweeps:
        if time.time() > deadline:
            report["failures"].append({"where": f"sweep {case.label} T={T}", "error": "skipped: time budget"})
            continue
        key = f"{case.label} T={T}"
        print(f"sweep {key}", flush=True)
        try:
            if prepared[0] is not case:
                prepared = (None, None)
                release()
                prepared = (case, prepare(case))
            w, w2, copies, copies2 = prepared[1]
            op = Op(case, w, w2, T, cgen)
            nb = bytes_read(case, op, w, w2)
            dflt = default_cfg_of(case, T, w)
            us = time_op(op, copies, copies2, None)
            best[key] = {"default_us": us, "default_cfg": cfg_dict(dflt), "best_us": us,
                         "best_cfg": cfg_dict(dflt), "bytes_read": nb}
        except Exception as exc:
            fail(f"sweep {key} setup", exc)
            continue
        if args.sweep_cuda_c_only:
            cands = cuda_cfgs(case, T)
        else:
            cands = [with_split(c, case, T) for c in sweep_cfgs(case, T)]
            cands += [with_split(dflt, case, T, f) for f in (0.5, 2.0)]
        cands = [c for i, c in enumerate(cands) if c not in cands[:i] and c != dflt]
        for cfg in cands:
            if time.time() > deadline:
                break
            srec = {"key": key, "cfg": cfg_dict(cfg)}
            try:
                op = Op(case, w, w2, T, cgen)
                srec["rel_err"] = check(op, cfg)
                if srec["rel_err"] > 1e-5:
                    raise AssertionError(f"mismatch rel_err {srec['rel_err']:.3g}")
                srec["time_us"] = time_op(op, copies, copies2, cfg)
                srec["GBps"] = nb / (srec["time_us"] * 1e-6) / 1e9
                if copy_bw:
                    srec["frac_copy"] = srec["GBps"] / copy_bw
                if srec["time_us"] < best[key]["best_us"]:
                    best[key].update(best_us=srec["time_us"], best_cfg=srec["cfg"])
                print(f"    {srec['time_us']:8.1f} us {srec['GBps']:7.0f} GB/s {srec['cfg']}", flush=True)
            except Exception as exc:
                srec["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                print(f"    FAIL {cfg}: {srec['error'][:200]}", flush=True)
            report["sweeps"].append(srec)
            report["best"] = best
            save()
    prepared = (None, None)
    release()

    if "summary" in report:
        print(json.dumps(report["summary"], indent=1), flush=True)
    save()
    print(f"wrote {out_path} ({len(report['failures'])} failures, {time.time() - t_start:.0f}s)")
    return 1 if report["failures"] else 0


def nbytes_experts(op: Op, w, w2) -> int:
    """Weight bytes the launch reads: each distinct selected expert's rows once."""
    n_exp = len(torch.unique(op.ids[op.ids >= 0]))
    per = weight_bytes(w) // w.shape[0]
    return n_exp * per * (2 if w2 is not None else 1)


# launches per decoded token (43 layers: 21 ratio-4, 20 ratio-128 compressor layers; the indexer
# projections, used only past 2048 tokens, and the tiny output HC head are left out)
PER_TOKEN = {
    1: {("attn_q_a", 1): 43, ("attn_kv", 1): 43, ("attn_q_b", 1): 43, ("attn_out_a", 1): 43,
        ("attn_out_b", 1): 43, ("shexp_gate_up", 1): 86, ("shexp_down", 1): 43, ("hc_fn", 1): 86,
        ("router", 1): 43, ("routed_gate_up", 1): 43, ("routed_down", 1): 43,
        ("compressor_r4", 1): 42, ("indexer_compressor", 1): 42, ("compressor_r128", 1): 40,
        ("output_vocab", 1): 1},
    2: {("attn_q_a", 1): 43, ("attn_kv", 1): 43, ("attn_q_b", 2): 43, ("attn_out_a", 2): 43,
        ("attn_out_b", 2): 43, ("shexp_gate_up", 2): 86, ("shexp_down", 2): 43, ("hc_fn", 1): 86,
        ("router", 1): 43, ("routed_gate_up", 2): 43, ("routed_down", 2): 43,
        ("compressor_r4", 1): 42, ("indexer_compressor", 1): 42, ("compressor_r128", 1): 40,
        ("output_vocab", 2): 1},
}


def summarize(report, copy_bw):
    """Per T: the matvec time of one decode step (per rank for TP=2) from the default configs,
    and its weight bytes / time, next to the copy bandwidth; plus the 5 slowest cases."""
    rows = [r for r in report["results"] if "GBps" in r]
    out = {}
    for T in sorted({r["T"] for r in rows}):
        by = {(r["case"], r["tp"]): r for r in rows if r["T"] == T}
        for tp, counts in PER_TOKEN.items():
            missing = [f"{n} tp{t}" for (n, t) in counts if (n, t) not in by]
            t_us = sum(c * by[k]["time_us"] for k, c in counts.items() if k in by)
            b = sum(c * by[k]["bytes_read"] for k, c in counts.items() if k in by)
            gbps = b / (t_us * 1e-6) / 1e9 if t_us else None
            out[f"decode TP={tp} T={T}"] = {
                "matvec_time_us": t_us, "weight_bytes": b, "GBps": gbps,
                "frac_copy": gbps / copy_bw if (gbps and copy_bw) else None,
                "tokens_per_s_matvec_bound": T * 1e6 / t_us if t_us else None,
                "missing": missing}
        slow = sorted((r["frac_copy"], f"{r['case']} tp{r['tp']}") for r in by.values() if "frac_copy" in r)
        out[f"slowest T={T}"] = slow[:6]
    return out


if __name__ == "__main__":
    sys.exit(main())
