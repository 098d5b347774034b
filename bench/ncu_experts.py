"""Launch the CUDA C routed-expert kernels a few times at DS4's TP=1 decode shapes, for Nsight
Compute (`ncu -k regex:iq2xxs_swiglu|q2k_down_sum ... python3 bench/ncu_experts.py`)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kernel_cases as kc  # noqa: E402

from ds4tp.config import IQ2_XXS, Q2_K  # noqa: E402
from ds4tp.kernels import cuda_experts as ce  # noqa: E402

g = torch.Generator().manual_seed(0)
wg = kc.rand_weight(IQ2_XXS, (64, 2048, 4096), g, "cuda")
wu = kc.rand_weight(IQ2_XXS, (64, 2048, 4096), g, "cuda")
wd = kc.rand_weight(Q2_K, (64, 4096, 2048), g, "cuda")
ids = kc.rand_ids(1, 6, 64, g, "cuda", skip=0.0)
x = kc.rand_act((1, 4096), g, "cuda")
rw = torch.rand(1, 6, generator=g).cuda()
for _ in range(2):
    mid = ce.swiglu(wg, wu, x, ids, rw, 10.0)
    out = ce.down_sum(wd, mid.contiguous(), ids)
torch.cuda.synchronize()
print("ran", tuple(mid.shape), tuple(out.shape))
