"""The schema-driven fuzz shared by the in-process and the real-server tests (schemathesis): every operation of a
published OpenAPI document, generated requests each, checked for 5xx, undocumented statuses, wrong content types
and responses that violate their schema."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis import checks as st_checks

CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance, st_checks.content_type_conformance,
          st_checks.response_schema_conformance]


def fuzz(schema: Any, base_url: str, headers: dict[str, str], mode: GenerationMode, *, examples: int,
         prepare: Callable[[Any], None] | None = None, timeout: float = 30) -> list[str]:
    """Every operation, ``examples`` generated requests each; the failures, one line per operation.

    ``prepare(case)`` may adjust a generated case before it is sent (e.g. bound what a real model generates)."""
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()

        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate])
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            if prepare is not None:
                prepare(case)
            case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=timeout)

        try:
            run()
        except Unsatisfiable:
            continue  # nothing in this operation can be made invalid (no parameters, no body)
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis' failure groups: a line per operation
            failures.append(f"{op.label} ({mode.value}): {_summary(exc)}")
    return failures


def _summary(exc: BaseException) -> str:
    """The failure's kind and what was received, from schemathesis' report."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    picked = [line for line in lines if line.startswith(("- ", "Received", "Documented", "[", "`"))]
    return " | ".join(picked[:6])[:500] or type(exc).__name__
