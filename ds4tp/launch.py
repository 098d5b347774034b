"""`ds4tp launch`: the whole service on one host: N worker ranks and the gateway, supervised.

Each rank runs as `ds4tp worker` (CPU with gloo, or one GPU each with NCCL) and the gateway as
`ds4tp gateway`, all as child processes. The launcher waits until /health answers 200, prints
the URL, then supervises: a child that exits is started again (after a short back-off that grows
while it keeps failing fast). That is also how the ranks re-form their process group after one of
them dies: the gateway tells the survivors to exit with the restart status, and the launcher
restarts them along with the dead one. Ctrl-C or SIGTERM stops everything (SIGTERM, then SIGKILL
after a grace period).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

GRACE_S = 10.0


def log(msg: str) -> None:
    print(f"[ds4tp launch {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when the launcher dies."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pick_devices(device: str, n: int) -> list[str]:
    """One device per rank: cuda:i when asked for (or auto and there are >= n GPUs), else cpu."""
    if device == "cpu":
        return ["cpu"] * n
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        if count >= n:
            return [f"cuda:{i}" for i in range(n)]
        if count:
            log(f"{count} GPU(s) for {n} ranks: running on the CPU (use --nodes {count} for the GPUs)")
        return ["cpu"] * n
    if device == "cuda":
        if count < n:
            raise SystemExit(f"ds4tp launch: --device cuda needs {n} GPUs, found {count}")
        return [f"cuda:{i}" for i in range(n)]
    return [device] * n   # e.g. cuda:0 for every rank (testing only)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float = 0.0
    backoff: float = 0.5
    restarts: int = 0

    def start(self) -> None:
        # Own session: a terminal's Ctrl-C reaches the launcher only, which then stops the
        # children in order. Parent-death signal: children never outlive a killed launcher.
        self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Supervisor:
    children: list[Child] = field(default_factory=list)
    stopping: bool = False

    def check(self) -> None:
        """Restart children that exited."""
        now = time.monotonic()
        for c in self.children:
            if c.alive() or self.stopping:
                continue
            if c.proc is not None:
                code = c.proc.returncode
                ran = now - c.started
                # back off while a child keeps dying young; reset once it ran for a while
                c.backoff = 0.5 if ran > 10 else min(c.backoff * 2, 10.0)
                c.restart_at = now + c.backoff
                log(f"{c.name} (pid {c.proc.pid}) exited with status {code} after {ran:.1f}s; "
                    f"restarting in {c.backoff:.1f}s")
                c.proc = None
            if now >= c.restart_at:
                c.restarts += 1
                c.start()

    def stop(self) -> None:
        """The gateway first (clients get an orderly end), then every worker."""
        self.stopping = True
        gateway = [c for c in self.children if c.name == "gateway"]
        workers = [c for c in self.children if c.name != "gateway"]
        for phase in (gateway, workers):
            for c in phase:
                if c.alive():
                    c.proc.terminate()
            end = time.monotonic() + GRACE_S
            for c in phase:
                if c.proc is None:
                    continue
                try:
                    c.proc.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log(f"{c.name} did not stop in {GRACE_S:.0f}s; killing it")
                    c.proc.kill()
                    c.proc.wait()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(args) -> int:
    if args.nodes < 1:
        print("ds4tp launch: --nodes must be >= 1", file=sys.stderr)
        return 2
    model = args.model
    if model is None:
        from ds4tp.synth import default_model_path
        model = str(default_model_path())
    if not os.path.exists(model):
        print(f"ds4tp launch: model file {model} not found", file=sys.stderr)
        return 2
    devices = pick_devices(args.device, args.nodes)
    master_port = free_port()
    grpc_ports = [free_port() for _ in range(args.nodes)]
    py = [sys.executable, "-m", "ds4tp"]

    env = dict(os.environ)
    if devices[0] == "cpu":
        # share the cores between the ranks instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nodes)))
    sup = Supervisor()
    for rank, (dev, port) in enumerate(zip(devices, grpc_ports)):
        sup.children.append(Child(f"worker rank {rank}", py + [
            "worker", "--model", model, "--rank", str(rank), "--world", str(args.nodes),
            "--master-addr", "127.0.0.1", "--master-port", str(master_port),
            "--grpc-host", "127.0.0.1", "--grpc-port", str(port), "--device", dev,
            "--ctx", str(args.ctx), "--decoders", str(args.decoders)], env))
    gw = py + ["gateway", "--workers", ",".join(f"127.0.0.1:{p}" for p in grpc_ports),
               "--model", model, "--host", args.host, "--port", str(args.port),
               "--served-model-name", args.served_model_name, "--step-timeout", str(args.step_timeout)]
    if args.no_lookahead:
        gw.append("--no-lookahead")
    gw_env = dict(env)
    if args.api_key:
        gw_env["DS4TP_API_KEY"] = args.api_key   # not on the command line (visible in ps)
    sup.children.append(Child("gateway", gw, gw_env))

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)

    probe_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    health_url = f"http://{probe_host}:{args.port}/health"
    log(f"starting {args.nodes} worker(s) on {', '.join(sorted(set(devices)))} and the gateway; model {model}")
    announced = False
    try:
        for c in sup.children:
            c.start()
        while True:
            sup.check()
            if not announced and healthy(health_url):
                announced = True
                print(f"ds4tp: serving {args.served_model_name} at http://{args.host}:{args.port}/v1 "
                      f"({args.nodes} rank(s), {devices[0] if len(set(devices)) == 1 else 'gpus'}); "
                      f"Ctrl-C stops", flush=True)
            time.sleep(0.2)
    except KeyboardInterrupt:
        log("stopping")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sup.stop()
    return 0
