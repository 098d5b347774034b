"""The routed experts' two launches of a decode token (gate/up choosing its experts, then down)
with and without the gate/up launch prefetching the down kernel's rows of its chosen experts
into L2 (experts.cu A_PF), alone (the bench times it in the step: decode_d0_no_down_prefetch).

The gate/up kernel is bound by issue (IQ2_XXS decoding), not by HBM, for ~10 us at TP=2; the
down kernel then reads 8.3 MB of Q2_K rows (TP=2; 16.5 MB at TP=1) with the step waiting on it.
With A_PF each gate/up block issues one bulk L2 prefetch per chosen expert for its share of the
down rows as soon as the choice is made.

For TP=2 and TP=1 shapes (64 experts, 4096 wide, the shared expert's rows riding as in the step),
router logits drawn afresh for each of 48 token launches (so the rows come from HBM, not L2):
outputs compared bit for bit, then the 48 pairs captured in a CUDA graph and replayed; us per
pair, best of 5.

    python bench/down_prefetch_probe.py [--json OUT]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kernel_cases as kc  # noqa: E402

from ds4tp.config import EXPERT_WEIGHT_SCALE, IQ2_XXS, Q2_K, Q8_0, ROUTER_WEIGHT_FLOOR  # noqa: E402
from ds4tp.kernels import cuda_experts as ce  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--json", default="")
ap.add_argument("--launches", type=int, default=48)
args = ap.parse_args()
K = 6


def pairs(w, x, logits_list, tok):
    outs = []
    for logits in logits_list:
        mid, gu, ids, _ = ce.swiglu_routed(w["gate"], w["up"], x, logits, None, None, tok, K,
                                           ROUTER_WEIGHT_FLOOR, EXPERT_WEIGHT_SCALE, 10.0,
                                           shared=w["gu_sh"], down=w["down"])
        outs.append(ce.down_sum(w["down"], mid, ids, shared=w["down_sh"], gu=gu, clamp=10.0))
    return outs


res = {}
for tp in (2, 1):
    F, E = 2048 // tp, 64
    g = torch.Generator().manual_seed(tp)
    w = {"gate": kc.decode_order(kc.rand_weight(IQ2_XXS, (E, F, 4096), g, "cuda")),
         "up": kc.decode_order(kc.rand_weight(IQ2_XXS, (E, F, 4096), g, "cuda")),
         "down": kc.rand_weight(Q2_K, (E, 4096, F), g, "cuda"),
         "gu_sh": kc.rand_weight(Q8_0, (2 * F, 4096), g, "cuda"),
         "down_sh": kc.rand_weight(Q8_0, (4096, F), g, "cuda")}
    x = kc.rand_act((1, 4096), g, "cuda")
    tok = torch.tensor([3], dtype=torch.int64, device="cuda")
    logits_list = [(torch.randn(1, E, generator=g) * 2).cuda() for _ in range(args.launches)]
    outs, times = {}, {}
    for name in ("no_prefetch", "prefetch"):
        ce.set_down_prefetch_enabled(name == "prefetch")
        outs[name] = [o.clone() for o in pairs(w, x, logits_list, tok)]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                pairs(w, x, logits_list, tok)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            pairs(w, x, logits_list, tok)
        best = float("inf")
        for _ in range(5):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ev[0].record()
            graph.replay()
            ev[1].record()
            torch.cuda.synchronize()
            best = min(best, ev[0].elapsed_time(ev[1]) * 1e3 / args.launches)
        times[name] = best
    ce.set_down_prefetch_enabled(True)
    same = all(torch.equal(a, b) for a, b in zip(outs["no_prefetch"], outs["prefetch"]))
    res[f"tp{tp}"] = {"us_per_pair": times, "bit_identical": same,
                      "ratio": times["prefetch"] / times["no_prefetch"]}
    print(f"TP={tp} rows {F}: " + ", ".join(f"{k} {v:.2f} us" for k, v in times.items())
          + f"; prefetch / without {res[f'tp{tp}']['ratio']:.3f}; outputs bit-identical: {same}",
          flush=True)
if args.json:
    Path(args.json).write_text(json.dumps(res, indent=1))
