"""`keel ingest` while `keel serve` owns the embedded store (the engine allows one writer): the CLI
notices the lock and ingests through the running API, with the same summary and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ROOT, KeelServer

pytestmark = pytest.mark.integration


def keel(server: KeelServer, *args: str, key: str = "admin", cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", KEEL_CONFIG=str(server.home / "keel.yaml"),
               KEEL_API_KEY=server.keys[key], PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_ingest_goes_through_the_api_that_holds_the_store(keel_server: KeelServer, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "owls.md").write_text("# Owls\n\nBarn owls hunt at night by sound alone.\n")
    (second / "otters.md").write_text("# Otters\n\nSea otters hold hands while they sleep so they do not drift.\n")
    admin = keel_server.headers("admin")
    r = httpx.post(f"{keel_server.url}/v1/ingest/paths", json={"paths": [str(first)], "collection": "cli-api"},
                   headers=admin, timeout=30)
    job = httpx.get(f"{keel_server.url}/v1/ingest/jobs/{r.json()['id']}", params={"wait_s": 60}, headers=admin,
                    timeout=90).json()
    assert job["state"] == "succeeded", job  # the API now holds the collection's shard open

    out = keel(keel_server, "ingest", "second", "-c", "cli-api", "--json", cwd=tmp_path)  # relative, as users type
    assert out.returncode == 0, out.stderr
    assert "held by the Keel API" in out.stderr and "Traceback" not in out.stderr
    summary = json.loads(out.stdout)
    assert summary["collection"] == "cli-api" and summary["added"] == 1 and summary["documents_total"] == 2

    hits = httpx.post(f"{keel_server.url}/v1/retrieve", json={"query": "Which animal holds hands while sleeping?",
                                                              "collection": "cli-api", "top_k": 1},
                      headers=keel_server.headers("chat"), timeout=60).json()
    assert "otters" in json.dumps(hits).lower()

    found = keel(keel_server, "search", "Which animal holds hands while sleeping?", "-c", "cli-api", "-k", "1",
                 "--json", key="chat")  # `keel search` falls back the same way (any key with the chat scope)
    assert found.returncode == 0, found.stderr
    assert "held by the Keel API" in found.stderr
    assert json.loads(found.stdout)["chunks"][0]["citation"]["source"].endswith("otters.md")

    again = keel(keel_server, "ingest", "second", "-c", "cli-api", "--json", cwd=tmp_path)
    assert again.returncode == 0 and json.loads(again.stdout)["unchanged"] == 1  # idempotent through the API

    refused = keel(keel_server, "ingest", str(second), "-c", "cli-api", "--url", keel_server.url, key="chat")
    assert refused.returncode == 1 and "error (" in refused.stderr and "Traceback" not in refused.stderr

