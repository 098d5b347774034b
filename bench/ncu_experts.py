"""Launch the CUDA C routed-expert kernels a few times at DS4's decode shapes, for Nsight Compute
(`ncu -k regex:iq2xxs_swiglu|q2k_down_sum ... python3 bench/ncu_experts.py [--tp 2] [--shared]`).

--tp 2: a TP=2 rank's shard (each expert's gate/up rows and down inputs halved); --shared: the
shared expert's rows riding in the two launches, as a decode step runs them (model.ffn);
--decode-order: the gate/up rows in the decode order (qtensor.IQ2_DECODE, as kernels.prepare_weights
leaves them on CUDA), read through the tables per bank pair (experts.cu A_TAB)."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kernel_cases as kc  # noqa: E402

from ds4tp.config import IQ2_XXS, Q2_K, Q8_0  # noqa: E402
from ds4tp.kernels import cuda_experts as ce  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--tp", type=int, default=1, choices=(1, 2))
ap.add_argument("--shared", action="store_true")
ap.add_argument("--decode-order", action="store_true")
args = ap.parse_args()
F = 2048 // args.tp                     # this rank's FFN width of an expert (routed and shared)
g = torch.Generator().manual_seed(0)
wg = kc.rand_weight(IQ2_XXS, (64, F, 4096), g, "cuda")
wu = kc.rand_weight(IQ2_XXS, (64, F, 4096), g, "cuda")
if args.decode_order:
    wg, wu = kc.decode_order(wg), kc.decode_order(wu)
wd = kc.rand_weight(Q2_K, (64, 4096, F), g, "cuda")
w_gu = kc.rand_weight(Q8_0, (2 * F, 4096), g, "cuda")
w_sd = kc.rand_weight(Q8_0, (4096, F), g, "cuda")
ids = kc.rand_ids(1, 6, 64, g, "cuda", skip=0.0)
x = kc.rand_act((1, 4096), g, "cuda")
rw = torch.rand(1, 6, generator=g).cuda()
for _ in range(2):
    if args.shared:
        mid, gu = ce.swiglu(wg, wu, x, ids, rw, 10.0, shared=w_gu)
        out = ce.down_sum(wd, mid, ids, shared=w_sd, gu=gu, clamp=10.0)
    else:
        mid = ce.swiglu(wg, wu, x, ids, rw, 10.0)
        out = ce.down_sum(wd, mid, ids)
torch.cuda.synchronize()
print("ran", f"tp {args.tp} shared {args.shared} decode order {args.decode_order}", tuple(mid.shape),
      tuple(out.shape))
