"""What the eval harness may read and whom it calls with which key (issue 14)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.api.errors import install_error_handlers
from app.api.routes import evals as eval_routes
from app.core.metrics import Metrics
from app.llm import vllm_server
from app.security.keys import ApiKey
from app.settings import Settings
from evals.runner import judge_api_key, judge_endpoint
from evals.store import open_eval_store
from finetune.errors import InvalidJobSpec
from finetune.spec import parse_spec
from tests.fakes.auth import FakeKeys, NoLimit

KEYS = {"ev": ApiKey(id="e1", name="evals", scopes=frozenset({"evals"}), rate_limit_per_minute=None, created_at="")}
SUITE = {"name": "inside", "target": {"model": "smollm2"}, "dataset": {"cases": [{"id": "c1", "input": "hi"}]},
         "metrics": [{"name": "must_include"}]}


@pytest.fixture
def api(tmp_path: Path):
    suites = tmp_path / "suites"
    suites.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    # Not YAML: a YAML error quotes the offending line, and this one holds a secret.
    (outside / "secrets.yaml").write_text("db_password: hunter2-TOPSECRET: x\n")
    (outside / "cases.jsonl").write_text('{"id": "c1", "input": "TOPSECRET case", "oops": 1}\n')
    (suites / "leaky.yaml").write_text(yaml.safe_dump({**SUITE, "name": "leaky",
                                                       "dataset": {"path": "../outside/cases.jsonl"}}))
    settings = Settings(home=tmp_path, auth={"enabled": True})
    settings.evals.suites_dir = suites
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(eval_routes.router)
    app.state.keel = types.SimpleNamespace(settings=settings, keys=FakeKeys(KEYS), rate_limiter=NoLimit(),
                                           metrics=Metrics(), evals=open_eval_store(settings))
    with TestClient(app) as c:
        c.outside = outside
        yield c
    app.state.keel.evals.close()


def test_a_suite_is_a_name_in_the_suites_folders_never_a_path(api) -> None:
    h = {"Authorization": "Bearer ev"}
    secret = str(api.outside / "secrets.yaml")
    for suite in (secret, "../outside/secrets", "../../outside/secrets.yaml", "/etc/hostname"):
        r = api.post("/v1/evals/runs", json={"suite": suite}, headers=h)
        assert r.status_code == 400, (suite, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_request" and err["param"] == "suite"
        assert "not a suite name" in err["message"] and "evals.suites_dir" in err["message"]
        assert "TOPSECRET" not in r.text
    # A suite in the folder may not read its dataset from outside it either.
    r = api.post("/v1/evals/runs", json={"suite": "leaky"}, headers=h)
    assert r.status_code == 400 and "dataset.path must be a file in the suites folder" in r.json()["error"]["message"]
    assert "TOPSECRET" not in r.text
    r = api.post("/v1/evals/runs", json={"suite": "nope"}, headers=h)
    assert r.status_code == 400 and "no suite 'nope' in the suites folder(s)" in r.json()["error"]["message"]


def test_fine_tuning_jobs_name_their_suites_and_never_give_a_path() -> None:
    ok = parse_spec("name: j\ndataset: {path: /d.jsonl}\nevals: [veltmar-fact, smoke-general]\n")
    assert ok.evals == ["veltmar-fact", "smoke-general"]
    for bad in ("/etc/passwd", "../suites/x", "a/b"):
        with pytest.raises(InvalidJobSpec, match="eval suites are named, not paths"):
            parse_spec(f"name: j\ndataset: {{path: /d.jsonl}}\nevals: ['{bad}']\n")


def test_the_judge_on_the_managed_server_gets_its_per_start_key(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(home=tmp_path, backends={"local": {"kind": "vllm", "managed": {"port": 8124}}})
    base_url, _ = judge_endpoint(s)
    assert base_url == "http://127.0.0.1:8124/v1"
    assert judge_api_key(s, base_url) is None  # no server started by this process
    monkeypatch.setitem(vllm_server._API_KEYS, "http://127.0.0.1:8124", "per-start")
    assert judge_api_key(s, base_url) == "per-start"
    s.evals.judge_api_key = SecretStr("configured")
    assert judge_api_key(s, base_url) == "configured"


def test_a_judge_in_another_process_uses_the_backends_configured_key(tmp_path) -> None:
    """A fine-tune worker's judge pointing at the API's managed vLLM: that server's key lives in the API
    process, so the worker uses the key the backend is configured to require (the same one the server got)."""
    from finetune import serving

    s = Settings(home=tmp_path, backends={"local": {"kind": "vllm", "api_key": "shared-key",
                                                    "managed": {"port": 8125}}})
    base_url, _ = judge_endpoint(s)
    assert judge_api_key(s, base_url) == "shared-key"
    assert serving.backend_api_key(s, "local") == "shared-key"  # LoRA loading: the same one rule
    assert judge_api_key(s, "http://127.0.0.1:9999/v1") is None  # another server's key is never sent
