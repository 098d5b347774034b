"""End to end through the served path: `ds4tp launch` (worker ranks, NCCL, the decode graphs, the
gateway) and an HTTP client measuring what a user of the OpenAI endpoint sees.

    python bench/serve_e2e.py --model /tmp/full.gguf --device cuda --out serve.json [--kill]

Without --model the launcher's embedded tiny model is served (a check of this script on CPU).
Measured, in order:
- ready: launch to /health 200 (load, and on CUDA the workers' warm-up);
- greedy chat twice (non-streaming, 32 tokens): the same text both times;
- streaming decode from a short prompt and prefill + decode from a long one: time to the first
  chunk (TTFT) and decode tok/s from the chunks' arrival times (tokens from `usage`); for the
  short one, the mean decode step as the gateway sees it (round trip) and each rank's model and
  sampling time in it (the gateway's /metrics); the short one again with temperature 0.8 and
  top_p 0.95 (the sampler's cost on a full vocabulary);
- two and three streams at once: all complete, tokens per second together;
- one-token completions from prompts of lengths no request had before (the workers' warm-up
  should leave nothing to compile): seconds per request;
- bad requests (malformed JSON, a prompt longer than the context, an unknown parameter) get a
  4xx naming the problem;
- after each step, how many kernels Triton compiled for it (its on-disk cache grew by that many
  entries; a served request should compile none after the workers' warm-up);
- with --kill: worker rank N is killed (SIGKILL) in the middle of a stream. The stream must end
  with an error, not hang; then the time until /health is 200 again, and the greedy chat
  once more (same text as before).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


def post(base: str, path: str, body, timeout: float = 600.0):
    """(status, parsed JSON or text) of one non-streaming request; body may be raw bytes."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text


def stream(base: str, body: dict, timeout: float = 600.0, on_chunk=None) -> dict:
    """One streaming request: arrival time of every data chunk, the usage, how it ended."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    times, usage, text, error, done = [], None, [], None, False
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                msg = json.loads(payload)
                if "error" in msg:
                    error = msg["error"]
                    continue
                if msg.get("usage"):
                    usage = msg["usage"]
                for ch in msg.get("choices", []):
                    if ch.get("text"):
                        times.append(time.perf_counter() - t0)
                        text.append(ch["text"])
                        if on_chunk:
                            on_chunk(len(times))
    except Exception as e:     # the connection dropped or timed out: that is the result
        error = error or f"{type(e).__name__}: {e}"
    end = time.perf_counter() - t0
    out = {"chunks": len(times), "seconds": end, "done": done, "error": error, "usage": usage,
           "text": "".join(text)}
    if times:
        out["ttft_s"] = times[0]
        n = (usage or {}).get("completion_tokens", len(times))
        if len(times) > 1 and n > 1:
            out["decode_tok_s"] = (n - 1) / (times[-1] - times[0])
    return out


def scrape(base: str) -> dict:
    """The gateway's /metrics samples: {'name{labels}': value}."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in lines if l and not l.startswith("#")}


def per_step_ms(before: dict, after: dict, nodes: int) -> dict:
    """Decode steps between two scrapes: the gateway's round trip (sent to every rank until all
    replied) and each rank's model (forward) and sampling time, mean ms per step."""
    d = lambda k: after.get(k, 0.0) - before.get(k, 0.0)      # noqa: E731
    n = d("ds4tp_decode_round_trip_seconds_count")
    out = {"decode_steps": int(n)}
    if n:
        out["round_trip"] = round(1e3 * d("ds4tp_decode_round_trip_seconds_sum") / n, 3)
        for r in range(nodes):
            out[f"rank{r}"] = {part: round(1e3 * d(f'ds4tp_worker_decode_seconds_sum{{rank="{r}",part="{part}"}}') / n, 3)
                               for part in ("forward", "sample")}
    return out


def triton_cache_entries() -> int:
    """Kernels in Triton's on-disk cache (TRITON_CACHE_DIR, else ~/.triton/cache): a count that
    grows between two requests means a request compiled kernels."""
    d = os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache")
    return len(os.listdir(d)) if os.path.isdir(d) else 0


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(base: str, timeout: float, proc) -> float:
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"ds4tp launch exited with status {proc.returncode}")
        if healthy(base):
            return time.perf_counter() - t
        time.sleep(0.5)
    raise SystemExit(f"not healthy after {timeout:.0f}s")


def worker_pid(rank: int) -> int | None:
    """The pid of `ds4tp worker ... --rank N` (Linux /proc)."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"worker" in argv and b"--rank" in argv and argv[argv.index(b"--rank") + 1] == str(rank).encode():
            return int(d)
    return None


def summary(r: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "text"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded tiny model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--long-words", type=int, default=1500, help="words in the long prompt")
    ap.add_argument("--tokens", type=int, default=256, help="tokens generated per stream")
    ap.add_argument("--ready-timeout", type=float, default=400)
    ap.add_argument("--kill", type=int, default=None, metavar="RANK",
                    help="kill this worker rank mid-stream, then wait for recovery")
    ap.add_argument("--no-lookahead", action="store_true", help="serve with lookahead off (A/B)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--log", default="serve_e2e_launch.log")
    a = ap.parse_args()

    base = f"http://127.0.0.1:{a.port}"
    cmd = [sys.executable, "-m", "ds4tp", "launch", "--nodes", str(a.nodes), "--device", a.device,
           "--ctx", str(a.ctx), "--port", str(a.port)] + (["--model", a.model] if a.model else []) \
        + (["--no-lookahead"] if a.no_lookahead else [])
    res: dict = {"command": " ".join(cmd[1:]), "nodes": a.nodes, "ctx": a.ctx}

    cached = [triton_cache_entries()]   # Triton's cache before the launch, then after each result

    def show(key, value):
        if isinstance(value, dict):     # kernels compiled since the previous result
            cached.append(triton_cache_entries())
            value = dict(value, triton_kernels_compiled=cached[-1] - cached[-2])
        res[key] = value
        print(f"{key}: {json.dumps(value)[:600]}", flush=True)

    # `timeout` (or Ctrl-C) ends the run through the cleanup below: the launcher's whole process
    # group stopped, the results so far written
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    log = open(a.log, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        show("ready", {"seconds": round(wait_healthy(base, a.ready_timeout, proc), 1)})
        chat = {"model": "deepseek-v4-flash", "temperature": 0, "max_tokens": 32,
                "messages": [{"role": "user", "content": "Name three rivers of Europe."}]}
        first = []
        for k in range(2):
            t = time.perf_counter()
            code, body = post(base, "/v1/chat/completions", chat)
            first.append(body["choices"][0]["message"]["content"] if code == 200 else None)
            show(f"chat_{k}", {"status": code, "seconds": round(time.perf_counter() - t, 3),
                               "usage": body.get("usage") if code == 200 else body})
        show("chat_same_text", first[0] is not None and first[0] == first[1])

        gen = {"model": "deepseek-v4-flash", "temperature": 0, "max_tokens": a.tokens,
               "ignore_eos": True}
        m0 = scrape(base)
        show("stream_short", summary(stream(base, dict(gen, prompt="Once upon a time"))))
        show("stream_short_worker_ms", per_step_ms(m0, scrape(base), a.nodes))
        m0 = scrape(base)
        show("stream_sampled", summary(stream(base, dict(gen, prompt="Once upon a time", temperature=0.8,
                                                        top_p=0.95, seed=7))))
        show("stream_sampled_worker_ms", per_step_ms(m0, scrape(base), a.nodes))
        words = " ".join(f"item{i % 97} is next to item{(7 * i) % 89}." for i in range(a.long_words // 5))
        show("stream_long", summary(stream(base, dict(gen, prompt=words))))

        # streams at once (the workers' decoders: two by default, so three park one another)
        for n_str, key in ((2, "two_streams"), (3, "three_streams")):
            outs = [None] * n_str

            def run(i):
                outs[i] = stream(base, dict(gen, prompt=f"Story number {i}:", max_tokens=a.tokens // 2))
            m0 = scrape(base)
            t = time.perf_counter()
            th = [threading.Thread(target=run, args=(i,)) for i in range(n_str)]
            [x.start() for x in th]
            [x.join() for x in th]
            el = time.perf_counter() - t
            toks = sum((r["usage"] or {}).get("completion_tokens", 0) for r in outs)
            # each stream's own decode rate (after its first token; the others' prefills fall
            # inside it) and the workers' view of the steps
            show(key, {"ok": all(r["done"] and not r["error"] for r in outs),
                       "completion_tokens": toks, "seconds": round(el, 3),
                       "tok_s_together": round(toks / el, 1),
                       "per_stream_decode_tok_s": [r.get("decode_tok_s") for r in outs],
                       "ttft_s": [r.get("ttft_s") for r in outs]})
            show(f"{key}_worker_ms", per_step_ms(m0, scrape(base), a.nodes))

        # a first prompt of a new length must not stall (kernels compiled on a served request):
        # one-token completions from token-id prompts of lengths the warm-up did not feed
        ttft = {}
        for n in (7, 8, 10, 13, 21, 24, 40, 77, 130, 333, 1111):
            ids = [100 + (37 * i + 11) % 1500 for i in range(n)]
            t = time.perf_counter()
            code, body = post(base, "/v1/completions", dict(gen, prompt=ids, max_tokens=1))
            ttft[n] = round(time.perf_counter() - t, 3) if code == 200 else f"status {code}"
        show("first_prompt_of_each_length_s", ttft)

        bad = {}
        bad["malformed_json"] = post(base, "/v1/completions", b"{not json")
        bad["prompt_over_context"] = post(base, "/v1/completions", dict(
            gen, max_tokens=4, prompt=" ".join(["word"] * (2 * a.ctx))))
        bad["unknown_parameter"] = post(base, "/v1/completions", dict(gen, prompt="x", frobnicate=1))
        def said(b):
            err = b.get("error") if isinstance(b, dict) else None
            return str(err.get("message") if isinstance(err, dict) else b)[:160]
        show("bad_requests", {k: {"status": c, "message": said(b)} for k, (c, b) in bad.items()})

        if a.kill is not None:
            killed = {}

            def on_chunk(n):
                if n == 20 and not killed:
                    pid = worker_pid(a.kill)
                    killed["pid"] = pid
                    killed["at"] = time.perf_counter()
                    if pid:
                        os.kill(pid, signal.SIGKILL)
            r = stream(base, dict(gen, prompt="A long tale:", max_tokens=4 * a.tokens),
                       timeout=120, on_chunk=on_chunk)
            ended = time.perf_counter()
            out = summary(r)
            out["killed_pid"] = killed.get("pid")
            out["end_after_kill_s"] = round(ended - killed["at"], 2) if killed else None
            show("kill_mid_stream", out)
            t = time.perf_counter()
            show("recovery", {"seconds": round(wait_healthy(base, a.ready_timeout, proc), 1)})
            code, body = post(base, "/v1/chat/completions", chat)
            again = body["choices"][0]["message"]["content"] if code == 200 else None
            show("chat_after_recovery", {"status": code, "same_text": again == first[0],
                                         "seconds_since_kill": round(time.perf_counter() - t, 1)})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
