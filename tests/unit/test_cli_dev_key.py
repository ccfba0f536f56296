"""Every sub-command that talks to the running API defaults to the dev key `keel up` wrote."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import httpx

from app.cli.common import DEV_KEY_FILE, dev_key


def test_dev_key_reads_the_file_keel_up_writes(tmp_path: Path):
    assert dev_key(tmp_path) is None
    (tmp_path / DEV_KEY_FILE).write_text("\n")
    assert dev_key(tmp_path) is None
    (tmp_path / DEV_KEY_FILE).write_text("keel-abc-123\n")
    assert dev_key(tmp_path) == "keel-abc-123"


def test_keel_agent_sends_the_dev_key_unless_given_one(tmp_path: Path, monkeypatch):
    from app.cli import agents as cli

    (tmp_path / DEV_KEY_FILE).write_text("keel-dev-key\n")
    monkeypatch.setattr(cli, "_settings", lambda: SimpleNamespace(home=tmp_path))
    sent = []

    def fake_get(url, params=None, headers=None, timeout=None):
        sent.append(headers.get("Authorization"))
        return httpx.Response(200, json={"data": []}, request=httpx.Request("GET", url))

    monkeypatch.setattr(httpx, "get", fake_get)
    cli._http_get("http://127.0.0.1:9", None, "/v1/agents/workflows")
    cli._http_get("http://127.0.0.1:9", "explicit", "/v1/agents/workflows")
    assert sent == ["Bearer keel-dev-key", "Bearer explicit"]
