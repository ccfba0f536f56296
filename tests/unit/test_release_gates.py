"""A canary starts only once what its variant changes passed its eval gates: a document collection, an agent
workflow and a guardrail policy as well as a prompt version (test_releases covers the prompt), each matched by
what the eval runs recorded of it as it is now."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from app.services.chat import ChatRequest, ChatResult
from evals.gate import policy_gate, rag_gate, workflow_fingerprint, workflow_gate
from evals.runner import EvalConfigError, EvalDeps, EvalRunner
from evals.store import EvalStore
from evals.suite import parse_suite
from lifecycle.releases.serving import variant_gate
from lifecycle.releases.spec import VariantSpec
from tests.unit.test_releases import auth, create, env  # noqa: F401 - env is the fixture these tests use

AGENT = {"workflow": "rag-qa", "description": "d", "model": "m", "settings": {"max_steps": 6}, "prompt": None,
         "rag": {"collection": "docs", "snapshot": "snap-1", "embedding_model": "e"}}


@pytest.fixture
def store(tmp_path: Path):
    s = EvalStore(tmp_path / "evals.db")
    yield s
    s.close()


def record(store: EvalStore, suite: str, identity: dict, *, passed: bool) -> str:
    """A completed run as the runner stores it (only the identity parts a gate reads)."""
    identity.setdefault("kind", "model")
    run_id = store.create_run(suite=suite, suite_hash="h", identity_key=f"{suite}-{len(store.list_runs())}",
                              identity=identity, cases_total=1)
    store.finish_run(run_id, passed=passed, summary={}, verdict={"failing_metrics": [] if passed else ["m"]})
    return run_id


def test_a_collection_passes_on_a_run_of_its_current_documents(store) -> None:
    newest = {"docs": ("snap-2", "completed")}
    gate = rag_gate(store, newest.get)
    v = gate("docs")
    assert not v.passed and "rag:docs" in v.reason
    record(store, "facts", {"kind": "rag", "rag": {"collection": "docs", "snapshot": "snap-1"}}, passed=True)
    record(store, "facts", {"kind": "rag", "rag": {"collection": "other", "snapshot": "snap-2"}}, passed=True)
    v = gate("docs")
    assert not v.passed and "1 run(s) evaluated other content" in v.reason  # the documents changed since
    run = record(store, "facts", {"kind": "rag", "rag": {"collection": "docs", "snapshot": "snap-2"}}, passed=True)
    assert gate("docs").passed and run in gate("docs").reason
    newest["docs"] = ("snap-3", "running")  # an ingest in progress has already changed some documents
    assert not gate("docs").passed and "snap-3) is running" in gate("docs").reason
    newest["docs"] = ("snap-3", "failed")  # and a failed one may have changed some
    assert not gate("docs").passed and "ingest again" in gate("docs").reason
    newest["docs"] = ("snap-2", "completed")
    record(store, "facts", {"kind": "rag", "rag": {"collection": "docs", "snapshot": "snap-2"}}, passed=False)
    assert not gate("docs").passed  # the latest run of a suite decides
    del newest["docs"]
    assert not gate("docs").passed and "no ingest snapshot" in gate("docs").reason

def test_a_workflow_passes_on_a_run_of_its_current_settings_model_and_prompt(store) -> None:
    now = {"rag-qa": workflow_fingerprint(AGENT)}
    gate = workflow_gate(store, now.__getitem__)
    assert not gate("rag-qa").passed and "agent:rag-qa" in gate("rag-qa").reason
    record(store, "agent-smoke", {"kind": "agent", "agent": {**AGENT, "settings": {"max_steps": 2}}}, passed=True)
    assert not gate("rag-qa").passed  # a run under other settings is another workflow
    # a re-ingest (another snapshot) is not the workflow's change
    record(store, "agent-smoke", {"kind": "agent", "agent": {**AGENT, "rag": {"snapshot": "snap-9"}}}, passed=True)
    assert gate("rag-qa").passed
    assert not workflow_gate(store, lambda w: workflow_fingerprint({**AGENT, "workflow": w}))("research").passed


def test_a_policy_passes_on_a_run_checked_under_it_in_the_file_as_loaded(store) -> None:
    gate = policy_gate(store, "2026.12.2+abc")
    assert not gate("strict").passed and "policy: strict" in gate("strict").reason
    record(store, "smoke", {"guardrails": "2026.12.2+abc"}, passed=True)  # the bound policy, not 'strict'
    record(store, "smoke", {"guardrails": "2026.12.1+old", "policy": "strict"}, passed=True)
    assert not gate("strict").passed  # checked under another version of the policy file
    record(store, "smoke", {"kind": "rag", "guardrails": "2026.12.2+abc", "policy": "strict"}, passed=True)
    assert gate("strict").passed


def test_every_artifact_the_candidate_names_is_gated() -> None:
    """Also what the baseline shares: a new endpoint's baseline serves nobody yet, so sharing proves nothing."""
    asked: list[str] = []

    def refuse(what: str):
        return lambda name: asked.append(f"{what}:{name}") or _verdict(False, f"{what} {name} failed")

    gate = variant_gate(_NoPrompts(), rag=refuse("rag"), workflow=refuse("workflow"), policy=refuse("policy"))
    assert gate(VariantSpec(name="canary", model="m2")) is None  # a base model alias: nothing to gate
    passed, reason = gate(VariantSpec(name="canary", rag="docs", policy="strict"))
    assert not passed and reason == "rag docs failed; policy strict failed" and asked == ["rag:docs", "policy:strict"]
    passed, reason = gate(VariantSpec(name="canary", workflow="research"))
    assert not passed and reason == "workflow research failed"
    ok = variant_gate(_NoPrompts(), rag=refuse("rag"), policy=lambda name: _verdict(True, f"{name} passed"))
    assert ok(VariantSpec(name="canary", policy="lenient")) == (True, "lenient passed")
    passed, reason = ok(VariantSpec(name="canary", rag="docs", policy="lenient"))
    assert not passed and reason == "rag docs failed"  # the failures, not the passes, say why


class _NoPrompts:
    prompts = None


def _verdict(passed: bool, reason: str):
    from prompts.registry import GateVerdict

    return GateVerdict(passed=passed, reason=reason)


class _Chat:
    def __init__(self) -> None:
        self.requests: list[ChatRequest] = []

    async def complete(self, request: ChatRequest) -> ChatResult:
        self.requests.append(request)
        return ChatResult(id="c", created=0, model="m", texts={0: ["Paris."]}, finish={0: "stop"}, usage=None)


async def test_a_suite_can_check_answers_under_a_named_policy(tmp_path: Path, store) -> None:
    from app.settings import load_settings

    settings = load_settings(home=tmp_path, models={"m": {"backend": "local", "model": "x"}}, default_model="m",
                             backends={"local": {"kind": "openai", "base_url": "http://unused/v1"}})
    def parsed(**target):
        return parse_suite({"name": "strict-smoke", "target": {"model": "m", **target},
                            "metrics": [{"name": "must_include"}], "dataset": {"cases": [
                                {"id": "c1", "input": "Capital of France?", "must_include": ["Paris"]}]}})

    suite = parsed(policy="strict")
    chat = _Chat()
    deps = EvalDeps(chat=chat, config=settings, guardrails="2026.12.2+abc", policies=("default", "strict"))
    outcome = await EvalRunner(deps, store, progress=False).run(suite)
    assert outcome.run.passed and outcome.run.identity["policy"] == "strict"
    assert [r.policy for r in chat.requests] == ["strict"]
    assert policy_gate(store, "2026.12.2+abc")("strict").passed
    with pytest.raises(EvalConfigError, match=r"no guardrail policy 'lenient'.*default, strict"):
        EvalRunner(deps, store).identity(parsed(policy="lenient"))
    unguarded = EvalDeps(chat=chat, config=settings)
    with pytest.raises(EvalConfigError, match="guardrails are off"):
        EvalRunner(unguarded, store).identity(suite)
    # a suite without the field keeps the identity every older run has (no 'policy' key at all)
    assert "policy" not in EvalRunner(deps, store).identity(parsed())


def test_a_suite_without_a_policy_keeps_the_hash_it_had_before_the_field() -> None:
    """Runs name their suite by hash (resumption, the prompt gate's bound suites): a new optional field must not
    change it, or every earlier run of every suite would stop counting."""
    case = {"id": "c1", "input": "Capital of France?", "must_include": ["Paris"]}
    suite = parse_suite({"name": "pinned", "target": {"model": "m", "params": {"max_tokens": 8}},
                         "metrics": [{"name": "must_include"}], "dataset": {"cases": [case]}})
    assert suite.hash == "3c23192c43ecec4ee481c0f253e54bfa4266ba4883f32d40f6b0f3c8f20537ed"  # as at e42e34d


# -- through the API: a grounded canary waits for a run on its documents ------------------------------------


async def _ingest(env, name: str, text: str) -> None:  # noqa: F811 - env is the imported fixture
    r = await env["client"].post("/v1/ingest", files=[("files", (name, text.encode(), "text/plain"))],
                                 data={"collection": "docs"}, headers=auth(env, "admin"))
    job = (await env["client"].get(f"/v1/ingest/jobs/{r.json()['id']}?wait_s=30", headers=auth(env, "admin"))).json()
    assert job["state"] == "succeeded", job


async def _run_suite(env, name: str) -> dict:  # noqa: F811
    before = len((await env["client"].get(f"/v1/evals/runs?suite={name}", headers=auth(env, "admin"))).json())
    r = await env["client"].post("/v1/evals/runs", json={"suite": name}, headers=auth(env, "admin"))
    assert r.status_code == 202, r.text
    for _ in range(500):
        runs = (await env["client"].get(f"/v1/evals/runs?suite={name}", headers=auth(env, "admin"))).json()
        if len(runs) > before and runs[0]["status"] == "completed":
            return runs[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"the run of {name} did not complete: {runs}")


async def test_a_canary_of_a_collection_starts_once_a_suite_passed_on_its_documents(env, tmp_path: Path) -> None:  # noqa: F811
    await _ingest(env, "lighthouse.md", "# Lighthouses\n\nThe Eddystone lighthouse was completed in 1882.\n")
    body = {"name": "support", "strategy": "canary",
            "variants": [{"name": "stable", "model": "m"}, {"name": "canary", "model": "m", "rag": "docs"}]}
    r = await create(env, body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "gate_failed", r.text
    assert "collection 'docs'" in r.json()["error"]["message"] and "rag:docs" in r.json()["error"]["message"]
    suites = tmp_path / "suites"
    suites.mkdir()
    for name, phrase in (("docs-bad", "Eiffel"), ("docs-good", "answer")):
        (suites / f"{name}.yaml").write_text(yaml.safe_dump({
            "name": name, "target": {"model": "rag:docs"}, "metrics": [{"name": "must_include"}],
            "dataset": {"cases": [{"id": "c1", "input": "When was the Eddystone lighthouse completed?",
                                   "must_include": [phrase]}]}}))
    env["container"].settings.evals.suites_dir = suites
    assert (await _run_suite(env, "docs-bad"))["passed"] is False  # the scripted model never says "Eiffel"
    r = await create(env, body)
    assert r.status_code == 400 and "docs-bad" in r.json()["error"]["message"], r.text
    good = await _run_suite(env, "docs-good")
    assert good["passed"] is True and good["identity"]["rag"]["snapshot"]
    # the failed suite still counts against the documents it ran on: a run of every suite that ran must pass
    r = await create(env, body)
    assert r.status_code == 400 and "docs-bad" in r.json()["error"]["message"], r.text
    await _ingest(env, "harbour.md", "# Harbours\n\nPlymouth Sound is a bay on the English Channel.\n")
    r = await create(env, body)
    assert r.status_code == 400 and "evaluated other content" in r.json()["error"]["message"], r.text
    good = await _run_suite(env, "docs-good")  # on the documents as they are now; docs-bad ran on older ones
    r = await create(env, body)
    assert r.status_code == 201, r.text
    assert f"gate: passing eval run(s): docs-good {good['id']}" in r.json()["decision"]["reason"]
    releases = env["container"].releases
    assert releases.gate(VariantSpec(name="b", model="m2", rag="docs"))[0]  # another model on the same documents
    passed, reason = releases.gate(VariantSpec(name="b", workflow="rag-qa"))
    assert not passed and "workflow 'rag-qa'" in reason and "agent:rag-qa" in reason


def test_the_prefilter_finds_names_json_escapes_and_like_would_widen(store) -> None:
    """The gates read runs through a LIKE on the stored identity: a name with a non-ASCII letter (JSON escapes it),
    an underscore or a percent sign (LIKE's wildcards) is found exactly."""
    for name in ("sécurité", "strict_v2", "100%", "strictxv2"):
        record(store, "smoke", {"guardrails": "t", "policy": name}, passed=True)
    for name in ("sécurité", "strict_v2", "100%"):
        assert [r.identity["policy"] for r in store.completed_runs(contains=("policy", name))] == [name]
        assert policy_gate(store, "t")(name).passed
