"""Launch the tensor-core routed-expert kernels of a prefill (experts_mma.cu) at DS4's TP=1
shapes, 2048 tokens, for Nsight Compute (`ncu -k regex:_mma ... python3 bench/ncu_prefill.py`)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds4tp.kernels import triton_gemm as tg  # noqa: E402
from profile_common import prefill_experts  # noqa: E402

wg, wu, wd, ids, x, rw = prefill_experts()
for _ in range(2):
    mid = tg.experts(wg, wu, x, ids, rw, tg.MODE_SWIGLU, 10.0)
    out = tg.experts(wd, None, mid, ids, None, tg.MODE_SLOTS)
torch.cuda.synchronize()
print("ran", tuple(mid.shape), tuple(out.shape))
