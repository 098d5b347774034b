"""`ds4tp` command line: one subcommand per job, each implemented in its own module."""
from __future__ import annotations

import argparse
import importlib
import sys

from ds4tp.gateway import STEP_TIMEOUT_S
from ds4tp.worker import DECODERS

NO_LOOKAHEAD_HELP = ("workers do not feed a sampled token before the gateway sends it back "
                     "(lookahead overlaps the next decode step with the reply's round trip; off "
                     "for diagnosis)")

DECODERS_HELP = ("static decoders (CUDA graphs) per worker: that many sequences decode at once "
                 "without setting each other's state aside (each costs its decode buffers for --ctx "
                 "tokens and its captured graphs)")

# subcommand -> "module:function"; imported only when the subcommand runs.
COMMANDS = {
    "synth": "ds4tp.synth:main",
    "eval": "ds4tp.evaluate:main",
    "plan": "ds4tp.shard.plan:main",
    "launch": "ds4tp.launch:main",
    "worker": "ds4tp.worker.main:main",
    "gateway": "ds4tp.gateway.main:main",
    "export-tokenizer": "ds4tp.tokenizer:export_main",
    "bench": "ds4tp.bench:main",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ds4tp", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic DS4-shaped GGUF (random weights)")
    s.add_argument("--preset", choices=["tiny", "small", "full"], default="tiny")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.add_argument("--layers", type=int, default=None,
                   help="write only the first N layers (real per-layer sizes, fewer layers)")
    s.add_argument("--jobs", type=int, default=None,
                   help="writer processes (default: one per core, at most 32, fewer for small "
                        "files); the file does not depend on it")

    e = sub.add_parser("eval", help="evaluate tokens or a prompt and print top logits")
    e.add_argument("--model", default=None, help="GGUF file (default: the embedded tiny model)")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokens", help="comma-separated token ids")
    g.add_argument("--prompt", help="text prompt (BOS is prepended)")
    e.add_argument("--chat", action="store_true", help="render --prompt with the chat template")
    e.add_argument("--think", action="store_true", help="with --chat: thinking mode")
    e.add_argument("--positions", choices=["last", "all"], default="last")
    e.add_argument("--path", choices=["prefill", "decode"], default="prefill")
    e.add_argument("--steps", type=int, default=0)
    e.add_argument("--top", type=int, default=20)
    e.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (spawned locally)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true")

    pl = sub.add_parser("plan", help="print the tensor-parallel shard plan with bytes per rank")
    pl.add_argument("model", nargs="?", help="GGUF file")
    pl.add_argument("--preset", choices=["tiny", "small", "full"], help="plan a preset shape (no file)")
    pl.add_argument("--world", type=int, default=2)
    pl.add_argument("--json", action="store_true")

    la = sub.add_parser("launch", help="start workers and the OpenAI gateway on this host")
    la.add_argument("--nodes", type=int, default=2, help="worker processes (tensor-parallel ranks)")
    la.add_argument("--model", default=None, help="GGUF file (default: generate the tiny model)")
    la.add_argument("--host", default="127.0.0.1")
    la.add_argument("--port", type=int, default=8000)
    la.add_argument("--api-key", default=None)
    la.add_argument("--served-model-name", default="deepseek-v4-flash")
    la.add_argument("--device", default="auto", help="cpu, cuda or auto")
    la.add_argument("--ctx", type=int, default=4096, help="context length per sequence")
    la.add_argument("--step-timeout", type=float, default=STEP_TIMEOUT_S,
                    help="gateway deadline (s) of one decode step, a backstop for a stuck rank "
                         "(a dead one fails at once); prefill adds per-token time")
    la.add_argument("--no-lookahead", action="store_true",
                    help=NO_LOOKAHEAD_HELP)
    la.add_argument("--decoders", type=int, default=DECODERS, help=DECODERS_HELP)

    w = sub.add_parser("worker", help="one tensor-parallel worker (rank) serving gRPC")
    w.add_argument("--model", required=True)
    w.add_argument("--rank", type=int, default=None, help="default: $RANK")
    w.add_argument("--world", type=int, default=None, help="default: $WORLD_SIZE")
    w.add_argument("--master-addr", default=None, help="default: $MASTER_ADDR")
    w.add_argument("--master-port", type=int, default=None, help="default: $MASTER_PORT")
    w.add_argument("--grpc-host", default="0.0.0.0")
    w.add_argument("--grpc-port", type=int, default=50051)
    w.add_argument("--device", default="auto")
    w.add_argument("--ctx", type=int, default=4096)
    w.add_argument("--decoders", type=int, default=DECODERS, help=DECODERS_HELP)
    w.add_argument("--no-warm-up", action="store_true",
                   help="on CUDA, skip compiling kernels and capturing the decode graphs before "
                        "turning READY (the first requests then pay for it, and may pass the "
                        "gateway's step deadline)")

    gw = sub.add_parser("gateway", help="OpenAI-compatible HTTP gateway in front of the workers")
    gw.add_argument("--workers", required=True, help="comma-separated host:port of every rank, rank order")
    gw.add_argument("--model", required=True, help="GGUF file (for the tokenizer)")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000)
    gw.add_argument("--api-key", default=None)
    gw.add_argument("--served-model-name", default="deepseek-v4-flash")
    gw.add_argument("--step-timeout", type=float, default=STEP_TIMEOUT_S,
                    help="deadline (s) of one decode step, a backstop for a stuck rank (a dead "
                         "one fails at once); prefill adds per-token time")
    gw.add_argument("--no-lookahead", action="store_true",
                    help=NO_LOOKAHEAD_HELP)

    ex = sub.add_parser("export-tokenizer", help="write tokenizer.json + config for HF AutoTokenizer")
    ex.add_argument("dir")
    ex.add_argument("--model", default=None, help="GGUF file (default: the embedded tiny model)")

    b = sub.add_parser("bench", help="full-size GPU benchmark (needs CUDA)")
    b.add_argument("--out", default=None, help="write the JSON results here")
    b.add_argument("--layers", type=int, default=None)
    b.add_argument("--tp", default="2,1")
    b.add_argument("--depth", type=int, default=4096, help="context depth of the second decode timing (0: skip)")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--no-ab", action="store_true",
                   help="skip the same-run A/B variants (decode without PDL, on Triton kernels, one "
                        "stream, ...; prefill on its previous paths): the acceptance figures only")
    b.add_argument("--replicate-compressors", action="store_true",
                   help="every rank holds the whole compressors (spec 18.3's baseline) instead of "
                        "its channels: the split's comparison")
    b.add_argument("--gguf", default=None, help="also time loading this GGUF at the largest TP")
    b.add_argument("--load-only", action="store_true", help="with --gguf: only time the load")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ds4tp.kernels import pin_compile_cache, triton_defaults
    pin_compile_cache()    # before anything compiles; workers and the bench inherit it
    triton_defaults()
    mod, fn = COMMANDS[args.command].split(":")
    rc = getattr(importlib.import_module(mod), fn)(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
