"""Shared pytest fixtures for the guardrail tests (import them into a test module).

Models are process-wide singletons (lru_cache), so every test module that imports these fixtures shares
one loaded embedding model, NER model and classifier.
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from app.guardrails.embeddings import SharedEmbedder
from app.guardrails.engine import GuardrailEngine
from app.guardrails.offline import configure_offline
from app.guardrails.settings import GuardrailSettings
from app.guardrails.validators.injection import AttackIndex
from app.guardrails.validators.injection_model import load_or_train
from app.guardrails.validators.pii import NameDetector
from app.guardrails.validators.toxicity import ProfanityClassifier


def cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "keel-guardrails-test-cache"


def model_cache_dir() -> Path:
    """Where test engines cache trained guardrail models: the machine's cache, as a server with default settings
    uses (``GuardrailSettings.cache_dir``), so the unit tests, the in-process apps and the servers the
    integration tests start train the classifiers once between them."""
    return GuardrailSettings().cache_dir()


@lru_cache(maxsize=1)
def _offline() -> None:
    configure_offline(cache_dir(), write_guardrailsrc=False)


@lru_cache(maxsize=1)
def shared_embedder():
    _offline()
    # The production default: short texts on the int8 ONNX path (the held-out floors are checked on it).
    e = SharedEmbedder(runtime="onnx-int8", cache_dir=model_cache_dir())
    e.warm_up()
    return e


@lru_cache(maxsize=1)
def shared_attack_index():
    return AttackIndex(shared_embedder()).build()


@lru_cache(maxsize=1)
def shared_injection_classifier():
    return load_or_train(shared_embedder(), model_cache_dir())


@lru_cache(maxsize=1)
def shared_names():
    return NameDetector().load()


@lru_cache(maxsize=1)
def shared_profanity():
    return ProfanityClassifier().load()


@pytest.fixture
def embedder():
    return shared_embedder()


@pytest.fixture
def names():
    return shared_names()


@pytest.fixture
def profanity():
    return shared_profanity()


DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "infra" / "guardrails" / "default.yaml"


@pytest.fixture(scope="module")
def default_engine():
    """An engine on the shipped default policy (audit in memory, its own metrics registry), the models shared."""
    e = GuardrailEngine(GuardrailSettings(audit_db=":memory:", policy_path=DEFAULT_POLICY,
                                          model_cache=model_cache_dir()),
                        embedder=shared_embedder(), registry=CollectorRegistry())
    e.warm_up()
    yield e
    e._pool.shutdown(wait=True)
