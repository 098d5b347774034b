"""A real `ds4tp launch` (workers and gateway as processes) for the serving integration tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launched:
    """`python -m ds4tp launch --nodes N ...` in the background; stderr is kept (and echoed on
    failure) for the test report."""

    def __init__(self, *args: str, nodes: int = 2, api_key: str | None = None, timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        argv = [sys.executable, "-m", "ds4tp", "launch", "--nodes", str(nodes), "--device", "cpu",
                "--host", "127.0.0.1", "--port", str(self.port), *args]
        if api_key:
            argv += ["--api-key", api_key]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()
        try:
            self.wait_healthy(timeout)
        except Exception:
            self.stop()
            raise

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink.append(line)

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=5)

    def wait_healthy(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ds4tp launch exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = self.health()
                last = r.json()
                if r.status_code == 200:
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"not healthy after {timeout}s: {last}\n{self.log()}")

    def log(self) -> str:
        return "".join(self.stderr[-80:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def pid_alive(pid: int) -> bool:
    """Running (a zombie awaiting its parent's wait() counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
