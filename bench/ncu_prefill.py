"""Launch the tensor-core routed-expert kernels of a prefill (experts_mma.cu) at DS4's TP=1
shapes, 2048 tokens, for Nsight Compute (`ncu -k regex:_mma ... python3 bench/ncu_prefill.py`)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kernel_cases as kc  # noqa: E402

from ds4tp.config import IQ2_XXS, Q2_K  # noqa: E402
from ds4tp.kernels import triton_gemm as tg  # noqa: E402

g = torch.Generator().manual_seed(0)
T, K = 2048, 6
wg = kc.rand_weight(IQ2_XXS, (256, 2048, 4096), g, "cuda")
wu = kc.rand_weight(IQ2_XXS, (256, 2048, 4096), g, "cuda")
wd = kc.rand_weight(Q2_K, (256, 4096, 2048), g, "cuda")
ids = torch.stack([torch.randperm(256, generator=g)[:K] for _ in range(T)]).cuda()
x = kc.rand_act((T, 4096), g, "cuda")
rw = torch.rand(T, K, generator=g).cuda()
for _ in range(2):
    mid = tg.experts(wg, wu, x, ids, rw, tg.MODE_SWIGLU, 10.0)
    out = tg.experts(wd, None, mid, ids, None, tg.MODE_SLOTS)
torch.cuda.synchronize()
print("ran", tuple(mid.shape), tuple(out.shape))
