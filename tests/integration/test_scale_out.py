"""Two Keel API processes, each with a home of its own (as on two machines), on one real Postgres (``database_url``)
and one real vLLM: what one process changes, the other serves (keys, lineage, stored responses, batch files and
batches, prompt labels, releases, agent runs); a key's rate limit holds for both together; killing one mid-stream
leaves the other serving, and loses no batch line, run or audit row. A fine-tune promotion through one process served
by another: tests/integration/test_finetune_vllm.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal

import httpx
import pytest

from tests.integration.conftest import KeelServer, eventually, start_api

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GREET = {"messages": [{"role": "system", "content": "Answer in one short sentence."},
                      {"role": "user", "content": "Say hello to {{ who }}."}],
         "params": {"max_tokens": 12, "temperature": 0},
         "variables": [{"name": "who", "type": "string"}]}


def chat(server: KeelServer, key: str, **extra) -> httpx.Response:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8,
            "temperature": 0, **extra}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key}"})


def test_two_api_processes_share_keys_labels_and_limits_and_survive_one_dying(keel_server, postgres_url, tmp_path):
    from app.security.keys import PostgresKeyStore

    bootstrap = PostgresKeyStore(postgres_url)
    admin = bootstrap.create("admin", ["admin"])[1]
    bootstrap.close()
    # Both at once on an empty database (keys aside), as a Deployment's replicas start: their schema set-ups
    # must take turns, not block each other.
    vllm = {"vllm_url": keel_server.vllm_url, "vllm_key": keel_server.vllm_api_key}
    a = start_api(tmp_path / "a", database_url=postgres_url, **vllm, poll_s=0.2)
    b = None
    try:
        b = start_api(tmp_path / "b", database_url=postgres_url, **vllm, poll_s=2.0)  # A takes new jobs
        a.wait_ready(300)
        b.wait_ready(300)
        as_admin = {"Authorization": f"Bearer {admin}"}

        # A key created through A works on B at once.
        made = httpx.post(f"{a.url}/v1/admin/keys", json={"name": "app", "scopes": ["chat", "prompts:write"]},
                          headers=as_admin, timeout=30)
        assert made.status_code == 201, made.text
        key = made.json()["key"]
        r = chat(b, key)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
        # ... and the lineage of B's answer is read through A.
        auth = {"Authorization": f"Bearer {key}"}
        seen = eventually(lambda: (got := httpx.get(f"{a.url}/v1/lineage/{r.json()['id']}", headers=auth, timeout=30)
                                   ).status_code == 200 and got.json().get("guardrail_verdicts") and got.json())
        assert seen and seen["route"]["alias"] == "smollm2" and seen["usage"], seen
        assert {v["stage"] for v in seen["guardrail_verdicts"]} >= {"input"}  # B's guards, read from A

        # A Responses conversation stored through A goes on through B.
        first = httpx.post(f"{a.url}/v1/responses", headers=auth, timeout=120, json={
            "model": "smollm2", "input": "My name is Ada. Say hi.", "max_output_tokens": 8})
        assert first.status_code == 200, first.text
        follow = httpx.post(f"{b.url}/v1/responses", headers=auth, timeout=120, json={
            "model": "smollm2", "input": "What is my name?", "max_output_tokens": 8,
            "previous_response_id": first.json()["id"]})
        assert follow.status_code == 200 and follow.json()["previous_response_id"] == first.json()["id"], follow.text

        # A batch file uploaded through A is read through B; the batch A runs is followed, and its output read,
        # through B.
        lines = b'{"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": ' \
                b'"smollm2", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}}\n'
        upload = httpx.post(f"{a.url}/v1/files", headers=auth, timeout=30, data={"purpose": "batch"},
                            files={"file": ("in.jsonl", lines, "application/jsonl")})
        assert upload.status_code == 200, upload.text
        file_id = upload.json()["id"]
        assert httpx.get(f"{b.url}/v1/files/{file_id}/content", headers=auth, timeout=30).content == lines
        batch = httpx.post(f"{a.url}/v1/batches", headers=auth, timeout=30, json={
            "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        assert batch.status_code == 200, batch.text
        done = eventually(lambda: (got := httpx.get(f"{b.url}/v1/batches/{batch.json()['id']}", headers=auth,
                                                    timeout=30).json())["status"] == "completed" and got, timeout=120)
        assert done and done["request_counts"]["completed"] == 1, done
        output = httpx.get(f"{b.url}/v1/files/{done['output_file_id']}/content", headers=auth, timeout=30)
        assert output.status_code == 200 and b'"custom_id":"q1"' in output.content.replace(b" ", b""), output.text

        # A prompt label moved through A is what B serves.
        assert httpx.post(f"{a.url}/v1/prompts", json={"name": "greet", "content": GREET, "message": "v1"},
                          headers=auth, timeout=30).status_code == 201
        v2 = {**GREET, "messages": [GREET["messages"][0], {"role": "user", "content": "Greet {{ who }} warmly."}]}
        assert httpx.post(f"{a.url}/v1/prompts/greet/versions", json={"content": v2, "base_version": 1},
                          headers=auth, timeout=30).status_code == 201
        for version in (1, 2):
            moved = httpx.put(f"{a.url}/v1/prompts/greet/labels/staging", json={"version": version}, headers=auth,
                              timeout=30)
            assert moved.status_code == 200, moved.text
            served = eventually(lambda v=version: (r := chat(b, key, prompt={"ref": "greet@staging", "variables": {
                "who": "Ada"}})).status_code == 200 and r.json()["prompt"]["ref"] == f"greet@{v}" and r)
            assert served, f"B did not serve greet@{version} after A moved the label"

        # A release created through A serves on B; paused through B, A reports it paused.
        release = httpx.post(f"{a.url}/v1/releases", headers=as_admin, timeout=30, json={
            "name": "support", "strategy": "ab", "weights": {"a": 0, "b": 100}, "override_reason": "scale-out test",
            "variants": [{"name": "a", "model": "smollm2"}, {"name": "b", "model": "smollm2-b"}]})
        assert release.status_code == 201, release.text
        served = eventually(lambda: (r := chat(b, key, model="support")).status_code == 200 and r)
        assert served, "B did not serve the release A created"
        assert served.headers["x-keel-release"] == "support/b"
        assert httpx.post(f"{b.url}/v1/releases/support/pause", headers=as_admin, json={"reason": "test"},
                          timeout=30).status_code == 200
        assert eventually(lambda: httpx.get(f"{a.url}/v1/releases/support", headers=as_admin,
                                            timeout=30).json()["status"] == "paused")

        # An agent run made through A is read through B, its checkpointed state included (the run records and
        # LangGraph's checkpoints are in the shared database).
        run = httpx.post(f"{a.url}/v1/agents/ops/runs", headers=as_admin, timeout=300, json={
            "input": "Is prompt greet v2 ready for production?", "stream": False})
        assert run.status_code == 200 and run.json()["status"] == "completed", run.text
        run = run.json()
        seen_run = httpx.get(f"{b.url}/v1/agents/runs/{run['run_id']}", headers=as_admin, timeout=30)
        assert seen_run.status_code == 200, seen_run.text
        assert seen_run.json()["status"] == "completed" and seen_run.json()["state"]["run_id"] == run["run_id"]

        # A revocation through B reaches A within the key cache's second.
        key_id = made.json()["id"]
        assert httpx.delete(f"{b.url}/v1/admin/keys/{key_id}", headers=as_admin, timeout=30).status_code == 200
        assert eventually(lambda: chat(a, key).status_code == 401, timeout=3)

        # A key's rate limit holds for both processes together: 3 a minute is 3, not 3 each.
        limited = httpx.post(f"{a.url}/v1/admin/keys", json={"name": "slow", "scopes": ["chat"],
                             "rate_limit_per_minute": 3}, headers=as_admin, timeout=30).json()["key"]
        codes = [httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {limited}"},
                           timeout=30).status_code for server in (a, b, a, b)]
        assert codes == [200, 200, 200, 429], codes

        # Killing A in the middle of a stream, and of a batch it runs, leaves B serving and finishing the batch.
        fresh = httpx.post(f"{b.url}/v1/admin/keys", json={"name": "app2", "scopes": ["chat"]}, headers=as_admin,
                           timeout=30).json()["key"]
        as_fresh = {"Authorization": f"Bearer {fresh}"}
        many = b"".join(b'{"custom_id": "n%d", "method": "POST", "url": "/v1/chat/completions", "body": {"model": '
                        b'"smollm2", "messages": [{"role": "user", "content": "Count to %d."}], "max_tokens": 16}}\n'
                        % (i, i) for i in range(24))
        big = httpx.post(f"{a.url}/v1/files", headers=as_fresh, timeout=30, data={"purpose": "batch"},
                         files={"file": ("many.jsonl", many, "application/jsonl")}).json()["id"]
        running = httpx.post(f"{a.url}/v1/batches", headers=as_fresh, timeout=30, json={
            "input_file_id": big, "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json()["id"]
        begun = eventually(lambda: (got := httpx.get(f"{b.url}/v1/batches/{running}", headers=as_fresh,
                                                     timeout=30).json())["request_counts"]["completed"] > 0 and got,
                           timeout=120)
        assert begun and begun["status"] == "in_progress", begun
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Count from one to fifty."}],
                "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{a.url}/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {fresh}"}) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # the stream has begun
            os.killpg(a.proc.pid, signal.SIGKILL)
            a.proc.wait(timeout=30)
            with contextlib.suppress(httpx.HTTPError):  # the stream breaks (unless it had just ended)
                for _ in lines:
                    pass
        r = chat(b, fresh)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
        # The batch is finished by B (its job's lease lapses, B takes it over and answers the lines A had not
        # recorded): every line answered once, none lost.
        finished = eventually(lambda: (got := httpx.get(f"{b.url}/v1/batches/{running}", headers=as_fresh,
                                                        timeout=30).json())["status"] == "completed" and got,
                              timeout=240)
        assert finished and finished["request_counts"] == {"total": 24, "completed": 24, "failed": 0}, finished
        out = httpx.get(f"{b.url}/v1/files/{finished['output_file_id']}/content", headers=as_fresh, timeout=30)
        ids = [json.loads(line)["custom_id"] for line in out.text.splitlines()]
        assert sorted(ids) == sorted(f"n{i}" for i in range(24)), ids
        # ... and the agent run A made before it died is still there.
        after = httpx.get(f"{b.url}/v1/agents/runs/{run['run_id']}", headers=as_admin, timeout=30)
        assert after.status_code == 200 and after.json()["status"] == "completed", after.text
        # ... and what A audited before it died is read through B.
        trail = httpx.get(f"{b.url}/v1/admin/audit", params={"trail": "releases", "subject": "support"},
                          headers=as_admin, timeout=30).json()
        assert {"release.create", "release.pause"} <= {e["action"] for e in trail}, trail
    finally:
        for server in (a, b):
            if server is not None:
                server.stop()
