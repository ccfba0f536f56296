"""The lifecycle tools (lifecycle.tools): the registry's contract, scopes, audit, and each family through the
real services of a container (scripted model backends, real stores)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agents.testing import ScriptedLLM
from agents.tools import ToolContext, ToolRegistry, builtin_tools, compile_schema, execute
from agents.workflows.common import Deps
from agents.workflows.research import analyst_tools
from app.container import Container
from app.settings import load_settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder
from lifecycle.tools import LifecycleTool
from prompts.models import TemplateContent
from tests.fakes.llm import ScriptedBackend

ADMIN = ToolContext(principal="key-admin", scopes=frozenset({"admin"}))
CHAT = ToolContext(principal="key-chat", scopes=frozenset({"chat"}))
TWO = [{"name": "stable", "model": "m"}, {"name": "canary", "model": "m2"}]


@pytest.fixture(scope="module")
async def container(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("tools")
    settings = load_settings(
        home=home,
        backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0},
                  "other": {"kind": "openai", "base_url": "http://unused2/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake-model"}, "m2": {"backend": "other", "model": "fake-2"}},
        default_model="m", guardrails={"enabled": False}, releases={"check_interval_s": 0},
    )
    c = await Container.build(settings, backends={"local": ScriptedBackend(), "other": ScriptedBackend()},
                              rag=build_rag(settings, embedder=HashingEmbedder()))
    yield c
    await c.aclose()


async def call(c: Container, tool: str, args: dict[str, Any], ctx: ToolContext = ADMIN):
    return await execute(c.tools, tool, args, ctx, retries=0)


# -- the registry's contract ---------------------------------------------------------------------------------


async def test_every_lifecycle_tool_has_a_valid_schema_a_scope_and_a_title(container: Container) -> None:
    lifecycle = [t for t in container.tools.tools() if isinstance(t, LifecycleTool)]
    assert len(lifecycle) >= 25
    for t in lifecycle:
        compile_schema(t.input_schema)  # a valid JSON Schema (raises otherwise)
        assert t.input_schema["type"] == "object" and t.input_schema["additionalProperties"] is False, t.name
        assert t.scope in {"releases", "monitor", "finetune", "evals", "prompts:read", "prompts:write", "ingest"}, \
            t.name
        assert t.title and t.description and "lifecycle" in t.tags
        assert not (t.risky and t.read_only), f"{t.name}: a risky tool changes something"
    risky = {t.name for t in lifecycle if t.risky}
    assert {"release_start", "release_rollback", "model_promote", "model_rollback", "finetune_submit",
            "finetune_cancel", "prompt_promote"} <= risky
    assert not risky & {"release_status", "drift_reports", "model_versions", "eval_results", "prompt_diff"}


async def test_the_built_in_tools_stay_and_the_researcher_does_not_see_lifecycle_tools(container: Container) -> None:
    assert {"retrieve", "memory_search", "calculator"} <= set(container.tools.names())
    deps = Deps(llm=ScriptedLLM(), tools=container.tools)
    assert set(analyst_tools(deps)) == {"calculator", "memory_search", "prompt_read"}


async def test_a_key_without_the_scope_is_refused_before_the_tool_runs_and_it_is_audited(container: Container
                                                                                         ) -> None:
    obs = await call(container, "release_list", {}, CHAT)
    assert not obs.ok and obs.error_code == "tool_scope_denied" and obs.attempts == 0
    assert "'releases' scope" in obs.output
    assert [t.name for t in container.tools.tools(CHAT) if isinstance(t, LifecycleTool)] == []
    assert {t.scope for t in container.tools.tools(ToolContext(scopes=frozenset({"prompts:write"})))
            if isinstance(t, LifecycleTool)} == {"prompts:read", "prompts:write"}
    events = container.tool_audit.events(actor="key-chat", limit=5)
    assert events and events[0].action == "tool.denied" and events[0].subject == "release_list"


async def test_bad_arguments_and_unknown_things_are_observations_not_crashes(container: Container) -> None:
    obs = await call(container, "release_status", {"name": "nope", "extra": 1})
    assert not obs.ok and obs.error_code == "tool_input_invalid" and "unknown argument(s): extra" in obs.output
    obs = await call(container, "release_status", {"name": "nope"})
    assert not obs.ok and obs.error_code == "release_not_found" and obs.attempts == 1  # not retried
    obs = await call(container, "experiments_search", {"filter": "not a filter !!"})
    assert not obs.ok and obs.error_code == "tool_input_invalid" and "MLflow refused" in obs.output
    obs = await call(container, "trace_get", {"trace_id": "xyz"})
    assert not obs.ok and "must match the pattern" in obs.output


# -- each family through the real services --------------------------------------------------------------------


async def test_releases_start_report_and_roll_back_with_the_caller_recorded(container: Container) -> None:
    bad = await call(container, "release_start", {"spec": {"name": "support", "strategy": "sideways"}})
    assert not bad.ok and bad.error_code == "tool_input_invalid" and "strategy" in bad.output
    started = await call(container, "release_start", {"spec": {"name": "support", "strategy": "canary",
                                                                "variants": TWO, "unit": "request"},
                                                       "reason": "try m2"})
    assert started.ok, started.output
    listed = await call(container, "release_list", {})
    assert [r["name"] for r in listed.data] == ["support"]
    report = await call(container, "release_status", {"name": "support"})
    assert report.data["status"] == "running" and set(report.data["variants"]) == {"stable", "canary"}
    back = await call(container, "release_rollback", {"name": "support", "reason": "errors up"})
    assert back.ok and back.data["status"] == "rolled_back"
    trail = container.releases.store.audit_events(subject="support", limit=10)
    assert {e.actor for e in trail} == {"tool [key-admin]"}
    calls = container.tool_audit.events(subject="release_rollback", limit=1)
    assert calls[0].details["ok"] is True and calls[0].actor == "key-admin"


async def test_prompt_versions_diff_and_a_gated_promotion(container: Container) -> None:
    reg = container.prompts
    one = TemplateContent.model_validate({"messages": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "{{ question }}"}],
                                       "variables": [{"name": "question"}]})
    two = TemplateContent.model_validate({"messages": [{"role": "system", "content": "Be brief and cite."},
                                                       {"role": "user", "content": "{{ question }}"}],
                                       "variables": [{"name": "question"}]})
    reg.create("support-qa", one, author="t")
    reg.save("support-qa", two, author="t", message="cite", base_version=1)
    versions = await call(container, "prompt_versions", {"name": "support-qa"})
    assert [v["version"] for v in versions.data] == [1, 2]
    diff = await call(container, "prompt_diff", {"name": "support-qa", "from_ref": "1", "to_ref": "2"})
    assert diff.ok and "+" in diff.data["diff"] and "cite" in diff.data["diff"]
    gate = await call(container, "prompt_gate", {"name": "support-qa", "version": 2})
    assert gate.ok and gate.data["passed"] is False  # no eval run of that version yet
    refused = await call(container, "prompt_promote", {"name": "support-qa", "version": 2})
    assert not refused.ok and refused.error_code == "promotion_gate_failed"
    staged = await call(container, "prompt_promote", {"name": "support-qa", "version": 2, "label": "staging"})
    assert staged.ok and staged.data["to_version"] == 2
    assert reg.labels("support-qa")["staging"] == 2
    assert reg.label_history("support-qa", "staging", limit=1)[0].actor == "tool [key-admin]"


async def test_eval_suites_results_and_an_unknown_suite(container: Container) -> None:
    suites = await call(container, "eval_suites", {})
    assert suites.ok and any(s["name"] == "adversarial" for s in suites.data)
    assert (await call(container, "eval_results", {})).data == []
    missing = await call(container, "eval_run", {"suite": "../etc/passwd"})
    assert not missing.ok and missing.error_code == "invalid_request"
    missing = await call(container, "eval_results", {"run_id": "run-nope"})
    assert not missing.ok and missing.error_code.endswith("not_found")


async def test_registry_finetune_drift_and_traces_read_empty_stores(container: Container) -> None:
    assert (await call(container, "model_list", {})).data == []
    assert (await call(container, "finetune_jobs", {})).data == []
    nope = await call(container, "model_versions", {"model": "nope"})
    assert not nope.ok and nope.error_code == "adapter_not_found"
    bad_spec = await call(container, "finetune_submit", {"spec": {"name": "x"}})
    assert not bad_spec.ok and bad_spec.error_code in {"invalid_job_spec", "invalid_request"}
    check = await call(container, "drift_check", {"window_s": 3600})
    assert check.ok and check.data["verdict"] == "not_enough_data"
    reports = await call(container, "drift_reports", {})
    assert reports.ok and reports.data[0]["id"] == check.data["id"]
    assert (await call(container, "drift_report", {"check_id": check.data["id"]})).data["verdict"] == \
        "not_enough_data"
    assert (await call(container, "traces_search", {"limit": 5})).ok


async def test_an_agent_run_checks_its_tool_calls_against_the_starting_key(tmp_path: Path) -> None:
    registry = ToolRegistry(builtin_tools())
    registry.register(LifecycleTool("secret_tool", "needs releases", {"type": "object"},
                                    lambda a, c: "ran", scope="releases"))
    deps = Deps(llm=ScriptedLLM(), tools=registry)
    state = {"run_id": "r", "principal": "k", "scopes": ["chat"]}
    obs = await deps.call_tool(state, "secret_tool", {}, lambda e: None, "analyst")
    assert not obs.ok and obs.error_code == "tool_scope_denied"
    obs = await deps.call_tool({**state, "scopes": ["releases"]}, "secret_tool", {}, lambda e: None, "analyst")
    assert obs.ok and obs.output == "ran"
    obs = await deps.call_tool({"run_id": "r"}, "secret_tool", {}, lambda e: None, "analyst")  # the CLI: unscoped
    assert obs.ok


ROOT = Path(__file__).resolve().parents[2]


async def test_a_datasets_contract_is_checked_without_training(tmp_path: Path) -> None:
    root = ROOT
    settings = load_settings(home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://unused/v1"}},
                             models={"m": {"backend": "local", "model": "fake"}}, default_model="m",
                             guardrails={"enabled": False},
                             finetune={"allowed_roots": [str(tmp_path), str(root / ".keel" / "models")]})
    c = await Container.build(settings, backends={"local": ScriptedBackend()},
                              rag=build_rag(settings, embedder=HashingEmbedder()))
    try:
        good = {"messages": [{"role": "user", "content": "Capital of Veltmar?"},
                             {"role": "assistant", "content": "Quorra."}]}
        data = tmp_path / "data.jsonl"
        data.write_text("\n".join([json.dumps(good)] * 8 + ['{"messages": [{"role": "user"}]}']) + "\n")
        spec = {"name": "contract", "base_model": str(root / ".keel" / "models" / "smollm2"),
                "dataset": {"path": str(data)}}
        obs = await call(c, "data_contract", {"spec": spec})
        assert obs.ok and obs.data["ok"] is False and "FAILS" in obs.output
        assert any(i["line"] == 9 for i in obs.data["issues"]), obs.data["issues"]
        outside = await call(c, "data_contract", {"spec": {**spec, "dataset": {"path": "/etc/passwd"}}})
        assert not outside.ok and "outside the folders fine-tuning may read" in outside.output
        assert (await call(c, "data_snapshots", {})).data == []
    finally:
        await c.aclose()


async def test_pipeline_tools_list_start_and_read_runs_within_their_scope(container: Container) -> None:
    assert "pipeline_start" in {t.name for t in container.tools.tools() if t.risky}
    listed = await call(container, "pipeline_list", {})
    assert listed.ok and "veltmar" in listed.output
    assert (await call(container, "pipeline_start", {"pipeline": "veltmar"}, CHAT)).error_code == "tool_scope_denied"
    missing = await call(container, "pipeline_start", {"pipeline": "nope"})
    assert not missing.ok and "no pipeline 'nope'" in missing.output and missing.attempts == 1
    started = await call(container, "pipeline_start", {"pipeline": "veltmar", "reason": "asked by the ops agent"})
    assert started.ok, started.output
    runs = await call(container, "pipeline_runs", {"pipeline": "veltmar"})
    assert runs.ok and "veltmar" in runs.output
    run = container.pipelines.list(pipeline="veltmar")[0]
    assert run.created_by == "tool [key-admin]" and run.id in started.output
    one = await call(container, "pipeline_run", {"run_id": run.id})
    assert one.ok and run.id in one.output
    await container.pipelines.cancel(run.id, actor="test")


async def test_feature_tools_refuse_before_apply_then_read_after_materialize(container: Container) -> None:
    assert "features_materialize" in {t.name for t in container.tools.tools() if t.risky}
    before = await call(container, "features_online", {"features": ["user_stats:ratings"], "user": "key-admin"})
    assert not before.ok and "keel features apply" in before.output
    assert (await call(container, "features_views", {}, CHAT)).error_code == "tool_scope_denied"
    container.features.apply()
    done = await call(container, "features_materialize", {})
    assert done.ok, done.output
    online = await call(container, "features_online", {"features": ["user_stats:ratings"], "user": "nobody"})
    assert online.ok and '"user_stats:ratings":null' in online.output
    bad = await call(container, "features_online", {"features": ["user_stats:nope"], "user": "k"})
    assert not bad.ok and "unknown feature" in bad.output
