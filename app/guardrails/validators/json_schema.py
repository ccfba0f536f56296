"""JSON-schema validity for structured outputs (code fences around the JSON are tolerated and stripped)."""

from __future__ import annotations

import json
import re
from typing import Any

from app.guardrails.validators.base import CheckResult, Finding

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def check_json_schema(text: str, schema: dict[str, Any] | None) -> CheckResult:
    import jsonschema

    raw = text
    m = _FENCE.match(text)
    if m:
        raw = m.group(1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        return CheckResult(False, 1.0, f"the output is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                           (Finding("invalid_json", detail=e.msg),))
    if schema:
        validator = jsonschema.Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
        if errors:
            findings = tuple(Finding("schema_error", text="/".join(map(str, e.path)), detail=e.message)
                             for e in errors[:10])
            first = errors[0]
            where = "/".join(map(str, first.path)) or "(root)"
            return CheckResult(False, 1.0, f"the output does not match the schema at {where}: {first.message}",
                               findings)
    fixed = json.dumps(value, ensure_ascii=False) if m else None
    return CheckResult(True, 0.0, fixed=fixed)
