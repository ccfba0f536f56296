"""The research workflow's prompts come from the prompt registry (starter templates), with a built-in
copy when the registry lacks them: editing a template changes what the agents send."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.testing import ScriptedLLM
from agents.tools import ToolRegistry, builtin_tools
from agents.workflows import research
from agents.workflows.common import Deps
from app.settings import Settings
from prompts.factory import build_registry
from prompts.models import TemplateContent

STATE = {"question": "What is 6 times 7, and where is Keel's config?",
         "trace": [{"worker": "researcher", "summary": "2 new passages (2 total)"}],
         "sources": [{"chunk_id": "c1", "text": "Keel reads keel.yaml from KEEL_CONFIG.", "title": "Config"}],
         "draft": "Keel reads keel.yaml [1]."}


@pytest.fixture
def registry(tmp_path: Path):
    reg = build_registry(Settings(home=tmp_path / "seeded"))
    yield reg
    reg.close()


@pytest.fixture
def empty_registry(tmp_path: Path):
    reg = build_registry(Settings(home=tmp_path / "empty", prompts={"seed_library": False}))
    yield reg
    reg.close()


def deps_with(prompts, *answers) -> tuple[Deps, ScriptedLLM]:
    llm = ScriptedLLM(list(answers))
    return Deps(llm=llm, tools=ToolRegistry(builtin_tools()), prompts=prompts), llm


async def test_supervisor_uses_the_registry_template_with_all_four_workers(registry) -> None:
    deps, llm = deps_with(registry, {"next": "analyst", "reason": "needs arithmetic"})
    out = await research.supervisor(STATE, deps, lambda _e: None)
    assert out["next"] == "analyst"
    (system, user), schema = llm.calls[0][0][:2], llm.calls[0][1]
    template = registry.resolve("supervisor-route@production")
    assert template.version >= 2 and system.content == template.content.messages[0].content
    for worker in ("researcher", "analyst", "writer", "critic"):
        assert f"- {worker}:" in system.content
    assert "1. researcher: 2 new passages (2 total)" in user.content and STATE["question"] in user.content
    assert set(schema["properties"]["next"]["enum"]) == {"researcher", "analyst", "writer", "critic", "FINISH"}


async def test_an_edited_template_changes_what_the_critic_sends(registry) -> None:
    v = registry.resolve("research-critic@production")
    content = v.content.model_dump()
    content["messages"][0]["content"] = "BE VERY STRICT. " + content["messages"][0]["content"]
    new = registry.save("research-critic", TemplateContent.model_validate(content), author="t", message="stricter",
                        base_version=v.version)
    registry.move_label("research-critic", "production", new.version, actor="t")
    deps, llm = deps_with(registry, {"accepted": True, "feedback": "supported"})
    out = await research.critic(STATE, deps, lambda _e: None)
    assert out["critique"]["accepted"] is True
    system, user = llm.calls[0][0][:2]
    assert system.content.startswith("BE VERY STRICT.")
    assert "[1] Keel reads keel.yaml from KEEL_CONFIG." in user.content and "Draft: Keel reads" in user.content


async def test_analyst_lists_the_tools_through_its_template(registry) -> None:
    deps, llm = deps_with(registry, {"tool": "calculator", "args": {"expression": "6*7"}})
    out = await research.analyst(STATE, deps, lambda _e: None)
    assert out["pending_call"]["tool"] == "calculator"
    system = llm.calls[0][0][0].content
    assert system == registry.render("analyst-tool-choice@production", {
        "task": STATE["question"],
        "tools": [{"name": s["name"], "description": s["description"],
                   "args": list(s["input_schema"].get("properties", {}))}
                  for s in deps.tools.specs(research.analyst_tools(deps))]}).messages[0].content
    assert "- calculator:" in system


async def test_missing_templates_fall_back_to_the_built_in_prompts(empty_registry) -> None:
    deps, llm = deps_with(empty_registry, {"next": "researcher", "reason": "facts needed"},
                          {"accepted": False, "feedback": "unsupported"})
    assert (await research.supervisor(STATE, deps, lambda _e: None))["next"] == "researcher"
    assert (await research.critic(STATE, deps, lambda _e: None))["critique"]["accepted"] is False
    assert llm.calls[0][0][0].content.startswith("You supervise workers")
    assert llm.calls[1][0][0].content.startswith("You are a strict critic")
