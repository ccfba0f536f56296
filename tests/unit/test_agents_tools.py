"""Tool argument validation: JSON Schema by jsonschema, checked at registration, compiled once per tool."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from agents import tools as tools_mod
from agents.errors import ToolInputError
from agents.tools import FunctionTool, ToolContext, ToolRegistry, builtin_tools, compile_schema, execute, validate_args

NESTED = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "minItems": 1, "items": {
            "type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]+$"},
                                             "n": {"type": "integer", "minimum": 0}},
            "required": ["name"], "additionalProperties": False}},
        "mode": {"enum": ["fast", "slow"]},
    },
    "required": ["items"],
    "additionalProperties": False,
}


def tool(name: str, schema: dict[str, Any]) -> FunctionTool:
    return FunctionTool(name, "test tool", schema, lambda args, ctx: "ran")


def problem(schema: dict[str, Any], args: Any) -> str:
    with pytest.raises(ToolInputError) as e:
        validate_args(schema, args)
    assert e.value.code == "tool_input_invalid"
    return str(e.value)


@pytest.mark.parametrize(("args", "message"), [
    ({}, "missing argument(s): expression"),
    ({"expression": 5}, "argument 'expression' must be string, got integer"),
    ({"expression": "1" * 201}, "argument 'expression' is longer than 200 characters"),
    ({"expression": "1", "zz": 1, "aa": 2}, "unknown argument(s): aa, zz"),
    ([1, 2], "arguments must be a JSON object, got array"),
])
def test_builtin_schema_messages_say_what_to_fix(args: Any, message: str) -> None:
    calc = next(t for t in builtin_tools() if t.name == "calculator")
    assert problem(calc.input_schema, args) == message


def test_booleans_are_not_integers_and_enums_list_the_choices() -> None:
    retrieve = next(t for t in builtin_tools() if t.name == "retrieve")
    assert problem(retrieve.input_schema, {"query": "q", "top_k": True}) == (
        "argument 'top_k' must be integer, got boolean")
    assert problem(NESTED, {"items": [{"name": "a"}], "mode": "medium"}) == (
        "argument 'mode' must be one of ['fast', 'slow']")
    assert validate_args(retrieve.input_schema, {"query": "q", "top_k": 3}) == {"query": "q", "top_k": 3}


def test_every_problem_is_reported_with_its_path() -> None:
    msg = problem(NESTED, {"items": [{"name": "A1", "n": -1, "extra": 1}, {}], "mode": "x", "other": 0})
    for part in ("argument 'items[1]' is missing key(s): name", "argument 'items[0]' has unknown key(s): extra",
                 "unknown argument(s): other", "argument 'items[0].name' must match the pattern '^[a-z]+$'",
                 "argument 'items[0].n' must be >= 0, got -1"):
        assert part in msg, msg
    assert problem(NESTED, {"items": []}) == "argument 'items' must have at least 1 item(s)"


def test_a_bad_schema_fails_at_registration() -> None:
    reg = ToolRegistry()
    with pytest.raises(ValueError, match=r"tool 'broken' has an invalid input_schema: at properties/q/type: 'strng'"):
        reg.register(tool("broken", {"type": "object", "properties": {"q": {"type": "strng"}}}))
    with pytest.raises(ValueError, match="maxLength"):
        reg.register(tool("neg", {"type": "object", "properties": {"q": {"type": "string", "maxLength": -1}}}))
    with pytest.raises(ValueError, match="unknown JSON Schema dialect"):
        reg.register(tool("dialect", {"$schema": "https://example.com/my-schema", "type": "object"}))
    with pytest.raises(ValueError, match="must be a JSON object"):
        reg.register(tool("none", None))  # type: ignore[arg-type]
    assert reg.names() == []


def test_the_declared_dialect_is_used() -> None:
    assert type(compile_schema({"type": "object"})).__name__ == "Draft202012Validator"
    draft7 = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
              "properties": {"n": {"type": "number", "exclusiveMinimum": 0}}}
    assert type(compile_schema(draft7)).__name__ == "Draft7Validator"
    assert problem(draft7, {"n": 0}) == "argument 'n' must be > 0, got 0"


async def test_validators_are_compiled_once_per_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[Any] = []
    real = tools_mod.compile_schema
    monkeypatch.setattr(tools_mod, "compile_schema", lambda schema: compiled.append(schema) or real(schema))
    reg = ToolRegistry(builtin_tools())
    assert len(compiled) == len(reg.names())
    ctx = ToolContext(run_id="r")
    for _ in range(3):
        assert (await execute(reg, "calculator", {"expression": "6*7"}, ctx)).data == 42
        bad = await execute(reg, "calculator", {"expression": 7}, ctx)
        assert not bad.ok and bad.error_code == "tool_input_invalid" and bad.attempts == 0
        assert bad.output == "error: argument 'expression' must be string, got integer"
    assert len(compiled) == len(reg.names())
    reg.register(tool("calculator", {"type": "object", "properties": {}}), replace=True)  # recompiled
    assert len(compiled) == len(reg.names()) + 1
    assert (await execute(reg, "calculator", {"anything": 1}, ctx)).ok


async def test_a_schema_that_cannot_be_applied_is_an_observation_not_a_crash() -> None:
    reg = ToolRegistry([tool("dangling", {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}})])
    obs = await execute(reg, "dangling", {"a": 1}, ToolContext(run_id="r"))
    assert not obs.ok and obs.error_code == "tool_error" and "cannot check the arguments of dangling" in obs.output


def test_importing_the_tools_does_not_import_jsonschema() -> None:
    """jsonschema's import takes over a second: only a process that registers a tool pays it."""
    code = "import sys, agents.tools; assert 'jsonschema' not in sys.modules, 'jsonschema imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
