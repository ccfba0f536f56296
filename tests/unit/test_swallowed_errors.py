"""Errors that Keel handles without failing the request leave a log line and, where the API process
serves /metrics, a metric (issue 14, g)."""

from __future__ import annotations

import logging

from app.core.metrics import Metrics
from app.llm.router import ModelRouter
from app.settings import Settings
from evals.metrics import MetricEnv
from evals.runner import EvalDeps, EvalRunner
from evals.suite import parse_suite
from ingest.embedding import HashingEmbedder


class BrokenPrompts:
    def render(self, ref, variables):
        raise KeyError("who")


def test_a_system_prompt_that_fails_to_render_for_the_metrics_is_logged_and_counted(tmp_path, caplog):
    metrics = Metrics()
    deps = EvalDeps(chat=None, config=Settings(home=tmp_path), metrics=metrics, prompts=BrokenPrompts())
    runner = EvalRunner(deps, store=None, env=MetricEnv(embedder=HashingEmbedder()), progress=False)
    suite = parse_suite({"name": "s", "target": {"prompt": "greeter@1"}, "metrics": [{"name": "must_include"}],
                         "dataset": {"cases": [{"id": "c1", "input": "hi"}]}})
    with caplog.at_level(logging.WARNING, logger="keel.evals"):
        assert runner._system_prompt(suite, suite.cases[0]) is None
        runner._system_prompt(suite, suite.cases[0])
    assert any("rendering greeter@1 for the metrics failed" in r.message for r in caplog.records)
    value = metrics.registry.get_sample_value("keel_eval_swallowed_errors_total", {"where": "render_system_prompt"})
    assert value == 2


class Unready:
    name = "local"

    def __init__(self) -> None:
        self.raises = True

    async def ready(self) -> bool:
        if self.raises:
            raise RuntimeError("socket closed")
        return True


async def test_a_readiness_check_that_raises_is_logged_once_per_outage(tmp_path, caplog):
    settings = Settings(home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://x/v1"}},
                        models={"m": {"backend": "local", "model": "x"}}, default_model="m")
    metrics = Metrics()
    backend = Unready()
    router = ModelRouter(settings, metrics, {"local": backend})
    with caplog.at_level(logging.WARNING, logger="keel.llm"):
        for _ in range(3):
            assert (await router.readiness())["local"]["ready"] is False
        backend.raises = False
        assert (await router.readiness())["local"]["ready"] is True
        backend.raises = True
        await router.readiness()
    logged = [r for r in caplog.records if "readiness check of backend 'local' raised RuntimeError" in r.message]
    assert len(logged) == 2  # one per outage, not one per poll
    assert metrics.registry.get_sample_value("keel_backend_up", {"backend": "local"}) == 0
