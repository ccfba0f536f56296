"""An adapter version's eval verdicts: what the worker records on the job, its MLflow run and the registered
version (``finetune.evaluate`` produces them, ``finetune.tracking`` logs them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SuiteResult:
    suite: str
    passed: bool
    run_id: str | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)  # metric id -> mean
    pass_rate: float | None = None
    failing_metrics: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    error: str | None = None  # the suite could not run at all (missing, bad target, backend down)


@dataclass
class AdapterEvaluation:
    model: str
    version: str
    alias: str
    adapter: str
    suites: list[SuiteResult]

    @property
    def passed(self) -> bool:
        return bool(self.suites) and all(s.passed for s in self.suites)

    @property
    def state(self) -> str:
        """passed | failed (a gate said no) | error (a suite could not run)."""
        if any(s.error for s in self.suites):
            return "error"
        return "passed" if self.passed else "failed"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "alias": self.alias, "adapter": self.adapter,
                "passed": self.passed, "suites": {s.suite: {k: v for k, v in asdict(s).items() if k != "suite"}
                                                  for s in self.suites}}

    def summary(self) -> str:
        parts = []
        for s in self.suites:
            if s.error:
                parts.append(f"{s.suite}: error ({s.error})")
            elif s.passed:
                parts.append(f"{s.suite}: pass ({s.run_id})")
            else:
                why = ", ".join(s.failing_metrics) or "; ".join(s.reasons) or "gate failed"
                parts.append(f"{s.suite}: FAIL ({s.run_id}: {why})")
        return "; ".join(parts) or "no suites"
