"""The shipped default guardrail policy, built as the API builds it, for tests that run a request through it."""

from __future__ import annotations

import pytest

from app.container import build_guards
from app.core.metrics import Metrics
from app.guardrails.engine import GuardrailEngine
from app.guardrails.testing import _offline, model_cache_dir, shared_embedder
from app.settings import load_settings


def default_guards(tmp_path_factory: pytest.TempPathFactory) -> GuardrailEngine:
    """Warmed up on the test process's shared embedder; the trained injection classifier is shared with the
    other guardrail test modules through the model cache (trained once per data hash)."""
    _offline()
    guards = build_guards(load_settings(home=tmp_path_factory.mktemp("guard-home")), Metrics())
    guards._embedder = shared_embedder()
    guards.settings = guards.settings.model_copy(update={"model_cache": model_cache_dir()})
    guards.warm_up()  # infra/guardrails/default.yaml
    return guards
