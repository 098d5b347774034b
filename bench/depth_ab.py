"""Decode at depth 4096, TP=2 (43 layers, full-size synthetic), chained, with the within-host
all-reduce and with NCCL in the same run, round-robin (best of ROUNDS); a check that a depth-4096
step is not slower on the peer path (the indexer's score all-reduces take it too).

    python bench/depth_ab.py [--depth 4096] [--steps 64] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def _rank(comm, dev, cfg):
    from ds4tp import bench
    from ds4tp import config as C
    torch.cuda.set_device(dev)
    model = bench.build_model(C.FULL, comm.rank, comm.world, comm, dev)
    ctx = cfg["depth"] + cfg["steps"] + 64
    res = {"peer": [], "nccl": []}
    for _ in range(cfg["rounds"]):
        for v in ("peer", "nccl"):
            comm.peer.on = v == "peer"
            r = bench.time_decode(model, cfg["depth"], cfg["steps"], max_ctx=ctx, chained=True)
            res[v].append(r["tok_s"])
    comm.peer.on = True
    return res


def main() -> int:
    from ds4tp.comm import run_local_ranks
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    res = run_local_ranks(2, _rank, vars(a), device="cuda", timeout_s=300, wall_s=600)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
