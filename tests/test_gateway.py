"""The gateway over in-process toy workers (real gRPC, real HTTP, the toy model)."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from ds4tp import tokenizer as tk
from ds4tp.gateway.api import GatewayConfig
from ds4tp.gateway.scheduler import SchedulerConfig
from ds4tp.gateway.textstream import TextStream
from serving_harness import GatewayThread, ToySupervisor
from toy_model import ScriptedModel

MODEL = "deepseek-v4-flash"
KEY = "sk-test-123"


@pytest.fixture(scope="module")
def tok():
    from ds4tp.synth import default_model_path
    return tk.Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def stack(tok):
    sup = ToySupervisor(2, ctx=256, delay_s=0.002)
    gw = GatewayThread(sup.addresses, tok, GatewayConfig(
        api_key=KEY, keepalive_s=0.1, scheduler=SchedulerConfig(max_active=4, max_queue=8, prefill_chunk=16)))
    yield sup, gw
    gw.close()
    sup.close()


def post(gw, path, body, key=KEY, timeout=30):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(gw.url + path, content=data, headers={**headers, "Content-Type": "application/json"},
                      timeout=timeout)


def chat_body(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], **kw}


def sse_events(resp):
    """Data payloads and comment lines of an SSE response, in order."""
    out = []
    for line in resp.iter_lines():
        if line.startswith(":"):
            out.append(("comment", line))
        elif line.startswith("data: "):
            d = line[6:]
            out.append(("data", d if d == "[DONE]" else json.loads(d)))
    return out


def stream_chat(gw, body):
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        assert r.status_code == 200, r.read()
        return sse_events(r)


def content_of(events):
    return "".join(e["choices"][0]["delta"].get("content") or "" for k, e in events
                   if k == "data" and e != "[DONE]" and e.get("choices"))


# ---- errors -----------------------------------------------------------------------------------
def assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


def test_bad_requests_get_openai_errors_and_the_server_stays_up(stack):
    sup, gw = stack
    assert_error(post(gw, "/v1/chat/completions", b'{"model": "x", "messages": ['), 400)
    assert_error(post(gw, "/v1/chat/completions", b'[1, 2]'), 400)
    assert_error(post(gw, "/v1/chat/completions", chat_body(max_tokens="5")), 400, "max_tokens")
    assert_error(post(gw, "/v1/chat/completions", chat_body(max_tokens=0)), 400, "max_tokens")
    assert_error(post(gw, "/v1/chat/completions", chat_body(max_tokens=-3)), 400, "max_tokens")
    assert_error(post(gw, "/v1/chat/completions", chat_body(temperature="hot")), 400, "temperature")
    assert_error(post(gw, "/v1/chat/completions", chat_body(temperature=True)), 400, "temperature")
    assert_error(post(gw, "/v1/chat/completions", chat_body(top_p=1.5)), 400, "top_p")
    assert_error(post(gw, "/v1/chat/completions", chat_body(stop=5)), 400, "stop")
    assert_error(post(gw, "/v1/chat/completions", chat_body(stream="yes")), 400, "stream")
    assert_error(post(gw, "/v1/chat/completions", chat_body(n=2)), 400, "n")
    assert_error(post(gw, "/v1/chat/completions", {"model": MODEL, "messages": "hi"}), 400, "messages")
    assert_error(post(gw, "/v1/chat/completions", {"model": MODEL, "messages": []}), 400, "messages")
    assert_error(post(gw, "/v1/chat/completions",
                      {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_error(post(gw, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                 400, "model")
    assert_error(post(gw, "/v1/chat/completions", chat_body(model="gpt-4")), 404, "model", "model_not_found")
    assert_error(post(gw, "/v1/completions", {"model": MODEL, "prompt": 12}), 400, "prompt")
    assert_error(post(gw, "/v1/completions", {"model": MODEL, "prompt": [5, 99999]}), 400, "prompt")
    long = "word " * 400                                       # > ctx 256 tokens
    assert_error(post(gw, "/v1/completions", {"model": MODEL, "prompt": long}), 400, "prompt",
                 "context_length_exceeded")
    assert_error(post(gw, "/v1/chat/completions",
                      {"model": MODEL, "messages": [{"role": "user", "content": long}]}),
                 400, "messages", "context_length_exceeded")
    assert_error(httpx.get(gw.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)
    # auth
    assert_error(post(gw, "/v1/chat/completions", chat_body(max_tokens=2), key=None), 401, code="invalid_api_key")
    assert_error(post(gw, "/v1/chat/completions", chat_body(max_tokens=2), key="wrong"), 401, code="invalid_api_key")
    assert_error(httpx.get(gw.url + "/v1/models"), 401)
    assert httpx.get(gw.url + "/health").status_code == 200   # open
    # documented OpenAI fields we ignore are fine; the server still answers
    r = post(gw, "/v1/chat/completions", chat_body(max_tokens=3, user="u1", service_tier="auto",
                                                   presence_penalty=0.0))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_unknown_parameters_are_400_naming_them(stack):
    sup, gw = stack
    comp = {"model": MODEL, "prompt": "Once upon", "max_tokens": 3}
    for path, body in (("/v1/chat/completions", chat_body(max_tokens=3)), ("/v1/completions", comp)):
        for stream in (False, True):
            r = post(gw, path, dict(body, stream=stream, frobnicate=1))
            assert_error(r, 400, "frobnicate")
            assert r.json()["error"]["type"] == "invalid_request_error"
            assert "frobnicate" in r.json()["error"]["message"]
        # two unknown fields: both named; an unknown field wins over a type error elsewhere
        r = post(gw, path, dict(body, frobnicate=1, wibble="x", max_tokens="5"))
        assert_error(r, 400, "frobnicate")
        assert "'frobnicate'" in r.json()["error"]["message"] and "'wibble'" in r.json()["error"]["message"]
    # a field of the other endpoint is unknown here
    assert_error(post(gw, "/v1/completions", dict(comp, messages=chat_body()["messages"])), 400, "messages")
    assert_error(post(gw, "/v1/completions", dict(comp, max_completion_tokens=3)), 400, "max_completion_tokens")
    assert_error(post(gw, "/v1/chat/completions", chat_body(prompt="x")), 400, "prompt")
    # nested objects stay lenient
    r = post(gw, "/v1/chat/completions", chat_body(
        max_tokens=2, messages=[{"role": "user", "content": "hi", "extra_key": 1}],
        stream=True, stream_options={"include_usage": True, "include_obfuscation": False}))
    assert r.status_code == 200, r.text
    # documented OpenAI fields we accept and ignore, and our extensions, still get 200
    ignored_chat = dict(presence_penalty=0.5, frequency_penalty=0.1, user="u1", service_tier="auto",
                        store=False, metadata={"k": "v"}, parallel_tool_calls=True, modalities=["text"],
                        response_format={"type": "text"}, safety_identifier="s", prompt_cache_key="c",
                        verbosity="low", n=1, reasoning_effort="none", top_k=5, min_p=0.01,
                        ignore_eos=True, min_tokens=1, return_token_ids=True, thinking=False,
                        chat_template_kwargs={"thinking": False})
    r = post(gw, "/v1/chat/completions", chat_body(max_tokens=3, **ignored_chat))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    r = post(gw, "/v1/completions", dict(comp, best_of=1, echo=False, suffix=None, user="u1", n=1,
                                         presence_penalty=0.0, frequency_penalty=0.0, top_k=5))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    # fields whose request we cannot honour are refused, not dropped
    for extra, name in ((dict(response_format={"type": "json_object"}), "response_format"),
                        (dict(response_format={"type": "json_schema", "json_schema": {}}), "response_format"),
                        (dict(functions=[{"name": "f", "parameters": {}}]), "functions"),
                        (dict(function_call={"name": "f"}), "function_call")):
        r = post(gw, "/v1/chat/completions", chat_body(max_tokens=2, **extra))
        assert_error(r, 400, name)
        assert r.json()["error"]["param"] == name, r.json()
    assert_error(post(gw, "/v1/completions", dict(comp, best_of=2)), 400, "best_of")
    r = post(gw, "/v1/chat/completions", chat_body(max_tokens=2, functions=[], function_call="auto"))
    assert r.status_code == 200, r.text
    # the server keeps serving after the 400s
    ev = stream_chat(gw, chat_body(max_tokens=3, ignore_eos=True, stream=True,
                                   stream_options={"include_usage": True}))
    assert ev[-1] == ("data", "[DONE]") and ev[-2][1]["usage"]["completion_tokens"] == 3


# ---- generation -------------------------------------------------------------------------------
def test_stream_equals_whole_and_usage_counts(stack, tok):
    sup, gw = stack
    body = chat_body(max_tokens=12, temperature=0)
    whole = post(gw, "/v1/chat/completions", body).json()
    ev = stream_chat(gw, dict(body, stream=True, stream_options={"include_usage": True},
                              return_token_ids=True))
    assert ev[-1] == ("data", "[DONE]")
    data = [e for k, e in ev if k == "data" and e != "[DONE]"]
    usage = data[-1]["usage"]
    assert data[-1]["choices"] == [] and all(d["usage"] is None for d in data[:-1])
    assert content_of(ev) == whole["choices"][0]["message"]["content"]
    prompt = tok.encode_rendered(tk.render_chat(body["messages"], thinking="none"))
    assert usage["prompt_tokens"] == whole["usage"]["prompt_tokens"] == len(prompt)
    ids = [t for d in data if d["choices"] for t in d["choices"][0].get("token_ids") or []]
    assert usage["completion_tokens"] == len(ids) == whole["usage"]["completion_tokens"]
    finish = [d["choices"][0]["finish_reason"] for d in data if d["choices"]]
    assert finish[-1] in ("stop", "length") and all(f is None for f in finish[:-1])
    assert data[0]["choices"][0]["delta"]["role"] == "assistant"


def test_stop_string_split_across_tokens_never_leaks(stack, tok):
    sup, gw = stack
    base = chat_body(max_tokens=24, temperature=0, stream=True, return_token_ids=True)
    ev = stream_chat(gw, base)
    chunks = [e["choices"][0] for k, e in ev if k == "data" and e != "[DONE]" and e["choices"]]
    texts = [c["delta"].get("content") or "" for c in chunks if c.get("token_ids")]
    full = "".join(texts)
    # a stop string that starts inside one chunk and ends inside a later one
    pos = [0]
    for t in texts:
        pos.append(pos[-1] + len(t))
    k = next(i for i in range(1, len(texts) - 1) if len(texts[i]) >= 2 and len(texts[i + 1]) >= 1)
    start = pos[k] + len(texts[k]) // 2 if len(texts[k]) > 1 else pos[k]
    stop = full[start:pos[k + 1] + 1]
    expect = full[:full.find(stop)]
    ev2 = stream_chat(gw, dict(base, stop=["never-matches-xyz", stop]))
    got = content_of(ev2)
    assert got == expect
    data = [e for k, e in ev2 if k == "data" and e != "[DONE]"]
    assert data[-1]["choices"][0]["finish_reason"] == "stop"
    whole = post(gw, "/v1/chat/completions", dict(base, stream=False, stop=stop)).json()
    assert whole["choices"][0]["message"]["content"] == expect
    assert whole["choices"][0]["finish_reason"] == "stop"


def test_seed_reproducible_and_sampling_params_accepted(stack):
    sup, gw = stack
    body = chat_body(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, seed=1234)
    a = post(gw, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    b = post(gw, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    c = post(gw, "/v1/chat/completions", dict(body, seed=99)).json()["choices"][0]["message"]["content"]
    assert a == b and a != c


def test_logprobs_and_completions_endpoint(stack, tok):
    sup, gw = stack
    r = post(gw, "/v1/chat/completions", chat_body(max_tokens=4, temperature=0, logprobs=True,
                                                   top_logprobs=3)).json()
    lp = r["choices"][0]["logprobs"]["content"]
    assert len(lp) == 4 and all(len(x["top_logprobs"]) == 3 for x in lp)
    assert all(x["logprob"] == x["top_logprobs"][0]["logprob"] for x in lp)   # greedy = top-1
    r = post(gw, "/v1/completions", {"model": MODEL, "prompt": "Once upon", "max_tokens": 5,
                                     "temperature": 0, "echo": True}).json()
    assert r["object"] == "text_completion" and r["choices"][0]["text"].startswith("Once upon")
    assert r["usage"]["prompt_tokens"] == len([tok.bos] + tok.encode_rendered("Once upon"))
    assert r["usage"]["completion_tokens"] == 5


def test_prefix_reuse_when_a_prompt_extends_a_finished_one(stack, tok):
    sup, gw = stack
    p1 = [tok.bos] + tok.encode("Remember the number seven")
    r1 = post(gw, "/v1/completions", {"model": MODEL, "prompt": p1, "max_tokens": 6, "temperature": 0,
                                      "return_token_ids": True}).json()
    gen = r1["choices"][0]["token_ids"]
    assert r1["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 and len(gen) == 6
    # a stateless client resends the conversation, longer: only the new suffix is fed
    p2 = p1 + gen + tok.encode(" Which number?")
    r2 = post(gw, "/v1/completions", {"model": MODEL, "prompt": p2, "max_tokens": 3, "temperature": 0}).json()
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == len(p1) + len(gen) - 1
    assert r2["usage"]["prompt_tokens"] == len(p2)


def test_prefill_feed_rule():
    """A turn feeds one chunk, or the whole rest when it is at most a quarter chunk longer."""
    from ds4tp.gateway.scheduler import prefill_feed
    assert [prefill_feed(n, 2048) for n in (1, 2048, 2175, 2560)] == [1, 2048, 2175, 2560]
    assert [prefill_feed(n, 2048) for n in (2561, 9000)] == [2048, 2048]
    assert [prefill_feed(n, 4) for n in (4, 5, 6)] == [4, 5, 4]


@pytest.mark.parametrize("n,ops", [(16, 1), (20, 1), (21, 2), (36, 2), (37, 3)])
def test_prompt_chunks_reach_the_workers(stack, n, ops):
    """A token-id prompt of n tokens (chunk 16) reaches the workers in `ops` prefill operations:
    a tail of at most a quarter chunk rides with the chunk before it."""
    sup, gw = stack
    rt = sup.ranks[0].node.runtime
    ids = [100 + (31 * i + n) % 900 for i in range(n)]
    before = rt.steps
    r = post(gw, "/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    assert rt.steps - before == ops


def test_keepalive_during_a_slow_prefill_and_first_chunk_after_it(tok):
    sup = ToySupervisor(1, ctx=256, delay_s=0.15)          # every forward call takes 0.15 s
    gw = GatewayThread(sup.addresses, tok, GatewayConfig(
        keepalive_s=0.05, scheduler=SchedulerConfig(prefill_chunk=4)))
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "a b c d e f g h i j k"}],
                "max_tokens": 2, "stream": True}
        t0 = time.monotonic()
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30) as r:
            seen = []
            for line in r.iter_lines():
                if line:
                    seen.append((time.monotonic() - t0, line))
        first_data = next(i for i, (_, l) in enumerate(seen) if l.startswith("data:"))
        assert any(l == ": keep-alive" for _, l in seen[:first_data])
        # the prompt (~17 tokens) takes >= 4 chunks of 0.15 s before the first token
        assert seen[first_data][0] >= 0.5
    finally:
        gw.close()
        sup.close()


def test_disconnect_cancels_and_frees_the_workers(stack):
    sup, gw = stack
    body = chat_body(max_tokens=200, temperature=1.0, ignore_eos=True, stream=True)
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data:")
            if n == 3:
                break
    # the connection is closed: the generation stops and its sequence is released
    end = time.monotonic() + 5
    while time.monotonic() < end:
        h = httpx.get(gw.url + "/health").json()
        if h["active"] == 0 and all(w["live_sequences"] == 0 for w in h["workers"]):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"generation not cancelled: {h}")
    steps = [r.node.runtime.steps for r in sup.ranks]
    time.sleep(0.3)
    assert [r.node.runtime.steps for r in sup.ranks] == steps      # nothing runs any more


def test_a_non_streamed_request_is_cancelled_when_its_client_leaves(tok):
    sup = ToySupervisor(1, ctx=512, delay_s=0.05)          # 400 tokens would take 20 s
    gw = GatewayThread(sup.addresses, tok, GatewayConfig())
    try:
        # ignore_eos: at temperature 1 the toy model samples EOS with probability ~1/3072 a step,
        # so with a random seed ~0.3% of these requests ended ("stop") within the client's 0.5 s
        try:
            r = httpx.post(gw.url + "/v1/chat/completions", timeout=0.5, json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400,
                "ignore_eos": True})
        except httpx.ReadTimeout:
            pass
        else:
            pytest.fail(f"a response came before the client left: {r.status_code} {r.text[:400]}")
        wait_idle(gw, timeout=3)
        steps = sup.ranks[0].node.runtime.steps
        assert 0 < steps < 60, f"{steps} worker steps (it started, and stopped long before 400)"
    finally:
        gw.close()
        sup.close()


def wait_idle(gw, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        h = httpx.get(gw.url + "/health").json()
        if h["active"] == 0 and all(w["live_sequences"] == 0 for w in h["workers"]):
            return
        time.sleep(0.05)
    raise AssertionError(f"generation not cancelled: {h}")


def test_concurrent_streams_interleave_and_do_not_corrupt_each_other(stack):
    sup, gw = stack
    bodies = [chat_body(max_tokens=40, temperature=1.0, seed=s, stream=True,
                        messages=[{"role": "user", "content": f"Story number {s}"}]) for s in (1, 2, 3)]
    alone = [content_of(stream_chat(gw, b)) for b in bodies]
    results, spans = [None] * 3, [None] * 3

    def run(i):
        t0 = time.monotonic()
        ev = stream_chat(gw, bodies[i])
        results[i], spans[i] = content_of(ev), (t0, time.monotonic())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    assert max(s for s, _ in spans) < min(e for _, e in spans)      # they overlapped


def test_queue_full_is_503(tok):
    sup = ToySupervisor(1, ctx=256, delay_s=0.03)
    gw = GatewayThread(sup.addresses, tok, GatewayConfig(scheduler=SchedulerConfig(max_active=1, max_queue=1)))
    try:
        async def go():
            async with httpx.AsyncClient(timeout=30) as c:
                body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60,
                        "ignore_eos": True}     # (a sampled EOS could end the running one early)
                return await asyncio.gather(*(c.post(gw.url + "/v1/chat/completions", json=body)
                                              for _ in range(4)))
        rs = asyncio.run(go())
        assert sorted(r.status_code for r in rs) == [200, 200, 503, 503]   # one running, one waiting
        assert {r.json()["error"]["code"] for r in rs if r.status_code == 503} == {"queue_full"}
    finally:
        gw.close()
        sup.close()


def test_metrics_count_requests_and_tokens(stack):
    sup, gw = stack
    before = httpx.get(gw.url + "/metrics").text
    r = post(gw, "/v1/chat/completions", chat_body(max_tokens=5, temperature=0)).json()
    after = httpx.get(gw.url + "/metrics").text

    def value(text, name):
        return float(next(l.split()[-1] for l in text.splitlines() if l.startswith(name + " ")))
    assert value(after, "ds4tp_generation_tokens_total") - value(before, "ds4tp_generation_tokens_total") == 5
    assert (value(after, "ds4tp_prompt_tokens_total") - value(before, "ds4tp_prompt_tokens_total")
            == r["usage"]["prompt_tokens"])
    assert value(after, "ds4tp_time_to_first_token_seconds_count") == value(before, "ds4tp_time_to_first_token_seconds_count") + 1
    assert 'ds4tp_requests_total{endpoint="/v1/chat/completions",status="200"}' in after
    assert 'ds4tp_worker_step_seconds_count{rank="1"}' in after
    steps = value(after, 'ds4tp_worker_sample_seconds_count{rank="0"}')
    assert steps - value(before, 'ds4tp_worker_sample_seconds_count{rank="0"}') == 5   # prefill + 4
    assert value(after, 'ds4tp_worker_sample_seconds_sum{rank="0"}') > 0
    decodes = value(after, "ds4tp_decode_round_trip_seconds_count") - value(before, "ds4tp_decode_round_trip_seconds_count")
    assert decodes == 4                                        # the prefill samples token 1
    assert value(after, 'ds4tp_worker_decode_seconds_count{rank="1"}') - value(
        before, 'ds4tp_worker_decode_seconds_count{rank="1"}') == 4
    assert value(after, "ds4tp_decode_round_trip_seconds_sum") > value(
        after, 'ds4tp_worker_decode_seconds_sum{rank="0",part="forward"}') > 0
    assert "ds4tp_queue_depth 0" in after


def test_a_dead_rank_fails_the_stream_then_the_group_recovers(tok):
    sup = ToySupervisor(2, ctx=256, delay_s=0.01)
    gw = GatewayThread(sup.addresses, tok, GatewayConfig())
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30) as r:
            events = []
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[6:]) if line[6:] != "[DONE]" else line)
                    if len(events) == 3:
                        sup.crash(1)
                        t_crash = time.monotonic()
        assert "error" in events[-1] and events[-1]["error"]["code"] == "workers_unavailable"
        assert time.monotonic() - t_crash < 10
        h = httpx.get(gw.url + "/health")
        assert h.status_code == 503 and h.json()["reason"]
        gw.wait_healthy(20)          # the survivor was told to restart; both came back
        r = httpx.post(gw.url + "/v1/chat/completions", json=dict(body, stream=False, max_tokens=3), timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        gw.close()
        sup.close()


# ---- text stream ------------------------------------------------------------------------------
def push_all(ts, ids):
    out = [ts.push(i) for i in ids]
    return ("".join(d.reasoning for d in out), "".join(d.content for d in out), ts.finish())


def test_thinking_output_splits_at_the_think_end_token(tok):
    ids = tok.encode("I should greet.") + [tok.think_end] + tok.encode("Hello!")
    r, c, fin = push_all(TextStream(tok, thinking=True), ids)
    assert (r + fin.delta.reasoning, c + fin.delta.content) == ("I should greet.", "Hello!")
    r, c, fin = push_all(TextStream(tok, thinking=False), tok.encode("Hello!"))
    assert (r, c + fin.delta.content) == ("", "Hello!")


def test_tool_call_block_is_parsed_not_shown(tok):
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": json.dumps({"city": "Rome"})}}
    text = "Let me check." + tk.render_tool_calls([call])
    ids = tok.encode_rendered(text)
    ts = TextStream(tok, tools=True)
    shown = "".join(ts.push(i).content for i in ids)
    fin = ts.finish()
    assert (shown + fin.delta.content) == "Let me check."
    assert [c["function"]["name"] for c in fin.tool_calls] == ["get_weather"]
    assert json.loads(fin.tool_calls[0]["function"]["arguments"]) == {"city": "Rome"}
    # without tools in the request the same text is plain content
    ts = TextStream(tok)
    assert "".join(ts.push(i).content for i in ids) + ts.finish().delta.content == text


def test_a_hung_rank_hits_the_step_deadline(tok):
    from ds4tp.gateway.pool import PoolConfig
    sup = ToySupervisor(2, ctx=256, delay_s=0.0)
    gw = GatewayThread(sup.addresses, tok, GatewayConfig(),
                       PoolConfig(step_timeout_s=1.0, health_interval_s=0.1, dead_after_s=0.5))
    try:
        sup.ranks[1].model.delay_s = 3.0          # rank 1 stops answering steps in time
        t0 = time.monotonic()
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        assert r.status_code == 503 and "DEADLINE_EXCEEDED" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 4     # the 1 s deadline, not the 3 s step
        gw.wait_healthy(20)                       # both ranks were told to restart
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200
    finally:
        gw.close()
        sup.close()


# ---- scripted model: thinking and tool calls end to end ----------------------------------------
@pytest.fixture
def scripted(tok):
    def start(text: str):
        script = tok.encode_rendered(text)
        sup = ToySupervisor(2, ctx=2048, make_model=lambda: ScriptedModel(script, tok.eos))
        gw = GatewayThread(sup.addresses, tok, GatewayConfig())
        started.append((sup, gw))
        return gw
    started = []
    yield start
    for sup, gw in started:
        gw.close()
        sup.close()


def test_thinking_split_over_http(scripted):
    gw = scripted("Let me think about colours." + tk.THINK_END + "Red, green and blue.")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Colours?"}],
            "reasoning_effort": "high", "max_tokens": 100}
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30).json()
    m = r["choices"][0]["message"]
    assert (m["reasoning_content"], m["content"]) == ("Let me think about colours.", "Red, green and blue.")
    assert r["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=dict(body, stream=True), timeout=30) as s:
        data = [e for k, e in sse_events(s) if k == "data" and e != "[DONE]"]
    deltas = [d["choices"][0]["delta"] for d in data if d["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == m["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == m["content"]
    assert data[-1]["usage"] == r["usage"]                    # usage always, even unasked
    # thinking off: the same tokens are all content (the prompt ends in </think>)
    off = httpx.post(gw.url + "/v1/chat/completions", json=dict(body, reasoning_effort=None), timeout=30).json()
    assert "reasoning_content" not in off["choices"][0]["message"]
    assert off["choices"][0]["message"]["content"] == "Let me think about colours." + tk.THINK_END + "Red, green and blue."


def test_tool_calls_over_http(scripted, tok):
    call = {"id": "x", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Rome", "days": 3})}}
    gw = scripted("I will look it up." + tk.render_tool_calls([call]))
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}, "days": {"type": "integer"}}}}}]
    msgs = [{"role": "user", "content": "Weather in Rome?"}]
    body = {"model": MODEL, "messages": msgs, "tools": tools, "max_tokens": 200}
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30).json()
    assert r["usage"]["prompt_tokens"] == len(tok.encode_rendered(tk.render_chat(msgs, tools=tools)))
    c = r["choices"][0]
    assert c["finish_reason"] == "tool_calls" and c["message"]["content"] == "I will look it up."
    (tc,) = c["message"]["tool_calls"]
    assert tc["function"]["name"] == "get_weather"
    assert json.loads(tc["function"]["arguments"]) == {"city": "Rome", "days": 3}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=dict(body, stream=True), timeout=30) as s:
        data = [e for k, e in sse_events(s) if k == "data" and e != "[DONE]"]
    deltas = [d["choices"][0]["delta"] for d in data if d["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "I will look it up."
    calls = [t for d in deltas for t in d.get("tool_calls") or []]
    assert [t["function"]["name"] for t in calls] == ["get_weather"] and calls[0]["index"] == 0
    assert data[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # tool_choice "none": no tools in the prompt, and the block is plain content
    r = httpx.post(gw.url + "/v1/chat/completions", json=dict(body, tool_choice="none"), timeout=30).json()
    assert r["usage"]["prompt_tokens"] == len(tok.encode_rendered(tk.render_chat(msgs)))
    assert "tool_calls" not in r["choices"][0]["message"]


def test_a_short_blip_is_not_a_restart(tok):
    from ds4tp.gateway.pool import PoolConfig
    sup = ToySupervisor(2, ctx=256)
    gw = GatewayThread(sup.addresses, tok, GatewayConfig(),
                       PoolConfig(health_interval_s=0.1, dead_after_s=3.0))
    try:
        group = gw.wait_healthy(5)["group_id"]
        sup.ranks[1].crash()                   # unreachable, but not long enough to give up on it
        end = time.monotonic() + 3
        while httpx.get(gw.url + "/health").status_code == 200:
            assert time.monotonic() < end, "health never noticed the unreachable rank"
            time.sleep(0.05)
        sup.ranks[1].serve_again()
        assert gw.wait_healthy(5)["group_id"] == group          # the same process group
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200
    finally:
        gw.close()
        sup.close()


def test_decodes_ask_for_lookahead_except_on_the_last_step(tok):
    """The scheduler asks the workers to look ahead on every decode but the last by max_tokens,
    and names EOS as the stop token (none with ignore_eos); not at all with --no-lookahead or
    for a request with stop strings (an ending by text would cost the next turn its prefix)."""
    import asyncio

    from ds4tp.gateway.scheduler import Generation, Limits, Scheduler
    from ds4tp.gateway.textstream import TextStream
    from ds4tp.rpc import pb

    class Pool:
        healthy, group_id, max_sequences, reason = True, 1, 4, ""

        def __init__(self):
            self.decodes = []

        async def prefill(self, req):
            return pb.StepReply(sampled=True, token=5)

        async def decode(self, req):
            self.decodes.append(req)
            return pb.StepReply(sampled=True, token=6)

        async def release(self, req):
            return pb.ReleaseReply()

    async def run(limits, stop=(), **cfg):
        pool = Pool()
        sched = Scheduler(pool, SchedulerConfig(**cfg))
        gen = Generation([1, 2, 3], pb.Sampling(), limits, TextStream(tok, stop=list(stop)), eos=tok.eos)
        sched.start()
        sched.submit(gen)
        while not gen.finished:
            await asyncio.sleep(0.01)
        await sched.stop()
        return pool.decodes

    reqs = asyncio.run(run(Limits(max_tokens=4)))
    assert [r.step for r in reqs] == [1, 2, 3]
    assert [r.lookahead for r in reqs] == [True, True, False]
    assert all(list(r.stop_tokens) == [tok.eos] for r in reqs)
    reqs = asyncio.run(run(Limits(max_tokens=2, ignore_eos=True)))
    assert [r.lookahead for r in reqs] == [False] and list(reqs[0].stop_tokens) == []
    reqs = asyncio.run(run(Limits(max_tokens=4), lookahead=False))     # gateway --no-lookahead
    assert [r.lookahead for r in reqs] == [False, False, False]
    reqs = asyncio.run(run(Limits(max_tokens=4), stop=["\n\nUser:"]))   # stop strings: none
    assert [r.lookahead for r in reqs] == [False, False, False]
