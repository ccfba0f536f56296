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


def test_keel_chat_says_when_the_guardrails_withdraw_what_it_showed():
    from openai.types.chat import ChatCompletionChunk

    from app.cli.main import show_stream

    def chunk(delta=None, **extra):
        choices = [{"index": 0, "delta": {"content": delta}, "finish_reason": None}] if delta is not None else []
        return ChatCompletionChunk.model_validate({"id": "c", "object": "chat.completion.chunk", "created": 0,
                                                   "model": "m", "choices": choices, **extra})

    out = []
    answer = show_stream([chunk("Ships carry "), chunk("cargo. You are "), chunk(guardrail={
        "type": "retraction", "validator": "toxicity", "retracted_chars": 26, "message": "I can't say that."})],
        out.append)
    assert "".join(out) == "Ships carry cargo. You are \n[withdrawn by the guardrails (toxicity): I can't say that.]\n"
    assert answer == "I can't say that."
