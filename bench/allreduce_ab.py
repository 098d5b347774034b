"""The within-host all-reduce (ds4tp.kernels.cuda_allreduce) against NCCL and against variants of
itself, on two GPUs of one host, in one run:

  - alone: a CUDA graph of 86 all-reduces of [1, 4096] float32 (a token's), each after a small
    kernel that writes its input, replayed; microseconds per all-reduce;
  - in the model: the 43-layer full-size synthetic TP=2 decode, chained (as the served path
    runs), round-robin over the variants, best of ROUNDS; the logits of 8 greedy steps compared
    with NCCL's bit for bit.

Variants: "nccl"; "peer" (the default kernel); "peer_fence_all" (every thread also fences its
own stores at system scope before the barrier, AR_FENCE_ALL=1: the default until s27c, where
it was 2.6% slower); "peer_1024" (one block of 1024 threads instead of 512); "peer_trigger_late" (the
kernel after it launches only when it ends, AR_TRIGGER_LATE=1, where by default it launches at
once and loads its weights while the all-reduce waits).

    python bench/allreduce_ab.py [--layers 43] [--steps 64] [--rounds 3] [--out ab.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

VARIANTS = ("nccl", "peer", "peer_fence_all", "peer_1024", "peer_trigger_late")


def _set(comm, dev, variant: str) -> None:
    from ds4tp.kernels import cuda_allreduce, cuda_c
    p = comm.peer
    p.on = variant != "nccl"
    defines = {"peer_fence_all": (("AR_FENCE_ALL", 1),),
               "peer_trigger_late": (("AR_TRIGGER_LATE", 1),)}.get(variant, ())
    p.fn = cuda_c.kernel("allreduce.cu", "ar2_sum", torch.device(dev).index, defines)
    cuda_allreduce._THREADS_WARPS = 32 if variant == "peer_1024" else 16


def _alone_us(comm, dev, n: int = 86, reps: int = 50) -> float:
    from ds4tp.bench import graph_seconds
    x = torch.zeros(1, 4096, device=dev)

    def token():
        for _ in range(n):
            x.mul_(0.5)
            comm.all_reduce(x)
    return graph_seconds(token, torch.device(dev), reps=reps) * 1e6 / n


def _rank(comm, dev, cfg):
    from ds4tp import bench
    from ds4tp import config as C
    torch.cuda.set_device(dev)
    assert comm.peer is not None, comm.peer_why
    shape = C.Shape(n_layer=cfg["layers"]) if cfg["layers"] else C.FULL
    res = {"alone_us": {}, "decode_chained_tok_s": {v: [] for v in VARIANTS}, "logits_equal_nccl": {}}
    for v in VARIANTS:
        _set(comm, dev, v)
        res["alone_us"][v] = _alone_us(comm, dev)
    model = bench.build_model(shape, comm.rank, comm.world, comm, dev)
    _set(comm, dev, "nccl")
    ref = bench.decode_logits(model, 8)
    for v in VARIANTS[1:]:
        _set(comm, dev, v)
        res["logits_equal_nccl"][v] = bool(torch.equal(bench.decode_logits(model, 8), ref))
    for _ in range(cfg["rounds"]):
        for v in VARIANTS:
            _set(comm, dev, v)
            r = bench.time_decode(model, 1, cfg["steps"], max_ctx=256, chained=True)
            res["decode_chained_tok_s"][v].append(r["tok_s"])
    _set(comm, dev, "peer")
    res["best_tok_s"] = {v: max(t) for v, t in res["decode_chained_tok_s"].items()}
    return res


def main() -> int:
    from ds4tp.comm import run_local_ranks
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=0, help="0: all 43")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    cfg = {"layers": a.layers, "steps": a.steps, "rounds": a.rounds}
    res = run_local_ranks(2, _rank, cfg, device="cuda", timeout_s=300, wall_s=900)
    res["cfg"] = cfg
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
