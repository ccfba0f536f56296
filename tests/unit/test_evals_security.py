"""What the eval harness may read and whom it calls with which key (issue 14)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from app.core.settings import Settings
from app.llm import vllm_server
from evals.runner import judge_api_key, judge_endpoint


def test_the_judge_on_the_managed_server_gets_its_per_start_key(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(home=tmp_path, backends={"local": {"kind": "vllm", "managed": {"port": 8124}}})
    base_url, _ = judge_endpoint(s)
    assert base_url == "http://127.0.0.1:8124/v1"
    assert judge_api_key(s, base_url) is None  # no server started by this process
    monkeypatch.setitem(vllm_server._API_KEYS, "http://127.0.0.1:8124", "per-start")
    assert judge_api_key(s, base_url) == "per-start"
    s.evals.judge_api_key = SecretStr("configured")
    assert judge_api_key(s, base_url) == "configured"
