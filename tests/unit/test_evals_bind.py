"""The prompt promotion gate requires the suites bound to the prompt (gate.bind), run on exactly that
version, as the suite is now in the suites folder (issue 14, a)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.container import Container
from app.settings import load_settings
from evals.metrics import MetricEnv
from evals.runner import EvalRunner
from evals.store import EvalStore
from evals.suite import load_suite, parse_suite
from ingest import build_rag
from ingest.embedding import HashingEmbedder
from prompts.errors import PromotionGateFailed
from prompts.testing import content
from tests.fakes.llm import ScriptedBackend

# A guarding suite evaluates the candidate (latest, or a staging label), not what production serves now.
BOUND = {"name": "greet-quality", "target": {"prompt": "greeter@latest"},
         "dataset": {"cases": [{"id": "g1", "variables": {"who": "Ann"}, "reference": "Hello Ann"}]},
         "metrics": [{"name": "exact_match"}], "gate": {"min_mean": {"exact_match": 1.0}, "bind": ["production"]}}


def lenient(name: str, ref: str) -> dict:
    """A suite anyone could write: it passes whatever the model says."""
    return {"name": name, "target": {"prompt": ref}, "metrics": [{"name": "exact_match"}],
            "dataset": {"cases": [{"id": "g1", "variables": {"who": "Ann"}, "reference": "x"}]},
            "gate": {"min_pass_rate": 0.0}}


@pytest.fixture
async def env(tmp_path: Path):
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "greet-quality.yaml").write_text(yaml.safe_dump(BOUND))
    settings = load_settings(
        home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake"}}, default_model="m", guardrails={"enabled": False},
        evals={"suites_dir": str(suites)},
    )
    fake = ScriptedBackend(reply="Hi there")
    c = await Container.build(settings, backends={"local": fake}, rag=build_rag(settings, embedder=HashingEmbedder()))
    store = EvalStore(settings.evals.db_path(tmp_path))
    yield {"c": c, "fake": fake, "store": store, "suites": suites}
    store.close()
    await c.aclose()


async def run(env, suite) -> None:
    runner = EvalRunner(env["c"].eval_deps(), env["store"], env=MetricEnv(embedder=HashingEmbedder()), progress=False,
                        use_cache=False)
    return (await runner.run(suite)).run


def greeter(reg, name: str = "greeter"):
    return reg.create(name, content(("system", "Be brief."), "Say hi to {{ who }}", variables=[{"name": "who"}]),
                      author="t")


async def test_a_passing_run_of_an_unbound_suite_does_not_unlock_a_guarded_prompt(env) -> None:
    reg = env["c"].prompts
    v1 = greeter(reg)
    assert (await run(env, parse_suite(lenient("lenient", f"greeter@{v1.version}")))).passed
    with pytest.raises(PromotionGateFailed) as info:
        reg.move_label("greeter", "production", v1.version, actor="t")
    assert "no eval run of greeter@1 for suite(s) greet-quality" in info.value.message
    # A weakened copy under the bound suite's name is another suite (its hash): it does not count either.
    assert (await run(env, parse_suite(lenient("greet-quality", f"greeter@{v1.version}")))).passed
    with pytest.raises(PromotionGateFailed) as info:
        reg.move_label("greeter", "production", v1.version, actor="t")
    assert "another version of a bound suite (greet-quality)" in info.value.message
    # The bound suite itself, failing, then passing.
    bound = load_suite(env["suites"] / "greet-quality.yaml")
    assert (await run(env, bound)).passed is False
    with pytest.raises(PromotionGateFailed, match=r"greet-quality \(run-.*\) failed: exact_match"):
        reg.move_label("greeter", "production", v1.version, actor="t")
    env["fake"].reply = "Hello Ann"
    ok = await run(env, bound)
    assert ok.passed
    move = reg.move_label("greeter", "production", v1.version, actor="t")
    assert move.changed and ok.id in move.verdict.reason
    assert move.verdict.details["bound_suites"] == ["greet-quality"]


async def test_explicit_binding_by_prompt_name_and_an_unreadable_suite_fail_closed(env) -> None:
    reg = env["c"].prompts
    v1 = greeter(reg, "welcomer")
    (env["suites"] / "guard.yaml").write_text(yaml.safe_dump({**lenient("guard", "other"), "gate": {
        "min_pass_rate": 1.0, "bind": ["welcomer@production"]}}))
    assert (await run(env, parse_suite(lenient("lenient", f"welcomer@{v1.version}")))).passed
    with pytest.raises(PromotionGateFailed, match="for suite\\(s\\) guard"):
        reg.move_label("welcomer", "production", v1.version, actor="t")
    (env["suites"] / "broken.yaml").write_text("gate: {bind: [production]\n")
    with pytest.raises(PromotionGateFailed,
                       match=r"cannot tell which suites guard welcomer: suite file .*broken\.yaml cannot be read"):
        reg.move_label("welcomer", "production", v1.version, actor="t")


async def test_with_no_bound_suite_any_passing_run_counts_and_the_reason_says_why(env) -> None:
    reg = env["c"].prompts
    v1 = greeter(reg, "solo")
    with pytest.raises(PromotionGateFailed, match="no completed eval run"):
        reg.move_label("solo", "production", v1.version, actor="t")
    run_ = await run(env, parse_suite(lenient("lenient", f"solo@{v1.version}")))
    move = reg.move_label("solo", "production", v1.version, actor="t")
    assert move.changed and run_.id in move.verdict.reason
    assert "no suite in" in move.verdict.reason and "guards solo (gate.bind)" in move.verdict.reason
