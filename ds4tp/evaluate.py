"""`ds4tp eval`: evaluate tokens or a prompt and print the top logits, as JSON or text.

Positions: `positions[i]` is the prediction after consuming tokens[0..i] (every i with
--positions all, else the last). `steps[0]` is the prediction after the prompt; each step's token
is the greedy choice, fed back one token at a time (decode). --path prefill evaluates the prompt
in one batched call, --path decode one token at a time. --tp N runs N local ranks.
"""
from __future__ import annotations

import json
import sys

import torch


def topk_pairs(logits: torch.Tensor, k: int) -> list[list]:
    """[[id, logit], ...] sorted by logit descending, ties to the lower id."""
    order = torch.sort(logits, descending=True, stable=True).indices[:k]
    return [[int(i), float(logits[i])] for i in order]


def evaluate(model, tokens: list[int], *, path: str = "prefill", positions: str = "last",
             steps: int = 0, top: int = 20) -> dict:
    st = model.new_state()
    if path == "prefill":
        logits = model.forward(tokens, st, all_logits=True)
    elif path == "decode":
        logits = torch.stack([model.forward([t], st) for t in tokens])
    else:
        raise ValueError(f"unknown path {path!r} (prefill or decode)")
    idx = range(len(tokens)) if positions == "all" else [len(tokens) - 1]
    out = {"prompt_tokens": list(tokens),
           "positions": [{"pos": i, "top": topk_pairs(logits[i], top)} for i in idx],
           "steps": []}
    last = logits[-1]
    for k in range(steps):
        tok = int(torch.sort(last, descending=True, stable=True).indices[0])
        out["steps"].append({"token": tok, "top": topk_pairs(last, top)})
        if k + 1 < steps:
            last = model.forward([tok], st)
    return out


def _eval_rank(comm, device, model_path, tokens, path, positions, steps, top):
    from ds4tp.model import DS4Model
    model = DS4Model.load(model_path, rank=comm.rank, world=comm.world, comm=comm, device=device)
    return evaluate(model, tokens, path=path, positions=positions, steps=steps, top=top)


def prompt_tokens(args, model_path) -> list[int]:
    from ds4tp.tokenizer import Tokenizer
    if args.tokens is not None:
        try:
            return [int(x) for x in args.tokens.split(",") if x.strip() != ""]
        except ValueError:
            raise SystemExit(f"ds4tp eval: --tokens must be comma-separated integers, got {args.tokens!r}")
    tok = Tokenizer.from_gguf(model_path)
    thinking = "high" if args.think else "none"
    if args.chat:
        return tok.encode_prompt(args.prompt, "", thinking)
    return [tok.bos] + tok.encode(args.prompt)


def main(args) -> int:
    from ds4tp.comm import run_local_ranks
    from ds4tp.gguf_file import GGUFError

    model_path = args.model
    if model_path is None:
        from ds4tp.synth import default_model_path
        model_path = str(default_model_path())
    try:
        tokens = prompt_tokens(args, model_path)
        if not tokens:
            raise SystemExit("ds4tp eval: no tokens to evaluate")
        if args.tp == 1:
            res = _eval_rank(_single(), args.device, model_path, tokens, args.path, args.positions,
                             args.steps, args.top)
        else:
            res = run_local_ranks(args.tp, _eval_rank, model_path, tokens, args.path, args.positions,
                                  args.steps, args.top, device=args.device)
    except (GGUFError, ValueError) as e:
        print(f"ds4tp eval: {e}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(res, sys.stdout)
        print()
    else:
        print(f"prompt tokens ({len(res['prompt_tokens'])}): {res['prompt_tokens']}")
        for p in res["positions"]:
            print(f"pos {p['pos']}: " + " ".join(f"{i}:{l:.3f}" for i, l in p["top"][:8]))
        for k, s in enumerate(res["steps"]):
            print(f"step {k}: token {s['token']}  top " + " ".join(f"{i}:{l:.3f}" for i, l in s["top"][:5]))
    return 0


def _single():
    from ds4tp.comm import SingleComm
    return SingleComm()
