"""`ds4tp launch --nodes 2` on the embedded tiny model (CPU, gloo), driven by the official openai
client, llama-benchy and raw HTTP."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from ds4tp import tokenizer as tk
from launched import REPO, Launched, pid_alive

openai = pytest.importorskip("openai")

MODEL = "deepseek-v4-flash"
KEY = "sk-serving-test"
CTX = 512


@pytest.fixture(scope="module")
def tok():
    from ds4tp.synth import default_model_path
    return tk.Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def server():
    srv = Launched("--ctx", str(CTX), nodes=2, api_key=KEY)
    pids = [w["pid"] for w in srv.health().json()["workers"]]
    yield srv
    rc = srv.stop()
    assert rc == 0, srv.log()
    assert not any(pid_alive(p) for p in pids), "workers outlived the launcher"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat_prompt_len(tok, messages, thinking="none"):
    return len(tok.encode_rendered(tk.render_chat(messages, thinking=thinking, ctx=CTX)))


MSGS = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours."}]


def test_launch_announces_the_url_and_health(server):
    end = time.monotonic() + 10     # the launcher polls /health itself, a moment after us
    while not any(f"{server.url}/v1" in line for line in server.stdout) and time.monotonic() < end:
        time.sleep(0.1)
    assert any(f"{server.url}/v1" in line for line in server.stdout), server.stdout
    h = server.health().json()
    assert h["status"] == "ok" and [w["rank"] for w in h["workers"]] == [0, 1]
    assert len({w["group_id"] for w in h["workers"]}) == 1


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_whole_and_streamed(client, tok):
    whole = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8, temperature=0)
    msg = whole.choices[0].message
    assert whole.usage.prompt_tokens == chat_prompt_len(tok, MSGS)
    n = whole.usage.completion_tokens
    assert 1 <= n <= 8 and whole.usage.total_tokens == whole.usage.prompt_tokens + n
    assert (whole.choices[0].finish_reason == "length") == (n == 8)
    parts, usage, finish = [], None, None
    for ch in client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8, temperature=0,
                                             stream=True, stream_options={"include_usage": True}):
        if ch.usage:
            usage = ch.usage
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
    assert "".join(parts) == msg.content
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == n and finish == whole.choices[0].finish_reason


def test_completions_whole_and_streamed(client, tok):
    prompt = "The old mill stood by the river"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert whole.usage.prompt_tokens == len([tok.bos] + tok.encode_rendered(prompt))
    assert whole.usage.completion_tokens == 6 and whole.choices[0].finish_reason == "length"
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True) if c.choices)
    assert text == whole.choices[0].text


def test_stop_sequences(client):
    base = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16,
                                     temperature=0).choices[0].text
    assert len(base) >= 6, base
    stop = base[3:6]                    # a stop string from the middle of the output
    cut = base[:base.find(stop)]
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16,
                                  temperature=0, stop=[stop, "zzzz-not-there"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0, stop=stop,
        stream=True) if c.choices)
    assert text == cut


def test_seed_reproducibility(client):
    def run(seed):
        return client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8,
                                              temperature=1.0, top_p=0.95, seed=seed).choices[0].message.content
    a = run(7)
    assert run(7) == a
    assert run(8) != a or run(9) != a


def test_thinking_on_and_off(client, tok):
    off = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6, temperature=0)
    assert getattr(off.choices[0].message, "reasoning_content", None) is None
    assert off.choices[0].message.content
    on = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6, temperature=0,
                                        extra_body={"thinking": {"type": "enabled"},
                                                    "return_token_ids": True})
    m = on.choices[0].message
    assert on.usage.prompt_tokens == chat_prompt_len(tok, MSGS, "high")
    # the prompt now ends in <think>: the tokens before </think> are reasoning, the rest content
    ids = on.choices[0].token_ids
    cut = ids.index(tok.think_end) if tok.think_end in ids else len(ids)
    reasoning, content = m.reasoning_content, m.content or ""
    assert reasoning == tok.decode(ids[:cut])
    assert content == tok.decode([t for t in ids[cut + 1:] if t != tok.eos])
    assert on.usage.completion_tokens_details.reasoning_tokens == sum(t != tok.eos for t in ids[:cut + 1])
    # reasoning_effort switches it on too; chat_template_kwargs can switch it off
    eff = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6, temperature=0,
                                         reasoning_effort="high")
    assert eff.choices[0].message.reasoning_content == reasoning
    kw = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6, temperature=0,
                                        reasoning_effort="high",
                                        extra_body={"chat_template_kwargs": {"thinking": False}})
    assert kw.choices[0].message.content == off.choices[0].message.content
    streamed = [c.choices[0].delta for c in client.chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=6, temperature=0, stream=True,
        extra_body={"thinking": True}) if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in streamed) == reasoning


def test_bad_inputs_get_errors_and_the_server_stays_up(server, client):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server.url + "/v1/chat/completions"
    good = {"model": MODEL, "messages": MSGS, "max_tokens": 2}
    cases = [
        (b"{not json", h, 400),
        (json.dumps(dict(good, max_tokens="two")), h, 400),
        (json.dumps(dict(good, max_tokens=-1)), h, 400),
        (json.dumps(dict(good, temperature=[1])), h, 400),
        (json.dumps(dict(good, messages=[{"role": "user", "content": "w " * 600}])), h, 400),
        (json.dumps(dict(good, model="nope")), h, 404),
        (json.dumps(good), {"Content-Type": "application/json"}, 401),
        (json.dumps(good), {**h, "Authorization": "Bearer wrong"}, 401),
    ]
    for body, headers, status in cases:
        r = httpx.post(url, content=body, headers=headers, timeout=30)
        assert r.status_code == status, (body[:80], r.text)
        err = r.json()["error"]
        assert err["message"] and set(err) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="bad", max_retries=0).models.list()
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
    assert r.usage.completion_tokens >= 1
    assert server.health().status_code == 200


def test_metrics(server, client):
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("ds4tp_requests_total", "ds4tp_prompt_tokens_total", "ds4tp_generation_tokens_total",
                 "ds4tp_time_to_first_token_seconds_count", "ds4tp_decode_tokens_per_second_count",
                 "ds4tp_queue_depth", 'ds4tp_worker_step_seconds_sum{rank="1"}'):
        assert name in text, name
    gen = float(next(l.split()[-1] for l in text.splitlines()
                     if l.startswith("ds4tp_generation_tokens_total ")))
    assert gen > 0


CORPUS = ("The miller's daughter walked along the river every morning, counting the boats that "
          "drifted past the old stone bridge. Some carried wheat, some carried wool, and once a "
          "boat carried nothing but a singing man and his patient grey dog. ") * 40


def test_llama_benchy(server, tmp_path):
    exe = shutil.which("llama-benchy") or os.path.join(os.path.dirname(sys.executable), "llama-benchy")
    if not os.path.exists(exe):
        pytest.skip("llama-benchy is not installed (pip install llama-benchy)")
    tokdir = tmp_path / "tok"
    subprocess.run([sys.executable, "-m", "ds4tp", "export-tokenizer", str(tokdir)], cwd=REPO,
                   check=True, capture_output=True)
    book = "http://offline.invalid/book.txt"
    home = tmp_path / "home"
    cache = home / ".cache" / "llama-benchy"
    cache.mkdir(parents=True)
    (cache / (hashlib.md5(book.encode()).hexdigest() + ".txt")).write_text(CORPUS)
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [exe, "--base-url", server.url + "/v1", "--api-key", KEY, "--model", MODEL,
         "--tokenizer", str(tokdir / "tokenizer.json"), "--book-url", book, "--pp", "48", "--tg", "6",
         "--runs", "2", "--skip-coherence", "--latency-mode", "api", "--format", "json",
         "--save-result", str(out), "--exit-on-first-fail"],
        env=dict(os.environ, HOME=str(home), HF_HUB_OFFLINE="1"), capture_output=True, text=True,
        timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(r.stdout[-2000:])
    report = json.loads(out.read_text())
    runs = report["benchmarks"]
    assert runs and report["model"] == MODEL
    for b in runs:
        assert b["pp_throughput"]["mean"] > 0 and b["tg_throughput"]["mean"] > 0, b
        assert b["prompt_size"] == 48 and b["response_size"] == 6
