"""Detection and false-positive rates of keel/prompt_injection on the shipped adversarial / benign sets.

The rates are printed (run with -s). ``attacks``/``benign`` were used to tune the heuristics and thresholds,
``holdout_*`` were seen once and then motivated category-level rules, ``fresh_*`` were never tuned on:
the fresh numbers are the honest estimate, and they are low for attacks (see the report in bench output).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from app.guardrails.testing import shared_embedder
from app.guardrails.validators.injection import AttackIndex, detect_injection

EVAL = Path(__file__).resolve().parents[2] / "infra" / "guardrails" / "data" / "eval_set.yaml"


def rates():
    data = yaml.safe_load(EVAL.read_text())
    index = AttackIndex(shared_embedder()).build()
    out = {}
    for split in ("", "holdout_", "fresh_"):
        attacks, benign = data[f"{split}attacks"], data[f"{split}benign"]
        detected = sum(not detect_injection(t, index).passed for t in attacks)
        false_pos = sum(not detect_injection(t, index).passed for t in benign)
        out[split.rstrip("_") or "tuning"] = (detected / len(attacks), false_pos / len(benign), len(attacks),
                                               len(benign))
    return out


def test_detection_and_false_positive_rates():
    r = rates()
    for split, (det, fp, na, nb) in r.items():
        print(f"\nprompt_injection [{split}]: detection {det:.0%} of {na} attacks, false positives {fp:.0%} of {nb}")
    assert len(yaml.safe_load(EVAL.read_text())["attacks"]) >= 40
    det, fp, *_ = r["tuning"]
    assert det >= 0.95 and fp == 0.0
    # benign questions must pass on every split, also the never-tuned one
    assert r["fresh"][1] <= 0.1 and r["holdout"][1] <= 0.1
