"""A schema-driven fuzz of the whole API (schemathesis): every operation of the published OpenAPI document, with
generated valid and invalid requests, against a real uvicorn server on scripted backends. Fails on any 5xx, any
status the document does not list for the operation, and any response that violates its schema.

Bounded: ``KEEL_FUZZ_EXAMPLES`` examples per operation and mode (default 3, for CI's time; ~45 s)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis import checks as st_checks

from tests.cli_server import ApiServer
from tests.fakes.llm import ScriptedBackend

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("KEEL_FUZZ_EXAMPLES", "3"))
CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance, st_checks.content_type_conformance,
          st_checks.response_schema_conformance]


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


def _fuzz(schema, base_url: str, headers: dict[str, str], mode: GenerationMode) -> list[str]:
    """Every operation, ``EXAMPLES`` generated requests each; the failures, one line per operation."""
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate])
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case) -> None:
            case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=30)

        try:
            run()
        except Unsatisfiable:
            continue  # nothing in this operation can be made invalid (no parameters, no body)
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis' failure groups: a line per operation
            failures.append(f"{op.label} ({mode.value}): {_summary(exc)}")
    return failures


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_every_operation_answers_as_its_document_says(server: ApiServer, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures = _fuzz(schema, server.url, server.h("admin"), mode)
    assert not failures, f"{len(failures)} operations:\n" + "\n".join(failures)


def _summary(exc: BaseException) -> str:
    """The failure's kind and what was received, from schemathesis' report."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    picked = [line for line in lines if line.startswith(("- ", "Received", "Documented", "[", "`"))]
    return " | ".join(picked[:6])[:500] or type(exc).__name__
