"""Every /v1/prompts route, including 4xx and 409 paths and scope checks."""

from __future__ import annotations

import types

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.api.errors import install_error_handlers
from app.api.routes.prompts import router
from app.core.metrics import Metrics
from app.security.keys import ApiKey
from app.settings import Settings
from prompts.testing import RecordingGate, sqlite_registry
from tests.fakes.auth import FakeKeys, NoLimit

KEYS = {
    "reader": ApiKey(id="r1", name="reader", scopes=frozenset({"prompts:read"}), rate_limit_per_minute=None,
                     created_at=""),
    "writer": ApiKey(id="w1", name="writer", scopes=frozenset({"prompts:write"}), rate_limit_per_minute=None,
                     created_at=""),
    "admin": ApiKey(id="a1", name="root", scopes=frozenset({"admin"}), rate_limit_per_minute=None,
                    created_at=""),
    "chat": ApiKey(id="c1", name="chatter", scopes=frozenset({"chat"}), rate_limit_per_minute=None,
                   created_at=""),
}


@pytest.fixture
def registry(tmp_path):
    reg = sqlite_registry(tmp_path / "p.db")
    yield reg
    reg.close()


@pytest.fixture
def client(registry):
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.keel = types.SimpleNamespace(
        settings=Settings(auth={"enabled": True}), prompts=registry, keys=FakeKeys(KEYS), rate_limiter=NoLimit(),
        metrics=Metrics(),
    )
    with TestClient(app) as c:
        yield c


def h(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {who}"}


GREET = {
    "description": "Greets people",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi {{ who }}"}],
    "params": {"temperature": 0.2, "max_tokens": 50},
    "variables": [{"name": "who", "type": "string", "description": "Whom to greet"}],
}


def _error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["message"], err
    return err


def _create(client, name="greet", content=None):
    r = client.post("/v1/prompts", json={"name": name, "content": content or GREET, "message": "first"},
                    headers=h("writer"))
    assert r.status_code == 201, r.text
    return r.json()


def _edit(client, base: int, text: str, name="greet", who="writer"):
    body = {"content": {**GREET, "messages": [{"role": "user", "content": text}]}, "base_version": base}
    return client.post(f"/v1/prompts/{name}/versions", json=body, headers=h(who))


def test_create_get_list_search(client):
    out = _create(client)
    assert (out["name"], out["version"], out["ref"], out["parent"]) == ("greet", 1, "greet@1", None)
    assert out["author"] == "writer [w1]" and out["hash"].startswith("sha256:")
    assert out["content"]["params"]["temperature"] == 0.2
    _create(client, "summarize", {**GREET, "description": "Summaries"})
    listed = client.get("/v1/prompts", headers=h("reader")).json()
    assert [t["name"] for t in listed["data"]] == ["greet", "summarize"]
    found = client.get("/v1/prompts", params={"q": "summar"}, headers=h("reader")).json()["data"]
    assert [t["name"] for t in found] == ["summarize"]
    t = client.get("/v1/prompts/greet", headers=h("reader")).json()
    assert (t["latest_version"], t["description"], t["labels"]) == (1, "Greets people", {})
    _error(client.get("/v1/prompts/nope", headers=h("reader")), 404, "not_found")
    _error(client.post("/v1/prompts", json={"name": "greet", "content": GREET}, headers=h("writer")),
           409, "version_conflict")


def test_create_validation_errors(client):
    err = _error(client.post("/v1/prompts", json={"name": "../x", "content": GREET}, headers=h("writer")),
                 400, "invalid_request")
    assert "name" in err["message"]
    bad = {**GREET, "messages": [{"role": "user", "content": "{{ undeclared }}"}]}
    err = _error(client.post("/v1/prompts", json={"name": "x", "content": bad}, headers=h("writer")),
                 400, "template_invalid")
    assert "undeclared" in err["message"] and err["param"] == "messages[0].content"
    ssti = {**GREET, "messages": [{"role": "user", "content": "{{ ''.__class__.__mro__ }}"}]}
    err = _error(client.post("/v1/prompts", json={"name": "x", "content": ssti}, headers=h("writer")),
                 400, "template_unsafe")
    assert "__mro__" in err["message"]
    _error(client.post("/v1/prompts", json={"name": "x", "content": {"messages": []}}, headers=h("writer")),
           400, "invalid_request")


def test_versions_and_optimistic_concurrency(client):
    _create(client)
    r = _edit(client, 1, "Hello {{ who }}")
    assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["parent"] == 1
    err = _error(_edit(client, 1, "Yo {{ who }}"), 409, "version_conflict")
    assert "latest is 2" in err["message"] and err["param"] == "base_version"
    _error(_edit(client, 1, "x", name="ghost"), 409, "version_conflict")
    versions = client.get("/v1/prompts/greet/versions", headers=h("reader")).json()["data"]
    assert [v["version"] for v in versions] == [2, 1] and "content" not in versions[0]
    v1 = client.get("/v1/prompts/greet/versions/1", headers=h("reader")).json()
    assert v1["content"]["messages"][1]["content"] == "Hi {{ who }}"
    assert client.get("/v1/prompts/greet/versions/latest", headers=h("reader")).json()["version"] == 2
    _error(client.get("/v1/prompts/greet/versions/9", headers=h("reader")), 404, "not_found")
    _error(client.get("/v1/prompts/greet/versions/production", headers=h("reader")), 404, "not_found")


def test_diff(client):
    _create(client)
    _edit(client, 1, "Hello {{ who }}")
    d = client.get("/v1/prompts/greet/diff", params={"from": "1", "to": "2"}, headers=h("reader")).json()
    assert d["from_ref"] == "greet@1" and d["to_ref"] == "greet@2" and d["changed"] == ["messages"]
    assert "-  content: Hi {{ who }}" in d["diff"] and "+  content: Hello {{ who }}" in d["diff"]
    _error(client.get("/v1/prompts/greet/diff", params={"from": "7"}, headers=h("reader")), 404, "not_found")
    _error(client.get("/v1/prompts/greet/diff", headers=h("reader")), 400, "invalid_request")


def test_render_and_preview(client):
    _create(client)
    client.put("/v1/prompts/greet/labels/production", json={"version": 1}, headers=h("writer"))
    r = client.post("/v1/prompts/greet/render", json={"variables": {"who": "Ann"}}, headers=h("reader"))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["ref"] == "greet@1" and out["messages"][1] == {"role": "user", "content": "Hi Ann"}
    assert out["params"]["max_tokens"] == 50 and out["hash"].startswith("sha256:")
    err = _error(client.post("/v1/prompts/greet/render", json={"variables": {}}, headers=h("reader")),
                 400, "invalid_variable")
    assert "who" in err["message"] and err["param"] == "variables.who"
    _error(client.post("/v1/prompts/greet/render", json={"variables": {"who": 3}}, headers=h("reader")),
           400, "invalid_variable")
    _error(client.post("/v1/prompts/greet/render", json={"ref": "staging", "variables": {"who": "x"}},
                       headers=h("reader")), 404, "not_found")
    draft = {**GREET, "messages": [{"role": "user", "content": "{% for i in range(3) %}{{ who }}{% endfor %}"}]}
    p = client.post("/v1/prompts/preview", json={"content": draft, "variables": {"who": "a"}}, headers=h("reader"))
    assert p.status_code == 200 and p.json()["messages"][0]["content"] == "aaa" and p.json()["version"] is None
    bomb = {**GREET, "messages": [{"role": "user", "content": "{{ 'x' * 10**9 }}"}]}
    _error(client.post("/v1/prompts/preview", json={"content": bomb, "variables": {"who": "a"}},
                       headers=h("reader")), 400, "template_unsafe")


def test_labels_gate_and_override(client, registry):
    _create(client)
    _edit(client, 1, "Hello {{ who }}")
    registry.set_gate(RecordingGate(allow={1}))
    m = client.put("/v1/prompts/greet/labels/production", json={"version": 1}, headers=h("writer")).json()
    assert m["changed"] and m["verdict"]["passed"] and m["from_version"] is None
    err = _error(client.put("/v1/prompts/greet/labels/production", json={"version": 2}, headers=h("writer")),
                 409, "promotion_gate_failed")
    assert "eval score 0.41 < 0.80" in err["message"]
    err = _error(client.put("/v1/prompts/greet/labels/production",
                            json={"version": 2, "override_reason": "ship it"}, headers=h("writer")),
                 403, "insufficient_scope")
    assert "admin" in err["message"]
    m = client.put("/v1/prompts/greet/labels/production", json={"version": 2, "override_reason": "hotfix"},
                   headers=h("admin")).json()
    assert m["overridden"] and m["verdict"]["passed"] is False and m["from_version"] == 1
    assert client.put("/v1/prompts/greet/labels/staging", json={"version": 2},
                      headers=h("writer")).json()["verdict"] is None
    assert client.get("/v1/prompts/greet/labels", headers=h("reader")).json() == {"production": 2, "staging": 2}
    versions = client.get("/v1/prompts/greet/versions", headers=h("reader")).json()["data"]
    assert versions[0]["labels"] == ["production", "staging"]
    history = client.get("/v1/prompts/greet/labels/production/history", headers=h("reader")).json()["data"]
    assert [(e["action"], e["from_version"], e["to_version"], e["actor"], e["reason"]) for e in history] == [
        ("label.override", 1, 2, "root [a1]", "hotfix"), ("label.move", None, 1, "writer [w1]", "")]
    _error(client.put("/v1/prompts/greet/labels/latest", json={"version": 1}, headers=h("writer")),
           400, "invalid_request")
    _error(client.put("/v1/prompts/greet/labels/beta", json={"version": 9}, headers=h("writer")), 404, "not_found")
    _error(client.delete("/v1/prompts/greet/labels/production", headers=h("writer")), 409, "label_protected")
    r = client.delete("/v1/prompts/greet/labels/staging", headers=h("writer"))
    assert r.status_code == 200 and r.json()["to_version"] is None
    _error(client.delete("/v1/prompts/greet/labels/staging", headers=h("writer")), 404, "not_found")


def test_audit_log(client):
    _create(client)
    _edit(client, 1, "Hello {{ who }}")
    client.put("/v1/prompts/greet/labels/production", json={"version": 2}, headers=h("writer"))
    _create(client, "other")
    entries = client.get("/v1/prompts/audit", headers=h("reader")).json()["data"]
    assert [(e["action"], e["name"]) for e in entries] == [
        ("version.create", "other"), ("label.move", "greet"), ("version.create", "greet"),
        ("version.create", "greet")]
    mine = client.get("/v1/prompts/greet/audit", params={"limit": 2}, headers=h("reader")).json()["data"]
    assert [e["action"] for e in mine] == ["label.move", "version.create"]
    older = client.get("/v1/prompts/audit", params={"name": "greet", "before_id": mine[-1]["id"]},
                       headers=h("reader")).json()["data"]
    assert [e["to_version"] for e in older] == [1]
    _error(client.get("/v1/prompts/ghost/audit", headers=h("reader")), 404, "not_found")


def test_the_audit_log_pages_through_versions_and_the_label_moves_of_the_routing_table(client):
    _create(client)
    client.put("/v1/prompts/greet/labels/staging", json={"version": 1}, headers=h("writer"))
    _edit(client, 1, "Hello {{ who }}")
    client.put("/v1/prompts/greet/labels/staging", json={"version": 2}, headers=h("writer"))
    client.delete("/v1/prompts/greet/labels/staging", headers=h("writer"))
    seen, params = [], {"limit": 2}
    while page := client.get("/v1/prompts/greet/audit", params=params, headers=h("reader")).json()["data"]:
        seen += [(e["action"], e["to_version"], e["trail"]) for e in page]
        params = {"limit": 2, "before_id": page[-1]["id"], "before_trail": page[-1]["trail"]}
    assert seen == [("label.remove", None, "routing"), ("label.move", 2, "routing"),
                    ("version.create", 2, "prompts"), ("label.move", 1, "routing"), ("version.create", 1, "prompts")]
    staging = client.get("/v1/prompts/greet/labels/staging/history", headers=h("reader")).json()["data"]
    assert [(e["action"], e["from_version"], e["to_version"]) for e in staging] == [
        ("label.remove", 2, None), ("label.move", 1, 2), ("label.move", None, 1)]
    for trail in ("routing", "prompts"):
        for cursor in (999, 2**63 - 1):
            _error(client.get("/v1/prompts/greet/audit", params={"before_id": cursor, "before_trail": trail},
                              headers=h("reader")), 404, "not_found")


@pytest.mark.parametrize(("method", "path", "body"), [
    ("post", "/v1/prompts", {"name": "x", "content": GREET}),
    ("post", "/v1/prompts/greet/versions", {"content": GREET, "base_version": 1}),
    ("put", "/v1/prompts/greet/labels/production", {"version": 1}),
    ("delete", "/v1/prompts/greet/labels/staging", None),
])
def test_writes_need_write_scope(client, method, path, body):
    _create(client)
    kwargs = {"json": body} if body is not None else {}
    _error(getattr(client, method)(path, headers=h("reader"), **kwargs), 403, "insufficient_scope")


@pytest.mark.parametrize("path", ["/v1/prompts", "/v1/prompts/greet", "/v1/prompts/greet/versions",
                                  "/v1/prompts/audit", "/v1/prompts/greet/labels"])
def test_reads_need_read_scope(client, path):
    _create(client)
    _error(client.get(path, headers=h("chat")), 403, "insufficient_scope")
    _error(client.get(path), 401, "invalid_api_key")
    assert client.get(path, headers=h("writer")).status_code == 200  # write implies read


def test_registry_missing_is_503(tmp_path):
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.keel = types.SimpleNamespace(settings=Settings(auth={"enabled": False}), metrics=Metrics())
    with TestClient(app) as c:
        _error(c.get("/v1/prompts"), 503, "backend_unavailable")
