"""Guardrail policy files: loading, selection per route/workflow/model, inheritance, validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.guardrails.errors import GuardrailPolicyError
from app.guardrails.policy import load_policy, parse_policy
from app.guardrails.settings import GuardrailSettings, StreamingSettings
from app.settings import Settings

DEFAULT = Path(__file__).resolve().parents[2] / "infra" / "guardrails" / "default.yaml"


def _base(**over):
    data = {"version": "1", "policies": {"default": {"input": [{"validator": "keel/pii", "on_fail": "redact"}],
                                                     "output": []}}}
    data.update(over)
    return data


def test_shipped_policy_loads_and_selects():
    p = load_policy(DEFAULT)
    assert p.version == "2026.12.5" and len(p.content_hash) == 64
    assert p.version_tag.startswith("2026.12.5+")
    assert p.select().name == "default"
    assert p.select(workflow="rag").name == "rag"
    assert p.select(route="/v1/agents/run", workflow="rag-agent").name == "rag"
    assert p.select(model="support-bot").name == "support_bot"
    assert p.select(workflow="structured").name == "structured"
    assert p.select(route="/internal/evals/x").name == "unguarded"
    rag = p.select(workflow="rag")
    assert [s.validator for s in rag.input] == [s.validator for s in p.select().input]  # inherited
    assert "keel/groundedness" in [s.validator for s in rag.output]


def test_hash_ignores_formatting_but_not_content():
    a = parse_policy(_base())
    b = parse_policy(yaml.safe_load(yaml.safe_dump(_base(), default_flow_style=True)))
    c = parse_policy(_base(refusal_message="No."))
    assert a.content_hash == b.content_hash != c.content_hash


@pytest.mark.parametrize(("data", "needle"), [
    ({"version": "1", "policies": {"x": {}}}, "default"),
    (_base(policies={"default": {"input": [{"validator": "keel/nope"}]}}), "unknown validator"),
    (_base(policies={"default": {"input": [{"validator": "keel/pii", "on_fail": "reask"}]}}), "cannot on_fail"),
    (_base(policies={"default": {"input": [{"validator": "keel/groundedness"}]}}), "cannot run on input"),
    (_base(policies={"default": {"input": [{"validator": "keel/pii", "threshold": 2}]}}), "less than or equal"),
    (_base(policies={"default": {"input": [{"validator": "keel/pii", "params": {"x": 1}}]}}), "unknown params"),
    (_base(policies={"default": {"input": [{"validator": "keel/pii", "params": {"entities": ["DNA"]}}]}}),
     "unknown entities"),
    (_base(policies={"default": {"input": [{"validator": "keel/pii", "colour": "red"}]}}), "Extra inputs"),
    (_base(policies={"default": {"input": [{"validator": "keel/topic", "params": {"deny": ["ghosts"]}}]}}),
     "unknown topic"),
    (_base(bindings=[{"model": "x", "policy": "missing"}]), "unknown policy"),
    (_base(policies={"default": {"extends": "a"}, "a": {"extends": "default"}}), "cycle"),
    (_base(policies={"default": {"input": [{"validator": "keel/pii", "on_fail": "redact"},
                                           {"validator": "keel/pii", "on_fail": "block"}]}}), "unique"),
    ({"policies": {"default": {}}}, "version"),
])
def test_invalid_policies_raise_clear_errors(data, needle):
    with pytest.raises(GuardrailPolicyError) as e:
        parse_policy(data)
    assert needle in str(e.value)
    assert e.value.code == "guardrail_policy_invalid"


def test_load_errors(tmp_path):
    with pytest.raises(GuardrailPolicyError, match="does not exist"):
        load_policy(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: [1\n")
    with pytest.raises(GuardrailPolicyError, match="not valid YAML"):
        load_policy(bad)
    bad.write_text("- a list\n")
    with pytest.raises(GuardrailPolicyError, match="mapping"):
        load_policy(bad)


def test_yaml_boolean_key_is_caught(tmp_path):
    # 'off:' is a boolean in YAML 1.1: the validator must say so, not crash later
    f = tmp_path / "p.yaml"
    f.write_text("version: '1'\npolicies:\n  default: {}\n  off: {}\n")
    with pytest.raises(GuardrailPolicyError, match="valid string"):
        load_policy(f)


def test_settings_field_and_env(monkeypatch):
    s = Settings()
    assert isinstance(s.guardrails, GuardrailSettings) and s.guardrails.enabled
    monkeypatch.setenv("KEEL_GUARDRAILS__ENABLED", "false")
    monkeypatch.setenv("KEEL_GUARDRAILS__STREAMING__FIRST_WINDOW_MAX_CHARS", "64")
    s = Settings()
    assert not s.guardrails.enabled and s.guardrails.streaming.first_window_max_chars == 64
    with pytest.raises(ValueError):
        StreamingSettings(min_window_chars=500, max_window_chars=100)
