"""A schema-driven fuzz of the whole API (schemathesis): every operation of the published OpenAPI document, with
generated valid and invalid requests, against a real uvicorn server on scripted backends. Fails on any 5xx, any
status the document does not list for the operation, and any response that violates its schema.

Bounded: ``KEEL_FUZZ_EXAMPLES`` examples per operation and mode (default 3, for CI's time; ~45 s)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import schemathesis
from schemathesis import GenerationMode

from tests.cli_server import ApiServer
from tests.fakes.llm import ScriptedBackend
from tests.fuzz import fuzz

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("KEEL_FUZZ_EXAMPLES", "3"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    home: Path = tmp_path_factory.mktemp("fuzz-home")
    api = ApiServer(home, settings={
        "backends": {"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
        "models": {"m": {"backend": "local", "model": "fake-model"}}, "default_model": "m",
        "guardrails": {"enabled": False}, "auth": {"default_rate_limit_per_minute": 1_000_000},
    }, backends={"local": ScriptedBackend()}, keys={"admin": ["admin"]}).start()
    yield api
    api.stop()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_every_operation_answers_as_its_document_says(server: ApiServer, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures = fuzz(schema, server.url, server.h("admin"), mode, examples=EXAMPLES)
    assert not failures, f"{len(failures)} operations:\n" + "\n".join(failures)
