"""Chained decode steps through the whole served stack on the CPU: the real gateway over two
in-process gRPC workers that run the embedded tiny DS4 model with the static-buffer decoder and
lookahead forced on (on CUDA both are the default). A client gets the same text with the
gateway's lookahead on (steps chain: each is queued before the worker reads the token it
consumes) as with it off; a stream cancelled mid-way leaves the workers serving; two streams at
once get what each gets alone."""
from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from ds4tp import tokenizer as tk
from ds4tp.gateway.api import GatewayConfig
from ds4tp.gateway.scheduler import SchedulerConfig
from ds4tp.model import DS4Model
from ds4tp.synth import default_model_path
from serving_harness import GatewayThread, ToySupervisor
from test_gateway import KEY, MODEL, post, sse_events


@pytest.fixture(scope="module")
def tok():
    return tk.Tokenizer.from_gguf(default_model_path())


def _stack(tok, lookahead: bool):
    sup = ToySupervisor(2, ctx=256, make_model=lambda: DS4Model.load(default_model_path()),
                        runtime_kw=dict(fast_decode=True, lookahead=True))
    gw = GatewayThread(sup.addresses, tok, GatewayConfig(
        api_key=KEY, keepalive_s=0.2,
        scheduler=SchedulerConfig(max_active=4, max_queue=8, lookahead=lookahead)))
    return sup, gw


def _body(content: str, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 14,
            "ignore_eos": True, **kw}


REQUESTS = {
    "greedy": _body("Tell me a story", temperature=0),
    "greedy, EOS allowed": _body("Why is the sky blue?", temperature=0, ignore_eos=False),
    "sampled": _body("Tell me a story", temperature=0.9, top_p=0.9, seed=5),
    "top_logprobs": _body("Name a colour", temperature=0, logprobs=True, top_logprobs=2),
}


def _stream(gw, body) -> str:
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
    assert events[-1] == ("data", "[DONE]")
    return "".join(e["choices"][0]["delta"].get("content") or "" for k, e in events
                   if k == "data" and e != "[DONE]" and e.get("choices"))


def _run(gw) -> dict:
    out = {}
    for name, body in REQUESTS.items():
        r = post(gw, "/v1/chat/completions", body, timeout=60)
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        out[name] = (c["message"]["content"], c["finish_reason"],
                     [(t["token"], round(t["logprob"], 6)) for t in (c.get("logprobs") or {}).get("content") or []])
    out["stream"] = _stream(gw, REQUESTS["greedy"])
    # cancelled after a few chunks: the workers keep serving, the next request is unaffected
    with httpx.stream("POST", gw.url + "/v1/chat/completions",
                      json={**_body("A long tale", temperature=0, max_tokens=60), "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break
    out["after cancel"] = _stream(gw, REQUESTS["sampled"])
    with cf.ThreadPoolExecutor(2) as ex:      # two at once: steps interleave on the workers
        both = list(ex.map(lambda b: _stream(gw, b), [REQUESTS["greedy"], REQUESTS["sampled"]]))
    out["together"] = both
    return out


def test_chained_steps_serve_what_lookahead_off_serves(tok):
    got = {}
    for lookahead in (True, False):
        sup, gw = _stack(tok, lookahead)
        try:
            got[lookahead] = _run(gw)
            chained = [r.node.runtime.chained for r in sup.ranks]
        finally:
            gw.close()
            sup.close()
        assert chained[0] == chained[1]
        assert (chained[0] > 0) is lookahead, chained
    on, off = got[True], got[False]
    assert on == off
    assert on["together"] == [on["greedy"][0], on["after cancel"]]   # as each alone
    assert on["stream"] == on["greedy"][0]
    assert on["top_logprobs"][2], "no logprobs came back"
