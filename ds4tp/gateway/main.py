"""`ds4tp gateway`: the OpenAI-compatible HTTP server in front of the worker ranks."""
from __future__ import annotations

import os
import sys
import time

from ds4tp.gateway.api import GatewayConfig, create_app
from ds4tp.gateway.pool import PoolConfig, WorkerPool
from ds4tp.gateway.scheduler import SchedulerConfig


def log(msg: str) -> None:
    print(f"[ds4tp gateway {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(args) -> int:
    import uvicorn

    from ds4tp.tokenizer import Tokenizer

    addresses = [a.strip() for a in args.workers.split(",") if a.strip()]
    if not addresses:
        print("ds4tp gateway: --workers lists no host:port", file=sys.stderr)
        return 2
    for a in addresses:
        host, sep, port = a.rpartition(":")
        if not sep or not host or not port.isdigit():
            print(f"ds4tp gateway: worker address {a!r} is not host:port", file=sys.stderr)
            return 2
    if not os.path.exists(args.model):
        print(f"ds4tp gateway: model file {args.model} not found (needed for the tokenizer)",
              file=sys.stderr)
        return 2
    tokenizer = Tokenizer.from_gguf(args.model)
    # the key may come from the environment (systemd EnvironmentFile, ds4tp launch) rather than
    # the command line, where every local user can read it
    api_key = args.api_key or os.environ.get("DS4TP_API_KEY") or None
    cfg = GatewayConfig(served_model=args.served_model_name, api_key=api_key,
                        scheduler=SchedulerConfig(lookahead=not args.no_lookahead))
    if args.step_timeout <= 0:
        print("ds4tp gateway: --step-timeout must be > 0", file=sys.stderr)
        return 2
    pool = WorkerPool(addresses, PoolConfig(step_timeout_s=args.step_timeout), vocab=tokenizer.n_vocab,
                      log=log)
    app = create_app(cfg, pool, tokenizer)
    log(f"serving {cfg.served_model} on http://{args.host}:{args.port}/v1, workers {','.join(addresses)}"
        + (" (API key required)" if cfg.api_key else ""))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=3)
    return 0
