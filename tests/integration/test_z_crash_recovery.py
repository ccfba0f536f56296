"""vLLM dies mid-request: the client gets a clean error, the supervisor restarts the server, Keel recovers.

Named to run last in the session: the restart costs ~40 s of vLLM start-up.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from tests.integration.conftest import KeelServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_vllm_killed_mid_request_then_recovered(keel_server: KeelServer) -> None:
    admin = keel_server.headers("admin")
    server = httpx.get(f"{keel_server.url}/v1/admin/backends", headers=admin).json()["local"]["server"]
    pid, restarts = server["pid"], server["restarts"]
    body = {"model": "smollm2", "max_tokens": 1000, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]}
    events: list[str] = []
    killed = False
    with httpx.stream("POST", f"{keel_server.url}/v1/chat/completions", json=body,
                      headers=keel_server.headers(), timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line:
                continue
            events.append(line)
            # At the first released text, not after N events: every window the output guard passes is a
            # chance for it to end the stream itself (a retraction ends with [DONE] and nothing to kill).
            if not killed and '"content":"' in line and '"content":""' not in line:
                os.killpg(pid, signal.SIGKILL)  # the server and its engine process
                killed = True
    assert killed, f"the stream ended before any text was released: {events}"
    # A clean end: content first, then one error event, no [DONE], no hang.
    assert events[-1] != "data: [DONE]", events[-4:]
    error = json.loads(events[-1][6:])["error"]
    assert error["code"] in ("backend_disconnected", "backend_error", "backend_timeout"), error
    assert error["message"]

    r = httpx.post(f"{keel_server.url}/v1/chat/completions", headers=keel_server.headers(), timeout=60,
                   json={"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
    assert httpx.get(f"{keel_server.url}/readyz").status_code == 503

    keel_server.wait_ready(timeout=600)
    server = httpx.get(f"{keel_server.url}/v1/admin/backends", headers=admin).json()["local"]["server"]
    assert server["restarts"] == restarts + 1 and server["pid"] != pid
    deadline = time.monotonic() + 60
    while True:  # the circuit breaker may still be open for a moment after the restart
        r = httpx.post(f"{keel_server.url}/v1/chat/completions", headers=keel_server.headers(), timeout=60,
                       json={"model": "smollm2", "temperature": 0, "max_tokens": 20,
                             "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    metrics = httpx.get(f"{keel_server.url}/metrics").text
    assert 'keel_backend_restarts_total{backend="local"} 1.0' in metrics
