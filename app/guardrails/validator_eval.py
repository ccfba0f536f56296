"""Detection and false-positive rates of the shipped validators, as a policy configures them.

The labelled sets are ``infra/guardrails/data/validator_sets.yaml``: per set, the policy entry it measures, the
texts it must flag and benign texts it must let through (plus the passages or system prompt the entry checks
against). Every text goes through the entry's own guardrails-ai Guard on a warmed-up engine, so thresholds,
entity lists and deny lists are the policy's. ``keel/prompt_injection`` has its own, larger sets
(:mod:`app.guardrails.injection_eval`). Used by tests/unit/test_guardrails_rates.py and bench/guardrails.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from app.guardrails.injection_eval import Rates
from app.guardrails.types import GuardContext
from app.guardrails.validators.injection import SHIPPED_PATTERNS
from app.guardrails.validators.pii import PiiVault

if TYPE_CHECKING:
    from app.guardrails.engine import GuardrailEngine

VALIDATOR_SETS = SHIPPED_PATTERNS.parent / "validator_sets.yaml"


class LabelledSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    validator: str
    policy: str
    stage: str = Field(pattern="^(input|output)$")
    entry: str
    positives: list[str] = Field(min_length=1)
    benign: list[str] = Field(min_length=1)
    passages: list[str] | None = None
    system_prompt: str | None = None


class LabelledSets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int
    sets: list[LabelledSet]


def load_sets(path: Path = VALIDATOR_SETS) -> list[LabelledSet]:
    return LabelledSets.model_validate(yaml.safe_load(path.read_text(encoding="utf-8"))).sets


@dataclass(frozen=True)
class SetRates:
    labelled: LabelledSet
    rates: Rates


def validator_rates(engine: GuardrailEngine, path: Path = VALIDATOR_SETS) -> dict[str, SetRates]:
    """``{validator: SetRates}`` for every set; a text counts as flagged when its entry's verdict is ``fail``."""
    out: dict[str, SetRates] = {}
    for s in load_sets(path):
        comp = next((c for c in engine.compiled(s.policy, s.stage) if c.spec.label == s.entry), None)
        if comp is None:
            raise ValueError(f"policy {s.policy!r} has no {s.stage} entry {s.entry!r} (set for {s.validator})")
        context = GuardContext(system_prompt=s.system_prompt,
                               passages=tuple(s.passages) if s.passages is not None else None)

        def flagged(text: str, comp: Any = comp, context: GuardContext = context) -> bool:
            meta = engine._meta(context, None, PiiVault())
            return engine._run_sync(comp, [text], meta, None).result.verdict == "fail"

        missed = tuple(t for t in s.positives if not flagged(t))
        alarms = tuple(t for t in s.benign if flagged(t))
        out[s.validator] = SetRates(s, Rates(s.validator, 1 - len(missed) / len(s.positives),
                                             len(alarms) / len(s.benign), len(s.positives), len(s.benign),
                                             missed, alarms))
    return out


def table(rates: dict[str, SetRates]) -> str:
    return "\n".join(f"{name:28} [{r.labelled.policy}/{r.labelled.stage}] detection {r.rates.detection_rate:6.1%} "
                     f"of {r.rates.attacks:3}, false positives {r.rates.false_positive_rate:5.1%} of {r.rates.benign:3}"
                     for name, r in rates.items())
