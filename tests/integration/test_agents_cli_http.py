"""`keel agent` against a running Keel API over HTTP (the default transport), as a user runs it:
a real subprocess, the real server with SmolLM2 on vLLM, documents ingested through the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from agents.schemas import validate_event
from tests.integration.conftest import ROOT, KeelServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOC = "# Keel networking\n\nThe Keel API listens on port 8000 by default. The supervised vLLM server listens on 8001.\n"


def keel(server: KeelServer, *args: str, key: str | None = "chat") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200", KEEL_HOME=str(server.home / "cli"))
    if key:
        env["KEEL_API_KEY"] = server.keys[key]
    return subprocess.run([sys.executable, "-m", "app.cli", "agent", *args, "--url", server.url], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ingested(keel_server: KeelServer, tmp_path_factory) -> KeelServer:
    docs = tmp_path_factory.mktemp("agent-cli-docs")
    (docs / "keel-ports.md").write_text(DOC)
    r = httpx.post(f"{keel_server.url}/v1/ingest/paths", json={"paths": [str(docs)]},
                   headers=keel_server.headers("admin"), timeout=30)
    assert r.status_code == 202, r.text
    job = httpx.get(f"{keel_server.url}/v1/ingest/jobs/{r.json()['id']}", params={"wait_s": 60},
                    headers=keel_server.headers("admin"), timeout=90).json()
    assert job["state"] == "succeeded", job
    return keel_server


def test_workflows_run_runs_and_show_over_http(ingested: KeelServer) -> None:
    listed = keel(ingested, "workflows")
    assert listed.returncode == 0, listed.stderr
    assert "rag-qa" in listed.stdout and "research" in listed.stdout

    ran = keel(ingested, "run", "rag-qa", "Which port does the Keel API listen on?", "--json")
    assert ran.returncode == 0, ran.stderr
    events = [json.loads(line) for line in ran.stdout.splitlines() if line.strip()]
    for e in events:
        validate_event(e)  # the documented SSE schema, as received by a client
    types = [e["type"] for e in events]
    assert types[0] == "run.started" and types[-1] == "final", types
    assert "node.started" in types and "tool.result" in types and "token" in types
    final = events[-1]
    assert final["status"] == "completed" and final["answer"]
    run_id = final["run_id"]

    runs = keel(ingested, "runs", "--workflow", "rag-qa")
    assert runs.returncode == 0, runs.stderr
    assert run_id in runs.stdout and "completed" in runs.stdout

    shown = keel(ingested, "show", run_id)
    assert shown.returncode == 0, shown.stderr
    assert run_id in shown.stdout and "retrieve" in shown.stdout  # the step table names the nodes


def test_human_rendering_streams_the_run(ingested: KeelServer) -> None:
    ran = keel(ingested, "run", "rag-qa", "What port does vLLM listen on?")
    assert ran.returncode == 0, ran.stderr
    out = ran.stdout
    assert "rag-qa run" in out and "answer (completed)" in out, out
    assert "Traceback" not in out + ran.stderr


def test_failures_are_one_line_errors_not_tracebacks(ingested: KeelServer) -> None:
    unknown = keel(ingested, "run", "no-such-workflow", "hi")
    assert unknown.returncode == 1 and "no-such-workflow" in unknown.stderr, unknown.stderr
    assert "Traceback" not in unknown.stderr

    nokey = keel(ingested, "run", "rag-qa", "hi", key=None)
    assert nokey.returncode == 1 and "error (" in nokey.stderr and "Traceback" not in nokey.stderr

    missing = keel(ingested, "show", "run-does-not-exist")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr

    down = subprocess.run([sys.executable, "-m", "app.cli", "agent", "workflows", "--url", "http://127.0.0.1:9"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KEEL_API_KEY": "x"})
    assert down.returncode == 1 and "cannot reach" in down.stderr and "Traceback" not in down.stderr
