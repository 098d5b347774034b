"""End-to-end, teacher-forced comparison with the golden reference outputs.

For each golden prompt we feed prompt_ids + generated_ids and compare our logits, at every
position the reference recorded, over the reference's top-20 ids (max |dlogit|), like with
like:
  decode path   one token at a time; against per_position_decode_top (prompt positions), then
                greedy[1:] and after_last_generated_top (generated positions)
  static path   as decode, but tokens after the first go through the static-buffer decoder
                (decode_graph.StaticDecoder, CUDA graphs on a GPU)
  prefill path  a fresh batched prefill of prompt_ids[:L] for every prefill checkpoint L
                (greedy[0] for the chat prompt, which has no checkpoints)

Run as a script to print the figures: python tests/golden_eval.py [--tp 2] [--model tiny-a]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch


def _record(prompt, path, pos, logits, top, tp_logits_keep=None):
    ids = [t[0] for t in top]
    logits = logits.detach().cpu()
    ref = torch.tensor([t[1] for t in top], dtype=torch.float64)
    ours = logits[ids].double()
    return {"prompt": prompt, "path": path, "pos": pos,
            "dmax": float((ours - ref).abs().max()),
            "ours_top1": int(torch.sort(logits, descending=True, stable=True).indices[0]),
            "ref_top1": ids[0], "gap": float(top[0][1] - top[1][1])}


def collect(model, golden: dict, paths=("decode", "prefill"), keep_logits: bool = False) -> dict:
    """Run the teacher-forced comparison; returns {"records": [...], "logits": {...}}."""
    records, kept = [], {}
    for p in golden["prompts"]:
        name, prompt_ids, gen = p["name"], p["prompt_ids"], p["generated_ids"]
        ids = prompt_ids + gen
        n = len(prompt_ids)
        per_pos = p.get("per_position_decode_top")
        for path in [x for x in paths if x in ("decode", "static")]:
            st = model.new_state()
            rows = []
            if path == "static":    # token 0 by forward, then the static-buffer decoder
                from ds4tp.decode_graph import StaticDecoder
                dec = StaticDecoder(model, max_ctx=len(ids) + 8)
            for j, t in enumerate(ids):
                if path == "static" and j > 0:
                    if j == 1:
                        dec.load_session(st)
                    logits = dec.step(t).clone()
                else:
                    logits = model.forward([t], st)
                if keep_logits:
                    rows.append(logits.cpu())
                if j < n - 1:
                    top = per_pos[j] if per_pos else None
                elif j == n - 1:
                    top = per_pos[j] if per_pos else None      # greedy[0] is the prefill path
                elif j - n + 1 < len(p["greedy"]):
                    top = p["greedy"][j - n + 1]["top"]
                else:
                    top = p["after_last_generated_top"]
                if top is not None:
                    records.append(_record(name, path, j, logits, top))
            if keep_logits:
                kept[f"{name}/{path}"] = torch.stack(rows)
        if "prefill" in paths:
            checkpoints = p.get("prefill_checkpoints") or [{"L": n, "top": p["greedy"][0]["top"]}]
            for cp in checkpoints:
                L = cp["L"]
                logits = model.forward(prompt_ids[:L], model.new_state())
                records.append(_record(name, "prefill", L - 1, logits, cp["top"]))
                if keep_logits and L == n:
                    kept[f"{name}/prefill_last"] = logits.cpu()
    return {"records": records, "logits": kept}


def summarize(records: list[dict]) -> dict:
    d = sorted(r["dmax"] for r in records)
    n = len(d)
    big_gap = [r for r in records if r["gap"] > 3.0]
    return {
        "n": n,
        "median": statistics.median(d),
        "p90": d[min(n - 1, int(0.9 * n))],
        "max": d[-1],
        "top1": sum(r["ours_top1"] == r["ref_top1"] for r in records) / n,
        "big_gap_n": len(big_gap),
        "big_gap_mismatch": [(r["prompt"], r["path"], r["pos"], r["gap"]) for r in big_gap
                             if r["ours_top1"] != r["ref_top1"]],
    }


def _rank_collect(comm, device, model_path, golden_path, paths, keep_logits):
    from ds4tp.model import DS4Model
    model = DS4Model.load(model_path, rank=comm.rank, world=comm.world, comm=comm, device=device)
    golden = json.loads(Path(golden_path).read_text())
    return collect(model, golden, paths, keep_logits)


def run(model_path, golden_path, tp: int = 1, paths=("decode", "prefill"), keep_logits=False,
        device="cpu"):
    from ds4tp.comm import SingleComm, run_local_ranks
    if tp == 1:
        return _rank_collect(SingleComm(), device, str(model_path), str(golden_path), paths, keep_logits)
    return run_local_ranks(tp, _rank_collect, str(model_path), str(golden_path), paths, keep_logits,
                           device=device)


def main() -> int:
    ap = argparse.ArgumentParser()
    import os
    ap.add_argument("--golden", default=os.environ.get(
        "DS4TP_GOLDEN", str(Path(__file__).resolve().parents[1].parent / "shared" / "golden")))
    ap.add_argument("--model", action="append")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--paths", default="decode,prefill")
    ap.add_argument("--h16-all", action="store_true",
                    help="CUDA: every many-token launch of a quantised weight on the float16 path "
                         "(by default only prompts of H16_MIN_T tokens / H16_MIN_PAIRS pairs take it)")
    a = ap.parse_args()
    paths = tuple(a.paths.split(","))
    if a.h16_all:
        from ds4tp.kernels import triton_gemm
        triton_gemm.H16_MIN_T = triton_gemm.H16_MIN_PAIRS = 0
    for name in a.model or ["tiny-a", "small-a"]:
        g = Path(a.golden)
        res = run(g / f"{name}.gguf", g / f"{name}.json", a.tp, paths=paths, device=a.device)
        for path in paths:
            s = summarize([r for r in res["records"] if r["path"] == path])
            print(f"{name} tp={a.tp} {path}: " + json.dumps(s))
        print(f"{name} tp={a.tp} pooled: " + json.dumps(summarize(res["records"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
