"""MLflow tracking and the adapter registry: runs, versions, aliases, the gate, force and rollback."""

from __future__ import annotations

import json

import pytest

from app.core.errors import Conflict, InvalidRequest
from finetune.errors import AdapterNotFound, PromotionRefused
from finetune.jobs import JobStore
from finetune.settings import FinetuneSettings
from finetune.spec import parse_spec
from finetune.tracking import CANDIDATE, PRODUCTION, AdapterRegistry, Tracker
from prompts.registry import GateVerdict

SPEC = parse_spec("name: demo\ndataset: {path: /x/d.jsonl}\ntraining: {max_steps: 3}\ntags: {team: a}\n")


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    return Tracker(FinetuneSettings(), home)


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.db", tmp_path / "runs")
    yield s
    s.close()


def new_version(tracker: Tracker, tmp_path, model: str):
    run_id = tracker.start_run(job_id="ft-test", spec=SPEC)
    for step, loss in enumerate([2.0, 1.5, 1.0], start=1):
        tracker.log_metrics(run_id, step, {"loss": loss})
    tracker.log_data(run_id, {"data_hash": "d" * 64, "train_examples": 3, "validation_examples": 1})
    adapter = tmp_path / f"adapter-{run_id}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    v = tracker.register_adapter(run_id, adapter, model, tags={"keel.spec_hash": SPEC.spec_hash()})
    tracker.end_run(run_id, "FINISHED")
    return run_id, v


def test_run_has_params_metrics_data_hash_and_adapter(tracker, tmp_path):
    run_id, v = new_version(tracker, tmp_path, "runs-model")
    run = tracker.client.get_run(run_id)
    assert run.data.params["spec_hash"] == SPEC.spec_hash()
    assert run.data.params["training.max_steps"] == "3" and run.data.params["lora.r"] == "8"
    assert run.data.params["data_hash"] == "d" * 64 and run.data.tags["keel.data_hash"] == "d" * 64
    assert run.data.tags["spec.team"] == "a" and run.info.status == "FINISHED"
    history = tracker.client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5), (3, 1.0)]
    artifacts = {a.path for a in tracker.client.list_artifacts(run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= artifacts
    assert v.version == "1" and CANDIDATE in v.aliases and v.run_id == run_id
    assert (v.local_path() / "adapter_config.json").is_file()


def test_resumed_job_keeps_its_run(tracker):
    run_id = tracker.start_run(job_id="ft-x", spec=SPEC)
    tracker.end_run(run_id, "KILLED")
    assert tracker.start_run(job_id="ft-x", spec=SPEC, existing_run_id=run_id) == run_id
    assert tracker.client.get_run(run_id).info.status == "RUNNING"


def test_default_gate_refuses_and_force_needs_a_reason(tracker, store, tmp_path):
    reg = AdapterRegistry(tracker, audit=store.audit)
    _, v = new_version(tracker, tmp_path, "gated")
    with pytest.raises(PromotionRefused) as exc:
        reg.promote("gated", v.version, actor="me")
    assert exc.value.code == "promotion_gate_failed" and "no eval gate configured" in exc.value.message
    assert reg.by_alias("gated", PRODUCTION) is None
    with pytest.raises(InvalidRequest, match="reason"):
        reg.promote("gated", v.version, force=True, reason="  ", actor="me")
    p = reg.promote("gated", v.version, force=True, reason="hotfix, evals tomorrow", actor="me")
    assert p.forced and p.to_version == v.version and p.from_version is None
    assert reg.by_alias("gated", PRODUCTION).version == v.version
    tag = json.loads(reg.get_version("gated", v.version).tags["keel.promotion.production"])
    assert tag["forced"] and tag["reason"] == "hotfix, evals tomorrow" and tag["actor"] == "me"
    entry = store.audit_log(model="gated")[0]
    assert entry["action"] == "promote.forced" and entry["reason"] == "hotfix, evals tomorrow"


def test_gate_pass_promotes_and_rollback_moves_the_alias_back(tracker, store, tmp_path):
    seen = []

    def gate(version):
        seen.append(version.ref)
        return GateVerdict(passed=True, reason="suite passed", details={"score": 0.9})

    reg = AdapterRegistry(tracker, gate=gate, audit=store.audit)
    _, v1 = new_version(tracker, tmp_path, "flow")
    _, v2 = new_version(tracker, tmp_path, "flow")
    assert reg.promote("flow", v1.version, actor="a").to_version == "1"
    p = reg.promote("flow", v2.version, actor="a")
    assert (p.from_version, p.to_version, p.forced) == ("1", "2", False)
    assert seen == ["flow/1", "flow/2"]
    assert not reg.promote("flow", v2.version, actor="a").changed  # already there: no gate call
    assert len(seen) == 2
    back = reg.rollback("flow", actor="a", reason="regression")
    assert (back.from_version, back.to_version) == ("2", "1")
    assert reg.by_alias("flow", PRODUCTION).version == "1"
    with pytest.raises(Conflict, match="no earlier production"):
        reg.rollback("flow", actor="a")
    assert [e["action"] for e in store.audit_log(model="flow")] == ["rollback", "promote", "promote"]
    assert [v.version for v in reg.versions("flow")] == ["1", "2"]


@pytest.mark.parametrize("gate", [
    lambda v: GateVerdict(passed=False, reason="accuracy 0.2 < 0.8"),
    lambda v: 1 / 0,
    lambda v: True,
])
def test_refusing_or_broken_gates_fail_closed(tracker, tmp_path, gate):
    reg = AdapterRegistry(tracker, gate=gate)
    model = f"closed-{abs(hash(gate)) % 10_000}"
    _, v = new_version(tracker, tmp_path, model)
    with pytest.raises(PromotionRefused):
        reg.promote(model, v.version)


def test_unknown_version_is_404(tracker):
    with pytest.raises(AdapterNotFound):
        AdapterRegistry(tracker).promote("nope", 7)
