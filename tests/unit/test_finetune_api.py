"""Every /v1/finetune route: submit (valid, bad spec, bad data), list, get, logs, cancel, scopes."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.api.errors import install_error_handlers
from app.api.routes.finetune import router
from app.core.metrics import Metrics
from app.security.keys import ApiKey
from app.settings import Settings
from finetune import build_finetune
from tests.fakes.auth import FakeKeys, NoLimit

MODEL = Path(__file__).resolve().parents[2] / ".keel" / "models" / "smollm2"
pytestmark = pytest.mark.skipif(not (MODEL / "tokenizer.json").is_file(), reason="SmolLM2 not prepared")

KEYS = {
    "ft": ApiKey(id="f1", name="tuner", scopes=frozenset({"finetune"}), rate_limit_per_minute=None, created_at=""),
    "chat": ApiKey(id="c1", name="chatter", scopes=frozenset({"chat"}), rate_limit_per_minute=None, created_at=""),
}


def h(who: str = "ft") -> dict[str, str]:
    return {"Authorization": f"Bearer {who}"}


@pytest.fixture
def home(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smollm2").symlink_to(MODEL)
    rows = [{"messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": f"a{i}."}]}
            for i in range(10)]
    (tmp_path / "datasets").mkdir()  # where fine-tuning may read a home's data by default
    (tmp_path / "datasets" / "good.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "datasets" / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]) + "\n{oops\n")
    return tmp_path


@pytest.fixture
def client(home):
    settings = Settings(home=home, auth={"enabled": True})
    svc = build_finetune(settings)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.keel = types.SimpleNamespace(settings=settings, finetune=svc, keys=FakeKeys(KEYS),
                                           rate_limiter=NoLimit(), metrics=Metrics())
    with TestClient(app) as c:
        yield c
    svc.close()


def spec(home: Path, data: str = "good.jsonl") -> dict:
    return {"name": "demo", "dataset": {"path": str(home / "datasets" / data), "validation_split": 0.2},
            "training": {"max_steps": 2, "max_length": 64}}


def test_submit_get_list_logs_cancel(client, home):
    r = client.post("/v1/finetune/jobs", json={"spec": spec(home)}, headers=h())
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "queued" and job["submitted_by"] == "tuner [f1]"
    assert job["data_report"]["train_examples"] == 8 and job["data_report"]["validation_examples"] == 2
    assert "max_steps: 2" in job["spec_yaml"] and len(job["spec_hash"]) == 64
    jid = job["id"]

    listed = client.get("/v1/finetune/jobs", headers=h()).json()
    assert [j["id"] for j in listed["data"]] == [jid]
    assert listed["data"][0]["data_report"] is None  # the list stays small; GET /jobs/{id} has the report
    assert client.get("/v1/finetune/jobs?state=running", headers=h()).json()["data"] == []
    assert client.get(f"/v1/finetune/jobs/{jid}", headers=h()).json()["id"] == jid

    logs = client.get(f"/v1/finetune/jobs/{jid}/logs", headers=h()).json()
    assert "queued by tuner" in logs["text"] and logs["next_offset"] > 0
    again = client.get(f"/v1/finetune/jobs/{jid}/logs?offset={logs['next_offset']}", headers=h()).json()
    assert again["text"] == ""

    r = client.post(f"/v1/finetune/jobs/{jid}/cancel", headers=h())
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    r = client.post(f"/v1/finetune/jobs/{jid}/cancel", headers=h())
    assert r.status_code == 409 and r.json()["error"]["code"] == "finetune_job_state"


def test_a_submitted_job_is_on_the_job_queue_and_a_cancel_reaches_it(client, home):
    from finetune.dispatch import TRAIN

    svc = client.app.state.keel.finetune
    jid = client.post("/v1/finetune/jobs", json={"spec": spec(home)}, headers=h()).json()["id"]
    [task] = svc.queue.list(kinds=[TRAIN])
    assert task.payload == {"job_id": jid} and task.state == "queued" and task.max_attempts == svc.fs.max_attempts
    assert client.post(f"/v1/finetune/jobs/{jid}/cancel", headers=h()).json()["state"] == "cancelled"
    assert svc.queue.get(task.id).state == "cancelled"  # no worker will claim it
    assert [e.action for e in svc.queue.history(task.id)] == ["job.cancel"]


def test_submit_yaml_text(client, home):
    import yaml

    r = client.post("/v1/finetune/jobs", json={"spec_yaml": yaml.safe_dump(spec(home))}, headers=h())
    assert r.status_code == 201, r.text


def test_bad_data_is_refused_with_reasons(client, home):
    r = client.post("/v1/finetune/jobs", json={"spec": spec(home, "bad.jsonl")}, headers=h())
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_training_data"
    assert "duplicate" in err["message"] and "invalid_json" in err["message"]
    assert client.get("/v1/finetune/jobs", headers=h()).json()["data"] == []


def test_bad_spec_is_refused(client, home):
    bad = {**spec(home), "lora": {"rank": 4}}
    r = client.post("/v1/finetune/jobs", json={"spec": bad}, headers=h())
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_job_spec"
    assert "lora.rank" in r.json()["error"]["message"]
    r = client.post("/v1/finetune/jobs", json={}, headers=h())
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    r = client.post("/v1/finetune/jobs", json={"spec": {**spec(home), "base_model": "nope"}}, headers=h())
    assert r.status_code == 400 and "not a model folder" in r.json()["error"]["message"]


def test_unknown_job_is_404(client):
    for method, path in [("get", "/v1/finetune/jobs/ft-x"), ("get", "/v1/finetune/jobs/ft-x/logs"),
                         ("post", "/v1/finetune/jobs/ft-x/cancel")]:
        r = getattr(client, method)(path, headers=h())
        assert r.status_code == 404 and r.json()["error"]["code"] == "finetune_job_not_found"


def test_scope_is_required(client, home):
    assert client.get("/v1/finetune/jobs", headers=h("chat")).status_code == 403
    assert client.get("/v1/finetune/jobs").status_code == 401
    assert client.post("/v1/finetune/jobs", json={"spec": spec(home)}, headers=h("chat")).status_code == 403


def test_not_configured_is_503(home):
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.keel = types.SimpleNamespace(settings=Settings(home=home, auth={"enabled": False}),
                                           keys=FakeKeys(KEYS), rate_limiter=NoLimit(), metrics=Metrics())
    with TestClient(app) as c:
        assert c.get("/v1/finetune/jobs").status_code == 503


def register_fake_versions(svc, tmp: Path, n: int) -> None:
    from finetune.spec import parse_spec

    spec = parse_spec("name: api-model\ndataset: {path: /x.jsonl}\n")
    for i in range(n):
        run_id = svc.tracker.start_run(job_id=f"ft-{i}", spec=spec)
        adapter = tmp / f"adapter{i}"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        svc.tracker.register_adapter(run_id, adapter, "api-model")


def test_versions_promote_rollback_and_deploy(client, home):
    from prompts.registry import GateVerdict

    svc = client.app.state.keel.finetune
    settings = client.app.state.keel.settings
    settings.backends["tf"] = settings.backends["local"].model_copy(
        update={"kind": "transformers", "managed": None, "model_path": MODEL})
    register_fake_versions(svc, home, 2)
    r = client.get("/v1/finetune/models/api-model/versions", headers=h())
    assert [(v["version"], v["aliases"]) for v in r.json()["data"]] == [("1", []), ("2", ["candidate"])]

    r = client.post("/v1/finetune/models/api-model/promote", json={"version": "1"}, headers=h())
    assert r.status_code == 409 and r.json()["error"]["code"] == "promotion_gate_failed"
    r = client.post("/v1/finetune/models/api-model/promote", json={"version": "1", "force": True,
                                                                   "reason": "x"}, headers=h())
    assert r.status_code == 403  # forcing needs admin

    svc.set_gate(lambda v: GateVerdict(passed=True, reason="ok"))
    r = client.post("/v1/finetune/models/api-model/promote", json={"version": "1"}, headers=h())
    assert r.status_code == 200 and r.json()["to_version"] == "1" and r.json()["verdict"]["passed"]
    r = client.post("/v1/finetune/models/api-model/promote",
                    json={"version": "2", "deploy_alias": "api-tuned", "backend": "tf"}, headers=h())
    body = r.json()
    assert r.status_code == 200, body
    assert (body["from_version"], body["to_version"], body["served_name"]) == ("1", "2", "api-model-v2")
    routes = svc.routes
    assert routes.get("api-tuned").backend == "tf" and routes.get("api-tuned").adapter.name == "adapter"
    assert "api-tuned" not in settings.models  # routed, not written into the settings

    r = client.post("/v1/finetune/models/api-model/rollback", json={"reason": "bad", "deploy_alias": "api-tuned",
                                                                    "backend": "tf"}, headers=h())
    assert r.status_code == 200 and r.json()["to_version"] == "1" and r.json()["served_name"] == "api-model-v1"
    assert [(d["alias"], d["version"], d["backend"]) for d in svc.store.deployments()] == [("api-tuned", "1", "tf")]
    routes.remove("api-tuned", owner="finetune:api-model", actor="t")  # e.g. a route lost with its database
    import asyncio

    assert asyncio.run(svc.restore_deployments()) == ["api-tuned"]
    assert routes.get("api-tuned").adapter == svc.registry.get_version("api-model", "1").local_path()
    r = client.post("/v1/finetune/models/api-model/rollback", json={}, headers=h())
    assert r.status_code == 409 and r.json()["error"]["code"] == "nothing_to_rollback"
    r = client.post("/v1/finetune/models/nope/promote", json={"version": "1"}, headers=h())
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"


def test_allowed_data_dirs(client, home, tmp_path_factory):
    svc = client.app.state.keel.finetune
    svc.fs.allowed_data_dirs = [home / "datasets" / "vetted"]
    r = client.post("/v1/finetune/jobs", json={"spec": spec(home)}, headers=h())
    assert r.status_code == 400 and "outside the allowed data folders" in r.json()["error"]["message"]
    (home / "datasets" / "vetted").mkdir()
    (home / "datasets" / "good.jsonl").rename(home / "datasets" / "vetted" / "good.jsonl")
    r = client.post("/v1/finetune/jobs", json={"spec": spec(home, "vetted/good.jsonl")}, headers=h())
    assert r.status_code == 201, r.text


def test_evaluate_route_and_eval_fields(client, home):
    job = client.post("/v1/finetune/jobs", json={"spec": spec(home)}, headers=h()).json()
    assert job["evals_state"] is None and job["evals"] is None
    r = client.post(f"/v1/finetune/jobs/{job['id']}/evaluate", headers=h())
    assert r.status_code == 400 and "names no eval suites" in r.json()["error"]["message"]
    r = client.post(f"/v1/finetune/jobs/{job['id']}/evaluate", json={"suites": ["smoke-general"]}, headers=h())
    assert r.status_code == 409, r.text  # only a succeeded job has an adapter to evaluate
    r = client.post(f"/v1/finetune/jobs/{job['id']}/evaluate", json={"suites": []}, headers=h())
    assert r.status_code == 400
    assert client.post("/v1/finetune/jobs/ft-missing/evaluate", headers=h()).status_code == 404


def test_data_and_base_model_stay_in_the_allowed_roots_by_default(client, home, tmp_path_factory):
    from finetune.spec import load_spec

    svc = client.app.state.keel.finetune
    outside = tmp_path_factory.mktemp("outside")
    (outside / "good.jsonl").write_text((home / "datasets" / "good.jsonl").read_text())
    (home / "keel.db").write_text((home / "datasets" / "good.jsonl").read_text())  # any file of the home itself
    (outside / "model").mkdir()
    (outside / "model" / "config.json").write_text("{}")
    for body, field in (({**spec(home), "dataset": {"path": str(outside / "good.jsonl")}}, "dataset.path"),
                        ({**spec(home), "dataset": {"path": str(home / "datasets/../../" / outside.name /
                                                                "good.jsonl")}}, "dataset.path"),
                        ({**spec(home), "dataset": {"path": str(home / "keel.db")}}, "dataset.path"),
                        ({**spec(home), "dataset": {"path": str(home / "datasets" / "good.jsonl"),
                                                    "validation_path": str(outside / "good.jsonl")}},
                         "dataset.validation_path"),
                        ({**spec(home), "base_model": str(outside / "model")}, "base_model")):
        r = client.post("/v1/finetune/jobs", json={"spec": body, "validate_data": False}, headers=h())
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_job_spec" and err["param"] == field
        assert "finetune.allowed_roots" in err["message"] and "outside the folders" in err["message"]
    # The defaults keep the shipped job (finetune/jobs), a home's prepared model (<home>/models) and its
    # datasets/ working, and nothing else of the home (key files, databases).
    shipped = load_spec(Path(__file__).resolve().parents[2] / "finetune" / "jobs" / "veltmar-fact.yaml")
    svc.check_data_location(shipped)
    assert client.post("/v1/finetune/jobs", json={"spec": spec(home)}, headers=h()).status_code == 201
    svc.fs.allowed_roots = [outside]
    body = {**spec(home), "dataset": {"path": str(outside / "good.jsonl")}, "base_model": str(outside / "model")}
    assert client.post("/v1/finetune/jobs", json={"spec": body, "validate_data": False}, headers=h()).status_code == 201


def test_a_deploy_cannot_take_over_a_configured_or_foreign_alias(client, home):
    from prompts.registry import GateVerdict

    svc = client.app.state.keel.finetune
    settings = client.app.state.keel.settings
    settings.backends["tf"] = settings.backends["local"].model_copy(
        update={"kind": "transformers", "managed": None, "model_path": MODEL})
    register_fake_versions(svc, home, 2)
    svc.set_gate(lambda v: GateVerdict(passed=True, reason="ok"))
    default = settings.models["smollm2"]
    r = client.post("/v1/finetune/models/api-model/promote",
                    json={"version": "1", "deploy_alias": "smollm2", "backend": "tf"}, headers=h())
    assert r.status_code == 409 and r.json()["error"]["code"] == "alias_not_owned"
    assert "configured in the settings" in r.json()["error"]["message"]
    assert settings.models["smollm2"] is default  # the default model still answers as before
    assert svc.registry.by_alias("api-model", "production") is None  # and the label did not move either
    # An alias another model's deploy created.
    routes = svc.routes
    routes.set("theirs", default.model_copy(), owner="finetune:other-model", actor="t")
    svc.store.save_deployment(alias="theirs", model="other-model", version="1", backend="tf", served_name="o-v1",
                              adapter_path="/a")
    r = client.post("/v1/finetune/models/api-model/promote",
                    json={"version": "1", "deploy_alias": "theirs", "backend": "tf"}, headers=h())
    assert r.status_code == 409 and "serves the adapters of 'other-model'" in r.json()["error"]["message"]
    # A new alias, then moving the alias this model's deploy created, both work.
    for version in ("1", "2"):
        r = client.post("/v1/finetune/models/api-model/promote",
                        json={"version": version, "deploy_alias": "mine", "backend": "tf"}, headers=h())
        assert r.status_code == 200, r.text
    assert routes.get("mine").adapter == svc.registry.get_version("api-model", "2").local_path()
    r = client.post("/v1/finetune/models/api-model/rollback", json={"deploy_alias": "smollm2", "backend": "tf"},
                    headers=h())
    assert r.status_code == 409 and settings.models["smollm2"] is default
