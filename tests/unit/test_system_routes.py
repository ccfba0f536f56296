"""/readyz answers load balancers without a key, so it must not disclose how the servers run; the
details stay behind the admin scope (GET /v1/admin/backends)."""

from __future__ import annotations

import types

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.api.errors import install_error_handlers
from app.api.routes import admin, system
from app.core.metrics import Metrics
from app.security.keys import ApiKey
from app.settings import Settings
from tests.fakes.auth import FakeKeys, NoLimit

SERVER = {"state": "failed", "pid": 4242, "restarts": 5, "url": "http://127.0.0.1:8001", "last_exit_code": 1,
          "last_error": "vLLM exited with code 1; see /srv/keel/logs/vllm-local.log",
          "log_file": "/srv/keel/logs/vllm-local.log",
          "command": ["/srv/keel/.venv-vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]}
KEYS = {"root": ApiKey(id="a1", name="root", scopes=frozenset({"admin"}), rate_limit_per_minute=None, created_at="")}


class FakeRouter:
    def __init__(self) -> None:
        self.ready = True

    async def readiness(self) -> dict:
        return {"local": {"ready": self.ready, "kind": "vllm", "circuit": "closed", "server": dict(SERVER)}}


@pytest.fixture
def client(tmp_path):
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(system.router)
    app.include_router(admin.router)
    llm = FakeRouter()
    app.state.keel = types.SimpleNamespace(settings=Settings(home=tmp_path, auth={"enabled": True}), llm=llm,
                                           keys=FakeKeys(KEYS), rate_limiter=NoLimit(), metrics=Metrics())
    with TestClient(app) as c:
        c.llm = llm
        yield c


def test_readyz_says_ready_per_backend_and_nothing_more(client) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"ready": True, "default_model": "smollm2", "backends": {"local": {"ready": True}}}
    client.llm.ready = False
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["backends"] == {"local": {"ready": False}}
    for secret in ("4242", "vllm-local.log", ".venv-vllm", "exited with code"):
        assert secret not in r.text


def test_the_server_details_need_the_admin_scope(client) -> None:
    assert client.get("/v1/admin/backends").status_code == 401
    r = client.get("/v1/admin/backends", headers={"Authorization": "Bearer root"})
    assert r.status_code == 200
    server = r.json()["local"]["server"]
    assert server["pid"] == 4242 and server["log_file"].endswith("vllm-local.log") and server["command"]
    assert server["last_error"].startswith("vLLM exited")
