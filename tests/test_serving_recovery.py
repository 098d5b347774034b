"""A worker of a real `ds4tp launch --nodes 2` dies mid-stream: the client gets an error fast,
/health turns unhealthy, and the service comes back by itself."""
from __future__ import annotations

import os
import signal
import time

import pytest

from launched import Launched, pid_alive

openai = pytest.importorskip("openai")
MODEL = "deepseek-v4-flash"


@pytest.fixture(scope="module")
def server():
    srv = Launched("--ctx", "1024", nodes=2)
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.mark.parametrize("victim", [1, 0])
def test_killing_a_worker_mid_stream(server, victim):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    before = server.health().json()
    pids = [w["pid"] for w in before["workers"]]
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=800, temperature=1.0, seed=3, stream=True)
    t_kill, got = None, 0
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            got += 1
            if got == 5:
                os.kill(pids[victim], signal.SIGKILL)
                t_kill = time.monotonic()
    elapsed = time.monotonic() - t_kill
    assert t_kill is not None and elapsed < 10, elapsed
    assert "workers unavailable" in str(err.value)

    h = server.health()
    assert h.status_code == 503 and h.json()["reason"], h.text
    assert not pid_alive(pids[victim])

    after = server.wait_healthy(120)
    new_pids = [w["pid"] for w in after["workers"]]
    assert all(p not in pids for p in new_pids), "every rank must have restarted into a new group"
    assert after["group_id"] != before["group_id"]
    assert not any(pid_alive(p) for p in pids)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3)
    assert r.usage.completion_tokens >= 1
