"""Launch shapes of one decode token's attention (triton_attn.attention: q norm and RoPE, the raw
ring and the compressed rows, sinks, inverse RoPE) at DS4's sizes, graph-timed over enough
copies of the cache that L2 holds none of them between launches (in a decode step the layer's
weights pass through L2 between two reads of its cache).

DS4's attention is multi-query: every head reads the same key row (K = V, 512 floats). The
default launch (_attn_kernel) runs one head a program, so it reads each row once a head; the
tensor-core launch (_attn_mqa_kernel, prepared in the twenty-ninth session, off by default)
puts 16 heads on the M axis of its products, at the shapes (keys a block, programs a head group,
warps) below. (The twenty-ninth session's first version of this script, at 3d58381, timed G
heads a program on the FMA units: slower, removed.) Cases: H = 32 (a TP=2 rank) and 64 (TP=1)
heads at depth 0 as the bench decodes it (pos 72: 73 ring rows, 18 compressed), and at depth
4096 with the ring full: a ratio-128 layer (32 rows) and a ratio-4 layer (1,040 rows, the
indexer's mask selecting 512). Every result is checked against
decode_graph.decode_attention_torch.

    python bench/attn_decode_sweep.py --out attn_sweep.json
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

D, NROT, NSWA = 512, 64, 128
# (name, pos, ratio, masked)
CASES = [("depth 0 (pos 72), ratio 4", 72, 4, False),
         ("depth 4096, ratio 128", 4160, 128, False),
         ("depth 4096, ratio 4, mask 512/1040", 4160, 4, True)]
# the tensor-core launch's (keys a block, programs a head group, warps): 16 keys at 8 warps
# compiled without local memory at every split (offline, Triton 3.9); 32 keys spilled
MQA = [(16, S, 8) for S in (2, 4, 8, 16, 32)] + [(32, 8, 8), (16, 8, 4)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="the default and the bench's shape only")
    a = ap.parse_args()
    from kernel_cases import _rope_tables
    from profile_common import finish, graph_us
    from ds4tp import numerics
    from ds4tp.bench import ATTN_MQA_AB
    from ds4tp.config import RMS_EPS, Shape
    from ds4tp.decode_graph import decode_attention_torch
    from ds4tp.kernels import triton_attn
    g = torch.Generator().manual_seed(0)
    shapes = [False, ATTN_MQA_AB] + ([] if a.quick else [x for x in MQA if x != ATTN_MQA_AB])
    results = []
    for H, (name, p, ratio, masked) in itertools.product((32, 64), CASES):
        s = Shape(n_swa=NSWA, head_dim=D, n_rot=NROT, n_head=H)
        cap = (p + 1) // ratio + 16
        n_vis = (p + 1) // ratio
        nbytes = (NSWA + n_vis) * D * 4
        copies = max(2, -(-(160 << 20) // nbytes))          # > 160 MB of cache in the loop
        rings = [numerics.f16_round(torch.randn(NSWA, D, generator=g) * 3).cuda() for _ in range(copies)]
        comps = [numerics.f16_round(torch.randn(cap, D, generator=g) * 3).cuda() for _ in range(copies)]
        slots = torch.arange(NSWA)
        rpos = torch.where(slots <= p, p - (p - slots) % NSWA, torch.full_like(slots, -(1 << 40))).cuda()
        mask = None
        if masked:
            sel = torch.randperm(n_vis, generator=g)[:512]
            mask = torch.zeros(1, cap, dtype=torch.bool)
            mask[0, sel] = True
            mask = mask.cuda()
        qb = (torch.randn(1, H * D, generator=g) * 2).cuda()
        sinks = (torch.randn(H, generator=g) * 2).cuda()
        cos, sin = _rope_tables(NROT, p + 1, "cuda", compressed=True)
        pos = torch.tensor([p], device="cuda")
        want = decode_attention_torch(qb, rings[0], rpos, comps[0], ratio, mask, sinks, cos, sin, pos, s)
        label = f"H={H} {name}"
        for shape in shapes:
            def step(i, shape=shape):
                return triton_attn.attention(qb, rings[i], rpos, comps[i], ratio, mask, sinks, cos, sin,
                                             pos, RMS_EPS, mqa=shape)
            try:
                got = step(0)
                torch.cuda.synchronize()
                err = float((got - want).abs().max() / want.abs().max())
                us = graph_us(step, copies, 20)
            except Exception as e:      # a launch shape Triton rejects (registers, shared memory)
                print(f"{label:44s} {str(shape):16s} failed: {str(e)[:80]}")
                continue
            rec = {"case": label, "H": H, "pos": p, "ratio": ratio, "masked": masked,
                   "mqa": list(shape) if shape else None, "us": us, "rel_err": err, "ok": err < 1e-5}
            results.append(rec)
            print(f"{label:44s} {str(shape):16s} {us:7.2f} us  err {err:.1e}")
        mine = [x for x in results if x["case"] == label]
        best = min((x for x in mine if x["ok"]), key=lambda x: x["us"])
        dflt = next(x for x in mine if x["mqa"] is None)
        ab = next((x for x in mine if x["mqa"] == list(ATTN_MQA_AB)), None)
        print(f"== {label}: one head a program {dflt['us']:.2f} us, tensor cores at {ATTN_MQA_AB} "
              f"{ab['us'] if ab else float('nan'):.2f} us, best {best['us']:.2f} us at {best['mqa']}")
        rings = comps = None
        torch.cuda.empty_cache()
    return finish(a.out, results)


if __name__ == "__main__":
    sys.exit(main())
