"""The adapter promotion gate: real eval-store runs, real MLflow registry versions (SQLite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.core.paths import tree_hash as adapter_hash
from evals.store import EvalStore
from finetune.errors import PromotionRefused
from finetune.gate import adapter_gate
from finetune.jobs import JobStore
from finetune.settings import FinetuneSettings
from finetune.spec import parse_spec
from finetune.tracking import PRODUCTION, AdapterRegistry, Tracker

SPEC = parse_spec("name: gated\ndataset: {path: /x/d.jsonl}\ntraining: {max_steps: 3}\nevals: [fact, smoke]\n")


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    return Tracker(FinetuneSettings(), tmp_path_factory.mktemp("home"))


@pytest.fixture
def evals(tmp_path):
    s = EvalStore(tmp_path / "evals.db")
    yield s
    s.close()


@pytest.fixture
def jobs(tmp_path):
    s = JobStore(tmp_path / "jobs.db", tmp_path / "runs")
    yield s
    s.close()


def register(tracker: Tracker, tmp_path: Path, model: str, *, weights: bytes = b"\1" * 16, with_hash: bool = True):
    run_id = tracker.start_run(job_id="ft-gate", spec=SPEC)
    adapter = tmp_path / f"adapter-{run_id}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    tags = {"keel.evals": ",".join(SPEC.evals), "keel.job_id": "ft-gate"}
    if with_hash:
        tags["keel.adapter_hash"] = adapter_hash(adapter)
    v = tracker.register_adapter(run_id, adapter, model, tags=tags)
    tracker.end_run(run_id, "FINISHED")
    return v


def record(store: EvalStore, suite: str, *, adapter: Path | None, passed: bool, adapter_hash: str | None = None,
           failing: list[str] | None = None) -> str:
    """A completed eval run on ``adapter`` as the runner stores it (identity model.adapter = the folder)."""
    model = {"alias": "m-v1", "backend": "finetune-eval", "name": "smollm2",
             "adapter": str(adapter) if adapter else None, "defaults": {}}
    if adapter_hash:
        model["adapter_hash"] = adapter_hash
    ident = {"kind": "model", "suite": suite, "suite_hash": "s" * 64, "model": model}
    run_id = store.create_run(suite=suite, suite_hash="s" * 64, identity_key=f"{suite}-{adapter}-{passed}",
                              identity=ident, cases_total=1)
    store.finish_run(run_id, passed=passed, summary={"pass_rate": 1.0 if passed else 0.0},
                     verdict={"passed": passed, "failing_metrics": failing or [],
                              "reasons": [] if passed else [f"{m} below its minimum" for m in failing or []]})
    return run_id


def test_refuses_without_a_run(tracker, evals, tmp_path):
    v = register(tracker, tmp_path, "gate-none")
    verdict = adapter_gate(evals)(v)
    assert not verdict.passed
    assert f"no completed eval run of adapter {v.ref}" in verdict.reason
    assert "keel finetune evaluate ft-gate" in verdict.reason


def test_refuses_with_a_failing_run_naming_suite_and_metric(tracker, evals, tmp_path):
    v = register(tracker, tmp_path, "gate-fail")
    record(evals, "smoke", adapter=v.local_path(), passed=True)
    bad = record(evals, "fact", adapter=v.local_path(), passed=False, failing=["says_quorra"])
    verdict = adapter_gate(evals)(v)
    assert not verdict.passed
    assert f"fact ({bad}) failed: says_quorra" in verdict.reason and "smoke" not in verdict.reason
    assert verdict.details["failing_metrics"] == {"fact": ["says_quorra"]}


def test_refuses_runs_of_another_version_and_of_the_base_model(tracker, evals, tmp_path):
    v1 = register(tracker, tmp_path, "gate-other")
    v2 = register(tracker, tmp_path, "gate-other", weights=b"\2" * 16)
    for suite in SPEC.evals:
        record(evals, suite, adapter=v1.local_path(), passed=True)
        record(evals, suite, adapter=None, passed=True)  # the base model, no adapter
    assert adapter_gate(evals)(v1).passed
    verdict = adapter_gate(evals)(v2)
    assert not verdict.passed and "4 run(s) evaluated other content" in verdict.reason


def test_allows_with_passing_latest_runs_of_every_spec_suite(tracker, evals, tmp_path):
    v = register(tracker, tmp_path, "gate-ok")
    record(evals, "fact", adapter=v.local_path(), passed=False, failing=["says_quorra"])
    first = adapter_gate(evals)(v)
    assert not first.passed and "no eval run of adapter" in first.reason and "smoke" in first.reason
    fact = record(evals, "fact", adapter=v.local_path(), passed=True)  # the latest fact run now passes
    smoke = record(evals, "smoke", adapter=v.local_path(), passed=True)
    verdict = adapter_gate(evals)(v)
    assert verdict.passed and fact in verdict.reason and smoke in verdict.reason
    assert verdict.details["runs"] == {"fact": fact, "smoke": smoke}
    # A newer failing run takes it back.
    record(evals, "smoke", adapter=v.local_path(), passed=False, failing=["must_include"])
    assert not adapter_gate(evals)(v).passed


def test_content_hash_wins_over_the_folder_when_both_sides_have_one(tracker, evals, tmp_path):
    v = register(tracker, tmp_path, "gate-hash")
    want = v.tags["keel.adapter_hash"]
    copy = tmp_path / "elsewhere"  # e.g. downloaded from remote artifact storage by the worker
    for suite in SPEC.evals:
        record(evals, suite, adapter=copy, adapter_hash=want, passed=True)
    assert adapter_gate(evals)(v).passed
    # Same folder but other bytes (recorded hash differs): not this adapter.
    other = register(tracker, tmp_path, "gate-hash2", weights=b"\4" * 16)
    for suite in SPEC.evals:
        record(evals, suite, adapter=other.local_path(), adapter_hash="0" * 64, passed=True)
    assert not adapter_gate(evals)(other).passed


def test_explicit_required_suites_override_the_spec(tracker, evals, tmp_path):
    v = register(tracker, tmp_path, "gate-req")
    record(evals, "fact", adapter=v.local_path(), passed=True)
    assert not adapter_gate(evals)(v).passed
    assert adapter_gate(evals, required_suites=["fact"])(v).passed


def test_promotion_through_the_gate_and_an_audited_admin_override(tracker, evals, jobs, tmp_path):
    reg = AdapterRegistry(tracker, gate=adapter_gate(evals), audit=jobs.audit)
    v = register(tracker, tmp_path, "gate-flow")
    with pytest.raises(PromotionRefused) as exc:
        reg.promote("gate-flow", v.version, actor="alice")
    assert exc.value.code == "promotion_gate_failed" and "no completed eval run" in exc.value.message
    assert reg.by_alias("gate-flow", PRODUCTION) is None

    forced = reg.promote("gate-flow", v.version, force=True, reason="incident 42: ship the fix now", actor="admin")
    assert forced.forced and reg.by_alias("gate-flow", PRODUCTION).version == v.version
    entry = jobs.audit_log(model="gate-flow")[0]
    assert entry["action"] == "promote.forced" and entry["reason"] == "incident 42: ship the fix now"
    assert entry["actor"] == "admin" and "no completed eval run" in entry["details"]["verdict"]["reason"]

    v2 = register(tracker, tmp_path, "gate-flow", weights=b"\3" * 16)
    for suite in SPEC.evals:
        record(evals, suite, adapter=v2.local_path(), passed=True)
    p = reg.promote("gate-flow", v2.version, actor="alice")
    assert p.verdict.passed and not p.forced and (p.from_version, p.to_version) == (v.version, v2.version)
    assert jobs.audit_log(model="gate-flow")[0]["action"] == "promote"
