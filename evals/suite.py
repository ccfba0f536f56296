"""Eval suites as code: YAML files validated by pydantic.

A suite names what it evaluates (``target``), the cases (``dataset``: inline or a JSONL file next to
the suite), the metrics with their thresholds, and the ``gate`` that turns results into pass/fail::

    name: golden-rag
    target: {model: "rag:docs", params: {temperature: 0, max_tokens: 96}}
    dataset: {cases: [{id: q1, input: "...", reference: "...", expected_sources: [a.md]}]}
    metrics: [{name: citation_correctness, threshold: 0.5}, {name: rouge_l, threshold: 0.2}]
    gate: {min_mean: {citation_correctness: 0.6}, min_pass_rate: 0.5, max_regressions: 2}

The suite hash covers everything that defines the evaluation (cases included, after loading a
JSONL file), so two runs with equal hashes evaluated the same thing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from app.core.paths import is_within
from evals.cases import ID_PATTERN, Case, Expectation, Strict
from evals.metrics import registry

_PROMPT_REF = re.compile(r"^[a-z0-9][a-z0-9_.-]*(@([0-9]+|[a-z][a-z0-9_-]*))?$")


class SuiteError(ValueError):
    """A suite that cannot be loaded; the message says where and why (CLI exit code 2)."""


class TargetParams(Strict):
    temperature: float | None = Field(default=0.0, ge=0, le=2)
    max_tokens: int | None = Field(default=128, ge=1, le=8192)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None


class Target(Strict):
    """What is evaluated: a prompt template version, a model alias, a RAG collection (``rag:<name>``)
    or an agent workflow (``agent:<workflow>``)."""

    prompt: str | None = Field(default=None, description="name@version, name@label or name (= latest).")
    model: str | None = Field(default=None, description="Model alias, rag:<collection> for grounded answers, or "
                              "agent:<workflow> for an agent workflow.")
    system: str | None = Field(default=None, description="System message sent in front of each case.")
    variables: dict[str, Any] = Field(default_factory=dict, description="Template variables shared by all cases.")
    top_k: int | None = Field(default=None, ge=1, le=50, description="RAG: passages per question.")
    policy: str | None = Field(default=None, description="Guardrail policy the answers are checked under instead of "
                               "the one its bindings select (as a release variant's policy): a run with it is what "
                               "lets a canary of that policy start.")
    params: TargetParams = Field(default_factory=TargetParams)

    @field_validator("prompt")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        if v is not None and not _PROMPT_REF.match(v):
            raise ValueError(f"{v!r} is not a prompt reference (name, name@version or name@label)")
        return v

    @model_validator(mode="after")
    def _one(self) -> Target:
        if self.prompt is None and self.model is None:
            raise ValueError("a target needs a prompt, a model alias or rag:<collection>")
        if self.prompt is not None and self.rag_collection is not None:
            raise ValueError("a rag:<collection> target renders its own prompt; use either prompt or rag")
        if self.model is not None and self.model.startswith("rag:") and not self.model[4:]:
            raise ValueError("rag: needs a collection name (rag:<collection>)")
        if self.model is not None and self.model.startswith("agent:"):
            if not self.model[6:]:
                raise ValueError("agent: needs a workflow name (agent:<workflow>)")
            # The workflow builds its own messages from the question alone: these would be silently ignored.
            ignored = [k for k, v in (("prompt", self.prompt), ("system", self.system), ("top_k", self.top_k),
                                      ("variables", self.variables)) if v]
            if ignored:
                raise ValueError(f"an agent:<workflow> target takes only the question; remove {', '.join(ignored)}")
        return self

    @property
    def rag_collection(self) -> str | None:
        return self.model[4:] if self.model and self.model.startswith("rag:") else None

    @property
    def agent_workflow(self) -> str | None:
        return self.model[6:] if self.model and self.model.startswith("agent:") else None

    @property
    def kind(self) -> str:
        return ("prompt" if self.prompt else "rag" if self.rag_collection else "agent" if self.agent_workflow
                else "model")


class Dataset(Strict):
    cases: list[Case] | None = None
    path: Path | None = Field(default=None, description="JSONL file, one case per line, relative to the suite.")

    @model_validator(mode="after")
    def _one(self) -> Dataset:
        if (self.cases is None) == (self.path is None):
            raise ValueError("dataset needs exactly one of 'cases' (inline) or 'path' (a JSONL file)")
        return self


class MetricSpec(Strict):
    name: str = Field(description="A registered metric (evals.metrics.registry).")
    id: str | None = Field(default=None, description="Column name in reports; defaults to the name.")
    threshold: float | None = Field(default=None, description="Per-case pass mark; default: the metric's own.")
    samples: int = Field(default=1, ge=1, le=50, description="Repeat judged metrics; mean + 95% CI.")
    params: dict[str, Any] = Field(default_factory=dict)
    when: list[Expectation] | None = Field(
        default=None, description="Only for cases expecting one of these behaviours."
    )
    when_category: list[str] | None = None

    @property
    def key(self) -> str:
        return self.id or self.name

    def applies(self, case: Case) -> bool:
        if self.when is not None and not set(self.when) & set(case.expect):
            return False
        return not (self.when_category is not None and case.category not in self.when_category)


class Gate(Strict):
    min_mean: dict[str, float] = Field(default_factory=dict, description="metric id -> minimum mean score.")
    max_mean: dict[str, float] = Field(default_factory=dict, description="metric id -> maximum mean (latency...).")
    min_pass_rate: float = Field(default=1.0, ge=0, le=1, description="Share of cases passing every metric.")
    max_regressions: int | None = Field(
        default=None, ge=0, description="Cases that passed in the baseline run and fail now."
    )
    uncertain: Literal["fail", "pass", "exclude"] = Field(
        default="fail", description="How a case whose CI straddles a threshold counts."
    )
    max_errors: int = Field(default=0, ge=0, description="Cases whose call failed.")
    judge_errors: Literal["uncertain", "fail"] = Field(
        default="uncertain", description="How a judged metric with no usable judge sample for a case counts: as "
        "uncertain (then the 'uncertain' policy applies) or as a failure.")
    max_judge_errors: int | None = Field(
        default=None, ge=0, description="Most (case, metric) scores the judge may fail to produce; none: no limit.")
    bind: list[str] = Field(
        default_factory=list, description="Prompt labels this suite guards: 'production' (of the target prompt) or "
        "'<prompt>@production'. Moving a guarded protected label then needs a passing run of this suite on "
        "exactly that prompt version (evals.gate.prompt_gate).")


class Suite(Strict):
    name: str
    description: str = ""
    target: Target
    dataset: Dataset
    metrics: list[MetricSpec] = Field(min_length=1)
    gate: Gate = Field(default_factory=Gate)
    concurrency: int | None = Field(default=None, ge=1, le=256)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not ID_PATTERN.match(v):
            raise ValueError(f"suite name {v!r}: use letters, digits and _.:-")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Suite:
        keys = [m.key for m in self.metrics]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"metric ids must be unique (repeated: {', '.join(dup)}); set 'id' to tell them apart")
        unknown = [m.name for m in self.metrics if m.name not in registry]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; registered: {', '.join(sorted(registry))}")
        for name in (*self.gate.min_mean, *self.gate.max_mean):
            if name not in keys:
                raise ValueError(f"gate names metric {name!r}, which the suite does not compute")
        for m in self.metrics:
            if m.threshold is None and registry[m.name].threshold is None:
                raise ValueError(f"metric {m.key!r} needs a threshold")
        if self.dataset.cases is not None:
            ids = [c.id for c in self.dataset.cases]
            dup = sorted({i for i in ids if ids.count(i) > 1})
            if dup:
                raise ValueError(f"case ids must be unique (repeated: {', '.join(dup[:5])})")
            if not ids:
                raise ValueError("the dataset has no cases")
        return self

    @property
    def cases(self) -> list[Case]:
        assert self.dataset.cases is not None, "load the suite with load_suite() to read its JSONL dataset"
        return self.dataset.cases

    def threshold(self, spec: MetricSpec) -> float:
        t = spec.threshold if spec.threshold is not None else registry[spec.name].threshold
        assert t is not None
        return t

    @property
    def hash(self) -> str:
        return suite_hash(self)

    def spec(self, key: str) -> MetricSpec:
        return next(m for m in self.metrics if m.key == key)


def suite_hash(suite: Suite) -> str:
    data = suite.model_dump(mode="json", exclude={"description"})
    if data["target"]["policy"] is None:  # added later: an unset one leaves every older suite's hash as it was
        del data["target"]["policy"]
    data["dataset"] = {"cases": [c.model_dump(mode="json") for c in suite.cases]}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _format(err: ValidationError, where: str) -> str:
    lines = [f"  {'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in err.errors()]
    return f"invalid suite {where}:\n" + "\n".join(lines)


def _read_jsonl(path: Path) -> list[Case]:
    if not path.is_file():
        raise SuiteError(f"dataset file {path} does not exist")
    cases = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            cases.append(Case.model_validate(json.loads(line)))
        except json.JSONDecodeError as e:
            raise SuiteError(f"{path}:{n}: not JSON ({e.msg})") from None
        except ValidationError as e:
            raise SuiteError(_format(e, f"{path}:{n}")) from None
    return cases


def parse_suite(data: Any, *, base_dir: Path | None = None, where: str = "(inline)") -> Suite:
    if not isinstance(data, dict):
        raise SuiteError(f"invalid suite {where}: expected a mapping at the top level")
    try:
        suite = Suite.model_validate(data)
    except ValidationError as e:
        raise SuiteError(_format(e, where)) from None
    if suite.dataset.path is not None:
        path = suite.dataset.path if suite.dataset.path.is_absolute() else (base_dir or Path.cwd()) / suite.dataset.path
        cases = _read_jsonl(path)
        try:
            suite = Suite.model_validate({**data, "dataset": {"cases": [c.model_dump() for c in cases]}})
        except ValidationError as e:
            raise SuiteError(_format(e, f"{where} (dataset {path})")) from None
    return suite


def load_suite(path: str | Path, *, roots: Sequence[Path] | None = None) -> Suite:
    """``roots``: folders the suite's JSONL dataset must live in (a suite chosen over the API may not make
    the server read, and echo in its errors, a file elsewhere)."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SuiteError(f"{path} is not valid YAML: {e}") from None
    if roots is not None and isinstance(data, dict) and isinstance(data.get("dataset"), dict):
        ds = data["dataset"].get("path")
        if ds is not None and not is_within(path.parent / str(ds), roots):
            raise SuiteError(f"{path}: dataset.path must be a file in the suites folder(s) "
                             f"({', '.join(map(str, roots))})")
    return parse_suite(data, base_dir=path.parent, where=str(path))


_SHIPPED = Path(__file__).parent / "suites"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def suite_dirs(suites_dir: Path) -> list[Path]:
    """The folders suites load from by name: ``evals.suites_dir`` (relative to the working directory, else
    to the project root) and the shipped evals/suites."""
    root = Path(__file__).resolve().parents[1]
    first = suites_dir if suites_dir.is_dir() or suites_dir.is_absolute() else root / suites_dir
    out: list[Path] = []
    for d in (first, _SHIPPED):
        d = Path(os.path.abspath(d))
        if d not in out:
            out.append(d)
    return out


def find_named_suite(name: str, suites_dir: Path) -> Path:
    """``<folder>/<name>.yaml`` in the first of :func:`suite_dirs` that has it; a path is refused (what a
    remote caller names must not make the server read files outside the suites folders)."""
    dirs = suite_dirs(suites_dir)
    where = ", ".join(map(str, dirs))
    if not _NAME.match(name) or ".." in name:
        raise SuiteError(f"suite {name!r} is not a suite name: suites are loaded by name from the suites folder(s) "
                         f"({where}; setting evals.suites_dir), not from a path")
    stem = name.removesuffix(".yaml").removesuffix(".yml")
    for d in dirs:
        for cand in (d / f"{stem}.yaml", d / f"{stem}.yml"):
            if cand.is_file():
                return cand
    raise SuiteError(f"no suite {name!r} in the suites folder(s) ({where})")


def find_suite(name_or_path: str, suites_dir: Path) -> Path:
    """A path as given, else ``<suites_dir>/<name>.yaml`` (also relative to the project root)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    root = Path(__file__).resolve().parents[1]
    for d in (suites_dir, root / suites_dir, Path(__file__).parent / "suites"):
        for cand in (d / name_or_path, d / f"{name_or_path}.yaml", d / f"{name_or_path}.yml"):
            if cand.is_file():
                return cand
    raise SuiteError(f"no suite {name_or_path!r} (not a file, and not in {suites_dir})")


def list_suites(suites_dir: Path) -> list[Path]:
    root = Path(__file__).resolve().parents[1]
    d = suites_dir if suites_dir.is_dir() else root / suites_dir
    return sorted(d.glob("*.yaml")) if d.is_dir() else []


def suite_summaries(suites_dir: Path) -> list[dict[str, Any]]:
    """Every suite in the suites folder: name, path, cases, hash, target and gate bindings (or why it does not
    load)."""
    out: list[dict[str, Any]] = []
    for path in list_suites(suites_dir):
        try:
            s = load_suite(path)
            out.append({"name": s.name, "path": str(path), "cases": len(s.cases), "hash": s.hash,
                        "target": s.target.model_dump(exclude_none=True), "bind": s.gate.bind})
        except SuiteError as e:
            out.append({"name": path.stem, "path": str(path), "error": str(e)})
    return out


def _prompt_name(ref: Any) -> str | None:
    return ref.split("@", 1)[0] if isinstance(ref, str) and ref else None


def bound_suites(prompt: str, dirs: Sequence[Path], labels: Iterable[str]) -> dict[str, str]:
    """The suites in ``dirs`` that guard ``prompt`` for one of ``labels`` (the protected labels), as
    {suite name: suite hash}. A suite guards a prompt when its ``gate.bind`` lists ``<prompt>@<label>``, or
    a bare ``<label>`` and its target is that prompt. A file that cannot be read, or a bound suite that does
    not load, raises :class:`SuiteError`: the gate cannot tell what it would have required."""
    labels = set(labels)
    out: dict[str, str] = {}
    seen: set[str] = set()
    for d in dirs:
        for path in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]) if d.is_dir() else []:
            if path.stem in seen:  # the first folder wins, as for find_named_suite
                continue
            seen.add(path.stem)
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
                raise SuiteError(f"suite file {path} cannot be read ({type(e).__name__}), so it may guard "
                                 f"{prompt!r}: fix or remove it") from None
            if not isinstance(data, dict):
                continue
            gate = data.get("gate") if isinstance(data.get("gate"), dict) else {}
            target = data.get("target") if isinstance(data.get("target"), dict) else {}
            binds = [b for b in (gate.get("bind") or []) if isinstance(b, str)]
            ours = _prompt_name(target.get("prompt")) == prompt
            if not any((b.partition("@")[0] == prompt and b.partition("@")[2] in labels) if "@" in b
                       else (ours and b in labels) for b in binds):
                continue
            suite = load_suite(path)
            out[suite.name] = suite.hash
    return out
