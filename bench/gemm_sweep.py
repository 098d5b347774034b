"""Time the many-token (prefill) launches of ds4tp.kernels.triton_gemm at 2048 tokens, full DS4
shapes, over a grid of launch shapes, next to cuBLAS float16 / float32 GEMMs of the same size.

    python bench/gemm_sweep.py [--out sweep.json] [--budget-s 200] [--tp 1]

Each timing is the median of a few CUDA-event-timed launches after one warm-up (compilation).
Prints ms per launch and effective TMAC/s (multiply-adds actually needed / time)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import kernel_cases as kc  # noqa: E402
from ds4tp.config import F16, IQ2_XXS, Q2_K, Q8_0  # noqa: E402
from ds4tp.kernels import triton_gemm as tg  # noqa: E402


def ms(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return sorted(out)[len(out) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gemm_sweep.json")
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--fused-sweep", action="store_true",
                    help="launch shapes of the float16 routed experts decoded in registers")
    ap.add_argument("--only", default="", help="comma-separated case-name prefixes")
    a = ap.parse_args()
    t_end = time.time() + a.budget_s
    g = torch.Generator().manual_seed(0)
    T, K, tp = a.tokens, 6, a.tp
    res = {"tokens": T, "tp": tp, "device": torch.cuda.get_device_name(), "cases": {}}

    def save():
        Path(a.out).write_text(json.dumps(res, indent=1))

    x4096 = kc.rand_act((T, 4096), g, "cuda")
    ids = torch.stack([torch.randperm(256, generator=g)[:K] for _ in range(T)]).cuda()
    rw = torch.rand(T, K, generator=g).cuda()
    ff = 2048 // tp
    cases = {
        "idx_q_b F16": (lambda: kc.rand_weight(F16, (8192 // tp, 1024), g, "cuda"), "linear", 1024),
        "router F16": (lambda: kc.rand_weight(F16, (256, 4096), g, "cuda"), "linear", 4096),
        "comp_kv F16": (lambda: kc.rand_weight(F16, (1024, 4096), g, "cuda"), "linear", 4096),
        "hc_fn F16": (lambda: kc.rand_weight(F16, (24, 16384), g, "cuda"), "linear", 16384),
        "q_b Q8_0": (lambda: kc.rand_weight(Q8_0, (32768 // tp, 1024), g, "cuda"), "linear", 1024),
        "out_b Q8_0": (lambda: kc.rand_weight(Q8_0, (4096, 8192 // tp), g, "cuda"), "linear", 8192 // tp),
        "gate_up IQ2_XXS": (lambda: (kc.rand_weight(IQ2_XXS, (256, ff, 4096), g, "cuda"),
                                     kc.rand_weight(IQ2_XXS, (256, ff, 4096), g, "cuda")), "swiglu", 4096),
        "down Q2_K": (lambda: kc.rand_weight(Q2_K, (256, 4096, ff), g, "cuda"), "down", ff),
    }
    grid = [dict(bn=bn, tq=tq, warps=w, stages=st) for bn, tq, w, st in
            [(64, 64, 4, 1), (64, 128, 4, 1), (128, 128, 8, 1), (64, 64, 8, 1), (32, 64, 4, 1),
             (64, 32, 4, 1), (128, 64, 4, 1), (32, 128, 4, 1), (64, 128, 8, 1), (64, 64, 4, 2)]]
    for name, (make, kind, n_in) in cases.items():
        if a.only and not any(name.startswith(o) for o in a.only.split(",")):
            continue
        w = make()
        r = res["cases"][name] = {"runs": []}
        if kind == "linear":
            xin = kc.rand_act((T, n_in), g, "cuda")
            macs = T * w.shape[0] * n_in
            A16, B16 = xin.half(), torch.randn(n_in, w.shape[0], device="cuda", dtype=torch.float16)
            run = lambda c, h=None: tg.linear(w, xin, cfg=c, h16=h)        # noqa: E731
            nbq = 32 if w.qtype == F16 else 4
        elif kind == "swiglu":
            macs = T * K * 2 * ff * 4096
            A16, B16 = x4096.half().repeat(K, 1), torch.randn(4096, 2 * ff, device="cuda", dtype=torch.float16)
            run = lambda c, h=None: tg.experts(w[0], w[1], x4096, ids, rw, tg.MODE_SWIGLU, 10.0, cfg=c, h16=h)   # noqa: E731
            nbq = 1
        else:
            xin = kc.rand_act((T, K, ff), g, "cuda")
            macs = T * K * 4096 * ff
            A16, B16 = xin.reshape(-1, ff).half(), torch.randn(ff, 4096, device="cuda", dtype=torch.float16)
            run = lambda c, h=None: tg.experts(w, None, xin, ids, None, tg.MODE_SLOTS, cfg=c, h16=h)   # noqa: E731
            nbq = 1
        r["macs"] = macs
        r["cublas_f16_ms"] = ms(lambda: A16 @ B16)
        A32, B32 = A16.float(), B16.float()
        r["cublas_f32_ms"] = ms(lambda: A32 @ B32)
        del A32, B32
        r["default_ms"] = ms(lambda: run(None))
        if kind == "linear" and w.qtype == F16:   # default: split activation on cuBLAS
            r["tf32x3_ms"] = ms(lambda: run(None, False))
            print(f"{name}: 3xTF32 (Triton) {r['tf32x3_ms']:.3f} ms, split on cuBLAS "
                  f"{r['default_ms']:.3f} ms", flush=True)
        if kind != "linear" or w.qtype != F16:   # exact and float16 paths, default shapes
            r["exact_ms"] = ms(lambda: run(None, False))
            r["h16_ms"] = ms(lambda: run(None, True))
            msg = f"{name}: exact path {r['exact_ms']:.3f} ms, float16 path {r['h16_ms']:.3f} ms"
            if kind == "linear":   # a dense weight is decoded to float16 first (routed: in registers)
                r["dequant_h16_ms"] = ms(lambda: tg.dequant_h16(w))
                msg += f" (of which decoding the weight {r['dequant_h16_ms']:.3f} ms)"
            print(msg, flush=True)
        print(f"{name}: {macs / 1e9:.1f} GMAC  cuBLAS f16 {r['cublas_f16_ms']:.3f} ms  f32 "
              f"{r['cublas_f32_ms']:.3f} ms  default {r['default_ms']:.3f} ms "
              f"({macs / r['default_ms'] / 1e9:.1f} TMAC/s)", flush=True)
        save()
        if kind != "linear" and a.fused_sweep:   # the float16 experts decoded in registers
            for bn, w_, st in [(64, 4, 1), (128, 4, 1), (128, 8, 1), (64, 8, 1), (32, 4, 1),
                               (64, 4, 2), (128, 8, 2), (256, 8, 1)]:
                c = dict(bn=bn, tq=64, warps=w_, stages=st)
                try:
                    t = ms(lambda: run(tg.GemmCfg(nb=1, **c), True), reps=3)
                    r.setdefault("fused_runs", []).append({**c, "ms": t})
                    print(f"   float16 in registers {c}: {t:.3f} ms ({macs / t / 1e9:.1f} TMAC/s)", flush=True)
                except Exception as exc:
                    r.setdefault("fused_runs", []).append({**c, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                    print(f"   float16 in registers {c}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                save()
        for c in grid:
            if time.time() > t_end:
                break
            cfg = tg.GemmCfg(nb=nbq, **c)
            try:
                t = ms(lambda: run(cfg, False), reps=3)   # the exact path's shapes
                r["runs"].append({**c, "ms": t})
                print(f"   {c}: {t:.3f} ms ({macs / t / 1e9:.1f} TMAC/s)", flush=True)
            except Exception as exc:   # compile failure (e.g. shared memory): record and go on
                r["runs"].append({**c, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                print(f"   {c}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            save()
        del w
        torch.cuda.empty_cache()
    save()


if __name__ == "__main__":
    main()
