"""Detection and false-positive rates of every shipped validator on its labelled set (printed with -s).

The sets (infra/guardrails/data/validator_sets.yaml) go through the policy entries as the shipped policy
configures them. keel/prompt_injection has its own sets and floors (test_guardrails_eval.py).
"""

from __future__ import annotations

import pytest

from app.guardrails.validator_eval import load_sets, table, validator_rates

pytest_plugins = ("app.guardrails.testing",)

# Groundedness is a similarity proxy plus lexical checks (no NLI model works offline here): it misses
# contradictions in common words ("checked once an hour" against "every 0.5 s"). Measured 0.7 when set.
RECALL_FLOOR = {"keel/groundedness": 0.6}
SHIPPED = {"keel/pii", "keel/secrets", "keel/toxicity", "keel/topic", "keel/system_prompt_leakage",
           "keel/groundedness"}


@pytest.fixture(scope="module")
def rates(default_engine):
    r = validator_rates(default_engine)
    print("\n" + table(r))
    return r


def test_every_shipped_validator_has_a_labelled_set_of_useful_size():
    sets = {s.validator: s for s in load_sets()}
    assert set(sets) == SHIPPED
    for s in sets.values():
        assert len(s.positives) >= 6 and len(s.benign) >= 10, s.validator
        assert not set(s.positives) & set(s.benign), s.validator


@pytest.mark.parametrize("validator", sorted(SHIPPED))
def test_detection_and_false_positive_floors(rates, validator):
    r = rates[validator].rates
    assert r.detection_rate >= RECALL_FLOOR.get(validator, 0.9), f"missed: {r.missed}"
    assert r.false_positive_rate <= 0.05, f"false alarms: {r.false_alarms}"
