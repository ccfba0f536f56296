"""Shared pytest fixtures for the guardrail tests (import them into a test module).

Models are process-wide singletons (lru_cache), so every test module that imports these fixtures shares
one loaded embedding model, NER model and classifier.
"""

from __future__ import annotations

from functools import lru_cache

import pytest


@lru_cache(maxsize=1)
def _offline() -> None:
    import tempfile
    from pathlib import Path

    from app.guardrails.offline import configure_offline

    configure_offline(Path(tempfile.gettempdir()) / "keel-guardrails-test-cache", write_guardrailsrc=False)


@lru_cache(maxsize=1)
def shared_embedder():
    from app.guardrails.embeddings import SharedEmbedder

    _offline()
    e = SharedEmbedder()
    e.warm_up()
    return e


@lru_cache(maxsize=1)
def shared_names():
    from app.guardrails.validators.pii import NameDetector

    return NameDetector().load()


@lru_cache(maxsize=1)
def shared_profanity():
    from app.guardrails.validators.toxicity import ProfanityClassifier

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
