"""Detection and false-positive rates of keel/prompt_injection on Keel's labelled sets (tests and benchmark).

Splits, and what each number means:

* ``tuning``, ``holdout``, ``fresh`` (``infra/guardrails/data/eval_set.yaml``): the heuristics were tuned on
  them, and the classifier *trains* on them, so their rates only show that nothing regressed.
* ``heldout`` (``tests/data/guardrails/injection_heldout.yaml``): never used for training or tuning; the
  honest estimate of how detection generalises. Missing from an installed package without tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from app.guardrails.validators.injection import SHIPPED_PATTERNS, AttackIndex, detect_injection
from app.guardrails.validators.injection_model import InjectionClassifier

EVAL_SET = SHIPPED_PATTERNS.parent / "eval_set.yaml"
HELDOUT_SET = SHIPPED_PATTERNS.parents[3] / "tests" / "data" / "guardrails" / "injection_heldout.yaml"


@dataclass(frozen=True)
class Rates:
    split: str
    detection_rate: float
    false_positive_rate: float
    attacks: int
    benign: int
    missed: tuple[str, ...] = ()
    false_alarms: tuple[str, ...] = ()


def eval_sets(include_heldout: bool = True) -> dict[str, tuple[list[str], list[str]]]:
    data = yaml.safe_load(EVAL_SET.read_text(encoding="utf-8"))
    sets = {(prefix.rstrip("_") or "tuning"): (data[f"{prefix}attacks"], data[f"{prefix}benign"])
            for prefix in ("", "holdout_", "fresh_")}
    if include_heldout and HELDOUT_SET.exists():
        held = yaml.safe_load(HELDOUT_SET.read_text(encoding="utf-8"))
        sets["heldout"] = (held["attacks"], held["benign"])
    return sets


def injection_rates(index: AttackIndex | None, classifier: InjectionClassifier | None = None, *,
                    threshold: float = 0.5, include_heldout: bool = True) -> dict[str, Rates]:
    out = {}
    for split, (attacks, benign) in eval_sets(include_heldout).items():
        missed = tuple(t for t in attacks
                       if detect_injection(t, index, classifier=classifier, threshold=threshold).passed)
        alarms = tuple(t for t in benign
                       if not detect_injection(t, index, classifier=classifier, threshold=threshold).passed)
        out[split] = Rates(split, 1 - len(missed) / len(attacks), len(alarms) / len(benign), len(attacks),
                           len(benign), missed, alarms)
    return out


def table(rates: dict[str, Rates], label: str = "prompt_injection") -> str:
    return "\n".join(f"{label} [{r.split:8}] detection {r.detection_rate:6.1%} of {r.attacks:3}, "
                     f"false positives {r.false_positive_rate:5.1%} of {r.benign:3}" for r in rates.values())
