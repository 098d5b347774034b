"""Time the compile-time variants of the tensor-core routed-expert kernels (experts_mma.cu) at
DS4's TP=1 prefill shapes (2048 tokens, 256 experts): ms per launch, CUDA-event timed, median of
5 after a warm-up. Usage: python bench/experts_mma_variants.py [--out file.json]"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemm_sweep import ms  # noqa: E402
from profile_common import prefill_experts  # noqa: E402

from ds4tp.kernels import cuda_experts as ce, triton_gemm as tg  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="experts_mma_variants.json")
a = ap.parse_args()
T, K = 2048, 6
wg, wu, wd, ids, x, rw = prefill_experts(T, K)
x16 = x.half()
mid16 = torch.randn(T, K, 2048, generator=torch.Generator().manual_seed(1)).cuda().half()
pairs, table, _, _, _ = tg.expert_tiles(ids, 256, ce.MANY_TQ)
out_gu = torch.empty(T, K, 2048, device="cuda")
out_d = torch.empty(T, K, 4096, device="cuda")
res = {}
# (the session-9 run also timed IQ2_XXS rows loaded as 32-bit words shared by a row's four lanes,
# 5.42 against 3.52 ms, and sign masks from a 256-entry table, 3.52 against 3.48 ms for the
# ksigns bytes now used; both variants were removed: bench/results/experts_mma_variants_h200_*)
for name, d in [("default", ()), ("min 2 blocks", (("MIN_BLOCKS", 2),))]:
    t_gu = ms(lambda: ce.many(wg, wu, x16, False, pairs, table, rw, out_gu, True, 10.0, d))
    t_d = ms(lambda: ce.many(wd, None, mid16, True, pairs, table, None, out_d, False, 0.0, d))
    res[name] = {"gate_up_ms": t_gu, "down_ms": t_d, "defines": d}
    print(f"{name:28s} gate/up {t_gu:.3f} ms  down {t_d:.3f} ms", flush=True)
Path(a.out).write_text(json.dumps(res, indent=1))
