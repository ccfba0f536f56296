"""Drift detection: is the traffic Keel answers now still the traffic it was built, tested and released for?

A check compares a **current** window of production traffic (the drift features every answer leaves in the
lineage store: :class:`lifecycle.lineage.Features`) with a **reference**:

* ``window``: another window of traffic (default: the one just before the current window, of equal length);
* ``release``: one arm of a release: its baseline arm against its candidate over the same window
  (``compare="candidate"``), or the baseline arm against its own earlier window (``compare="earlier"``);
* ``suite``: the inputs of an eval suite (its cases' ``input`` texts, embedded with the same embedder; their
  lengths from the texts): "do users still ask what we evaluated?". Only the question checks apply.

The checks, each an Evidently test (Evidently 0.7: ``Report`` with ``ValueDrift`` per column and
``EmbeddingsDrift``; Evidently picks K-S, chi-square or Z-test p-values up to 1000 rows and normed Wasserstein or
Jensen-Shannon distances above, unless ``monitor.methods`` says otherwise):

===================  ======================================================================================
input_embedding      the questions' MiniLM embeddings, PCA-reduced (fit on both windows, blind to which is
                     which): Evidently's domain-classifier method (ROC AUC of a classifier telling them apart)
topic_mix            k-means topics fit on the reference embeddings: the mix of cluster ids (categorical)
question_length      characters of the question
input_length         characters of every message sent
top_score            best retrieval score of grounded questions
no_good_passage      share of grounded questions whose best passage scores under monitor.no_good_passage_score
refusal              share of refused answers (content filter, blocked by a guard)
negative_feedback    share of rated answers rated down (under 0.5 on POST /v1/feedback's 0..1 scale) by the key
                     that got them: the ratings given by the time the check runs (late ones still move a window)
guard:<validator>    share of answers a guardrail validator acted on, one check per validator seen
answer_length        characters of the answer (answers that completed)
completion_tokens    tokens of the answer (answers that completed)
===================  ======================================================================================

A window (or a check's column) with fewer than ``monitor.min_rows`` values is **not enough data**: that check
(or the whole result) is neither a pass nor a drift. The **verdict** is ``drift`` when at least
``monitor.drift_share`` of the checks that ran drifted, or when a check in ``monitor.verdict_checks`` (default:
``input_embedding``) drifted; ``no_drift`` otherwise; ``not_enough_data`` when no check could run.

Every result is stored (``<home>/monitor.db``), its Evidently HTML report written to
``<home>/reports/drift/<id>.html``, its verdict exported as Prometheus metrics (``keel_drift_*``) and audited
(trail ``monitor``); subscribers (:meth:`DriftMonitor.subscribe`) hear about it: that is the drift event other
parts of Keel (continuous training) react to.

Evidently (~9 s to import) and pandas are imported on the first check, not with this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.core.audit import AuditEvent
from app.core.errors import BackendUnavailable, InvalidRequest, KeelError, NotFound
from lifecycle.lineage import Features, LineageStore
from lifecycle.monitor.settings import MonitorSettings
from lifecycle.monitor.store import TRAIL, DriftStore, check_id, open_drift_store

log = logging.getLogger("keel.monitor")

Verdict = Literal["drift", "no_drift", "not_enough_data"]
RefKind = Literal["window", "release", "suite"]
Embed = Callable[[list[str]], Any]
SuiteInputs = Callable[[str], tuple[list[str], str]]  # name -> (inputs, system prompt)
Scores = Callable[[Sequence[tuple[str, str]]], dict[str, float]]  # (completion id, key id) -> its key's rating

EMBEDDING = "input_embedding"
TOPICS = "topic_mix"
NUMERICAL = ("question_length", "input_length", "top_score", "answer_length", "completion_tokens")
BINARY = ("no_good_passage", "refusal", "negative_feedback")
SUITE_CHECKS = frozenset({EMBEDDING, TOPICS, "question_length", "input_length"})
_SEED = 0


# -- what a check compares ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """``[since, until)`` in unix seconds."""

    since: float
    until: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.since) and np.isfinite(self.until)):
            raise InvalidRequest("window bounds must be finite unix times (seconds)", param="since")
        if self.since >= self.until:
            raise InvalidRequest(f"a window's since ({self.since:.3f}) must be before its until ({self.until:.3f}); "
                                 "give since < until, or window_s for the last window_s seconds", param="since")

    @property
    def seconds(self) -> float:
        return self.until - self.since

    def before(self) -> Window:
        """The window of equal length that ends where this one starts."""
        return Window(self.since - self.seconds, self.since)


@dataclass(frozen=True, slots=True)
class ReferenceSpec:
    """What the current window is compared with (see the module docstring)."""

    kind: RefKind = "window"
    since: float | None = None
    until: float | None = None
    release: str | None = None
    variant: str | None = None  # release: the baseline arm (default: the release's baseline)
    current_variant: str | None = None  # release, compare=candidate: the arm compared (default: its candidate)
    compare: Literal["candidate", "earlier"] = "candidate"
    suite: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("window", "release", "suite"):
            raise InvalidRequest(f"reference kind {self.kind!r}: use window, release or suite", param="kind")
        if (self.since is None) != (self.until is None):
            raise InvalidRequest("give the reference window's since and until together (or neither: the "
                                 "default window)", param="since")
        if self.since is not None:
            Window(self.since, self.until)  # type: ignore[arg-type]
        if self.kind == "release" and not self.release:
            raise InvalidRequest("a release reference needs the release's name (reference.release)", param="release")
        if self.kind == "suite" and not self.suite:
            raise InvalidRequest("a suite reference needs the eval suite's name (reference.suite)", param="suite")
        if self.compare not in ("candidate", "earlier"):
            raise InvalidRequest(f"compare {self.compare!r}: use candidate or earlier", param="compare")

    @classmethod
    def parse(cls, text: str) -> ReferenceSpec:
        """``window``, ``release:NAME`` or ``suite:NAME`` (the CLI's and the settings' spelling)."""
        kind, _, name = text.strip().partition(":")
        if kind == "window" and not name:
            return cls()
        if kind == "release" and name:
            return cls(kind="release", release=name)
        if kind == "suite" and name:
            return cls(kind="suite", suite=name)
        raise InvalidRequest(f"reference {text!r}: use window, release:NAME or suite:NAME", param="reference")


# -- results ----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class CheckResult:
    """One test: its Evidently method, statistic (a p-value, a distance or a ROC AUC) and threshold."""

    name: str
    kind: str  # embedding, numerical, categorical
    state: str  # drift, ok, skipped
    method: str | None = None
    statistic: float | None = None
    statistic_kind: str | None = None  # p_value (drift below the threshold), distance or roc_auc (above)
    threshold: float | None = None
    drifted: bool | None = None
    current_rows: int = 0
    reference_rows: int = 0
    current_value: float | None = None  # numerical: mean; a share: the rate
    reference_value: float | None = None
    note: str = ""


@dataclass(slots=True)
class DriftResult:
    id: str
    created: float
    actor: str
    verdict: Verdict
    drift_share: float | None  # of the checks that ran, the share that drifted
    current: dict[str, Any]
    reference: dict[str, Any]
    checks: list[CheckResult]
    settings: dict[str, Any]  # drift_share threshold, verdict checks, min_rows the verdict was made with
    report: str | None = None  # the HTML report's path
    duration_s: float = 0.0
    scheduled: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return self.verdict == "drift"

    @property
    def drifted_checks(self) -> list[str]:
        return [c.name for c in self.checks if c.drifted]

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        out["drifted"] = self.drifted
        out["drifted_checks"] = self.drifted_checks
        out["report_url"] = f"/v1/monitor/drift/{self.id}/report" if self.report else None
        return out


# -- the monitor --------------------------------------------------------------------------------------------------


class DriftMonitor:
    """Runs drift checks (one at a time), keeps their results and tells subscribers."""

    def __init__(self, settings: MonitorSettings, lineage: LineageStore, store: DriftStore, *, home: Path,
                 metrics: Any = None, embed: Embed | None = None, suite_inputs: SuiteInputs | None = None,
                 releases: Any = None, flush: Callable[[], None] | None = None, feedback: Scores | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``embed``: texts -> vectors, the embedder of the questions' drift features (suite references);
        ``suite_inputs``: a suite's name -> its case inputs and system prompt; ``releases``: has
        ``get(name) -> Release`` (names the baseline and candidate arms); ``flush``: writes the lineage
        recorder's pending features before a check reads them; ``feedback``: the users' ratings of answers (the
        release store's), for the negative-feedback check."""
        self.settings = settings
        self.lineage = lineage
        self.store = store
        self.reports_dir = Path(home) / "reports" / "drift"
        self.metrics = metrics
        self.embed = embed
        self.suite_inputs = suite_inputs
        self.releases = releases
        self.flush = flush
        self.feedback = feedback
        self.clock = clock
        self._lock = threading.Lock()  # checks are CPU-heavy: one at a time
        self._subscribers: list[tuple[Callable[[DriftResult], Any], bool]] = []
        self._suite_cache: dict[str, tuple[list[str], str, np.ndarray]] = {}

    # -- events ---------------------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[DriftResult], Any], *, drift_only: bool = True) -> Callable[[], None]:
        """Call ``callback(result)`` after every check that found drift (``drift_only=False``: after every
        check). Called on the checking thread; an exception is logged, never raised. Returns the unsubscriber."""
        entry = (callback, drift_only)
        self._subscribers.append(entry)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(entry)

        return unsubscribe

    def _notify(self, result: DriftResult) -> None:
        for callback, drift_only in list(self._subscribers):
            if drift_only and not result.drifted:
                continue
            try:
                callback(result)
            except Exception:
                log.exception("a drift subscriber (%s) failed on check %s", getattr(callback, "__name__", callback),
                              result.id)

    # -- reading ----------------------------------------------------------------------------------------------

    def get(self, check: str) -> dict[str, Any]:
        found = self.store.get(check_id(check))
        if found is None:
            raise NotFound(f"no drift check {check}; GET /v1/monitor/drift lists them", param="id",
                           code="drift_check_not_found")
        return found

    def list(self, *, limit: int = 50, before: float | None = None, verdict: str | None = None,
             reference_kind: str | None = None) -> list[dict[str, Any]]:
        return self.store.list(limit=limit, before=before, verdict=verdict, reference_kind=reference_kind)

    def report_path(self, check: str) -> Path:
        result = self.get(check)
        path = self.reports_dir / f"{result['id']}.html"
        if not result.get("report"):
            raise NotFound(f"drift check {check} has no report: it had {result['verdict'].replace('_', ' ')}",
                           param="id", code="drift_report_not_found")
        if not path.is_file():
            raise NotFound(f"the report of drift check {check} is not here: it was removed (monitor.keep_reports "
                           f"keeps the newest {self.settings.keep_reports}) or, with the results shared in Postgres, "
                           "another API process ran the check and keeps it; its result is in "
                           f"GET /v1/monitor/drift/{check}", param="id", code="drift_report_not_found")
        return path

    # -- checking ---------------------------------------------------------------------------------------------

    def run_scheduled(self) -> DriftResult:
        """The periodic check: the last ``monitor.window_s`` against ``monitor.reference``."""
        return self.check(self.settings.window_s, ReferenceSpec.parse(self.settings.reference), actor="scheduler",
                          scheduled=True)

    async def loop(self) -> None:
        """Run :meth:`run_scheduled` every ``monitor.interval_s`` in a worker thread until cancelled (the API's
        background task); a failed round is logged and the next one runs as planned."""
        interval = self.settings.interval_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                # Processes sharing a lineage store (Postgres) take turns: one check per round for the fleet.
                if not await asyncio.to_thread(self.lineage.claim, "drift-check", interval):
                    self._yield_gauges()
                    continue
                await asyncio.to_thread(self.run_scheduled)
            except Exception:
                log.exception("the scheduled drift check failed; next one in %.0f s", interval)

    def check(self, current: tuple[float | None, float | None] | float | Window | None = None,
              reference: ReferenceSpec | None = None, *, actor: str = "", min_rows: int | None = None,
              scheduled: bool = False) -> DriftResult:
        """Compare ``current`` (``(since, until)``; ``until`` None: now; a number: the last that many seconds;
        None: the last ``monitor.window_s``) with ``reference`` (default: the window before it)."""
        reference = reference or ReferenceSpec()
        min_rows = self.settings.min_rows if min_rows is None else int(min_rows)
        if min_rows < 2:
            raise InvalidRequest("min_rows must be at least 2", param="min_rows")
        window = self._window(current)
        with self._lock:
            started = time.perf_counter()
            try:
                result = self._check(window, reference, actor=actor, min_rows=min_rows, scheduled=scheduled)
            except Exception as e:
                # The caller's mistake (an unknown suite or release, a bad window: 4xx) is not a failed run.
                if self.metrics is not None and not (isinstance(e, KeelError) and e.status < 500):
                    self.metrics.drift_runs.labels("error").inc()
                raise
            result.duration_s = round(time.perf_counter() - started, 3)
            self.store.add(result.public(), AuditEvent(
                trail=TRAIL, action="drift.check", subject_kind="drift_check", subject=result.id, actor=actor,
                to_ref=result.verdict, reason=_summary(result), details={
                    "verdict": result.verdict, "drift_share": result.drift_share,
                    "drifted_checks": result.drifted_checks, "current": result.current,
                    "reference": result.reference, "scheduled": scheduled}))
            self._export(result)
        log.info("drift check %s: %s", result.id, _summary(result))
        self._notify(result)
        return result

    def _window(self, current: Any) -> Window:
        now = self.clock()
        if current is None:
            return Window(now - self.settings.window_s, now)
        if isinstance(current, Window):
            return current
        if isinstance(current, int | float):
            if current <= 0:
                raise InvalidRequest("window_s must be positive (seconds)", param="window_s")
            return Window(now - float(current), now)
        since, until = current
        if since is None:
            raise InvalidRequest("the current window needs since (or give window_s)", param="since")
        return Window(float(since), now if until is None else float(until))

    def _check(self, window: Window, ref: ReferenceSpec, *, actor: str, min_rows: int,
               scheduled: bool) -> DriftResult:
        if self.flush is not None:
            self.flush()
        cur_rows, ref_rows, ref_data, current, reference = self._load(window, ref)
        result = DriftResult(
            id=f"drift-{secrets.token_hex(8)}", created=self.clock(), actor=actor, verdict="not_enough_data",
            drift_share=None, current={**current, "rows": len(cur_rows)},
            reference={**reference, "rows": len(ref_rows) if ref_data is None else len(ref_data["question_length"])},
            checks=[], scheduled=scheduled,
            settings={"drift_share": self.settings.drift_share, "verdict_checks": list(self.settings.verdict_checks),
                      "min_rows": min_rows})
        if result.current["rows"] < min_rows or result.reference["rows"] < min_rows:
            result.notes.append(f"not enough data: the current window has {result.current['rows']} rows and the "
                                f"reference {result.reference['rows']}; a check needs {min_rows} in each "
                                "(monitor.min_rows)")
            return result
        cur = _columns(cur_rows, self.settings.no_good_passage_score, self._scores(cur_rows))
        refc = ref_data if ref_data is not None else _columns(ref_rows, self.settings.no_good_passage_score,
                                                              self._scores(ref_rows))
        cur_emb, ref_emb, notes = self._embeddings(cur_rows, ref_rows, ref_data)
        result.notes += notes
        result.checks, widgets = _run_checks(cur, refc, cur_emb, ref_emb, self.settings, min_rows,
                                             suite=ref.kind == "suite")
        ran = [c for c in result.checks if c.state != "skipped"]
        if ran:
            drifted = [c for c in ran if c.drifted]
            result.drift_share = round(len(drifted) / len(ran), 4)
            key = any(c.name in self.settings.verdict_checks for c in drifted)
            result.verdict = "drift" if key or result.drift_share >= self.settings.drift_share else "no_drift"
            result.report = str(self._write_report(result, widgets))
        else:
            result.notes.append(f"not enough data: no check had {min_rows} values in both windows")
        return result

    # -- loading the windows ------------------------------------------------------------------------------------

    def _scores(self, rows: Sequence[Features]) -> dict[str, float] | None:
        return None if self.feedback is None else self.feedback([(f.id, f.owner) for f in rows])

    def _rows(self, window: Window, release: str | None = None, variant: str | None = None) -> list[Features]:
        return self.lineage.features(since=window.since, until=window.until, release=release, variant=variant,
                                     limit=self.settings.max_rows)

    def _load(self, window: Window, ref: ReferenceSpec):
        """(current rows, reference rows, suite columns or None, current description, reference description)"""
        current: dict[str, Any] = {"since": window.since, "until": window.until}
        ref_window = Window(ref.since, ref.until) if ref.since is not None else None  # type: ignore[arg-type]
        if ref.kind == "window":
            rw = ref_window or window.before()
            return (self._rows(window), self._rows(rw), None, current,
                    {"kind": "window", "since": rw.since, "until": rw.until})
        if ref.kind == "suite":
            inputs, system, vectors = self._suite(ref.suite or "")
            data = {"question_length": np.array([len(q) for q in inputs], dtype=float),
                    "input_length": np.array([len(system) + len(q) for q in inputs], dtype=float),
                    "_embeddings": vectors}
            return self._rows(window), [], data, current, {"kind": "suite", "suite": ref.suite}
        baseline, candidate = self._arms(ref)
        if ref.compare == "candidate":
            rw = ref_window or window
            current.update(release=ref.release, variant=candidate)
            return (self._rows(window, ref.release, candidate), self._rows(rw, ref.release, baseline), None, current,
                    {"kind": "release", "release": ref.release, "variant": baseline, "compare": "candidate",
                     "since": rw.since, "until": rw.until})
        rw = ref_window or window.before()
        current.update(release=ref.release, variant=baseline)
        return (self._rows(window, ref.release, baseline), self._rows(rw, ref.release, baseline), None, current,
                {"kind": "release", "release": ref.release, "variant": baseline, "compare": "earlier",
                 "since": rw.since, "until": rw.until})

    def _arms(self, ref: ReferenceSpec) -> tuple[str, str]:
        """(baseline arm, compared arm) of the reference's release, checked against its spec when known."""
        name = ref.release or ""
        if self.releases is not None:
            release = self.releases.get(name)  # NotFound (404) names what to do
            names = [v.name for v in release.spec.variants]
            baseline = ref.variant or release.spec.baseline
            candidate = ref.current_variant or release.spec.candidate
            for param, v in (("variant", baseline), ("current_variant", candidate)):
                if v not in names:
                    raise InvalidRequest(f"release {name!r} has no variant {v!r} (its variants: {', '.join(names)})",
                                         param=param)
        else:
            if not self.lineage.features(release=name, limit=1):
                raise NotFound(f"no traffic recorded for release {name!r}: check the name (GET /v1/releases)",
                               param="release", code="release_not_found")
            if not ref.variant or (ref.compare == "candidate" and not ref.current_variant):
                raise InvalidRequest("name the release's baseline arm (reference.variant) and, to compare with "
                                     "the candidate, its arm (reference.current_variant): releases are off here",
                                     param="variant")
            baseline, candidate = ref.variant, ref.current_variant or ref.variant
        if ref.compare == "candidate" and baseline == candidate:
            raise InvalidRequest(f"the baseline and the compared arm are both {baseline!r}; use compare=earlier to "
                                 "compare the baseline with its own earlier window", param="current_variant")
        return baseline, candidate

    def _suite(self, name: str) -> tuple[list[str], str, np.ndarray]:
        if self.suite_inputs is None:
            raise BackendUnavailable("eval suites are not available to the drift monitor on this server")
        inputs, system = self.suite_inputs(name)
        if not inputs:
            raise InvalidRequest(f"suite {name!r} has no case with an input text to compare with", param="suite")
        cached = self._suite_cache.get(name)
        if cached is not None and cached[0] == inputs and cached[1] == system:
            return cached
        if self.embed is None:
            raise BackendUnavailable("no embedder: the drift monitor cannot embed the suite's inputs")
        # Rounded through float16 as production questions are stored.
        vectors = np.asarray(self.embed(list(inputs)), dtype=np.float32).astype(np.float16).astype(np.float32)
        self._suite_cache[name] = (inputs, system, vectors)
        return inputs, system, vectors

    def _embeddings(self, cur_rows: Sequence[Features], ref_rows: Sequence[Features], ref_data: dict | None):
        """The sampled embedding matrices of both windows (one dimension: the reference's)."""
        rng = np.random.default_rng(_SEED)
        cap = self.settings.embedding_max_rows
        notes: list[str] = []

        def sample(rows: Sequence[Features]) -> list[Features]:
            have = [f for f in rows if f.embedding]
            if len(have) > cap:
                have = [have[i] for i in sorted(rng.choice(len(have), cap, replace=False))]
            return have

        if ref_data is not None:
            ref = ref_data["_embeddings"]
            if len(ref) > cap:
                ref = ref[np.sort(rng.choice(len(ref), cap, replace=False))]
        else:
            ref_list = sample(ref_rows)
            ref = _stack(ref_list)
        cur = _stack(sample(cur_rows))
        if len(ref) and len(cur) and ref.shape[1] != cur.shape[1]:
            notes.append(f"the windows' embeddings differ in size ({ref.shape[1]} vs {cur.shape[1]}): the embedding "
                         "model changed between them, so the embedding checks did not run")
            return np.zeros((0, 1)), np.zeros((0, 1)), notes
        return cur, ref, notes

    # -- output -----------------------------------------------------------------------------------------------

    def _write_report(self, result: DriftResult, widgets: list[Any]) -> Path:
        self.reports_dir.mkdir(parents=True, exist_ok=True)
        path = self.reports_dir / f"{result.id}.html"
        html = _render_html(result, widgets)
        tmp = path.with_suffix(".html.tmp")
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, path)
        self._prune_reports()
        return path

    def _prune_reports(self) -> None:
        reports = sorted(self.reports_dir.glob("drift-*.html"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in reports[self.settings.keep_reports:]:
            with contextlib.suppress(OSError):
                old.unlink()

    def _export(self, result: DriftResult) -> None:
        m = self.metrics
        if m is None:
            return
        m.drift_runs.labels(result.verdict).inc()
        m.drift_last_run.set(result.created)
        if result.verdict == "not_enough_data":
            return  # the last verdict's gauges stand until a check can tell
        m.drift_detected.clear()
        for c in result.checks:
            if c.state != "skipped":
                m.drift_detected.labels(c.name).set(1 if c.drifted else 0)
        m.drift_share.set(result.drift_share or 0.0)

    def _yield_gauges(self) -> None:
        """Another process ran this round's check: this one's verdict is older, so it leaves the gauges (which
        alerts read as the max over processes) to that one's."""
        if self.metrics is not None:
            self.metrics.drift_detected.clear()
            self.metrics.drift_share.set(0.0)

    def close(self) -> None:
        """Close the store once a running check has finished (its result is stored, not lost)."""
        with self._lock:
            self.store.close()


# -- building the frames ------------------------------------------------------------------------------------------


def _stack(rows: Sequence[Features]) -> np.ndarray:
    if not rows:
        return np.zeros((0, 1), dtype=np.float32)
    dims: dict[int, int] = {}
    for f in rows:
        dims[len(f.embedding or b"")] = dims.get(len(f.embedding or b""), 0) + 1
    size = max(dims, key=dims.__getitem__)  # one embedding model: the most common size
    return np.stack([f.vector() for f in rows if len(f.embedding or b"") == size])


def _columns(rows: Sequence[Features], no_good_score: float,
             scores: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """One float array per check (NaN: the row has no value for it), guard validators as ``guard:<name>``;
    ``scores``: the ratings of the rated answers by id (None: no feedback source, no such column)."""
    nan = float("nan")
    ok = [f.outcome == "ok" for f in rows]
    out: dict[str, np.ndarray] = {
        "question_length": np.array([f.question_chars for f in rows], dtype=float),
        "input_length": np.array([f.input_chars for f in rows], dtype=float),
        "top_score": np.array([f.top_score if f.grounded and f.top_score is not None else nan for f in rows],
                              dtype=float),
        "no_good_passage": np.array([(1.0 if f.top_score is None or f.top_score < no_good_score else 0.0)
                                     if f.grounded else nan for f in rows], dtype=float),
        "refusal": np.array([1.0 if f.refused else 0.0 for f in rows], dtype=float),
        "answer_length": np.array([f.answer_chars if k else nan for f, k in zip(rows, ok, strict=True)],
                                  dtype=float),
        "completion_tokens": np.array([f.completion_tokens if k else nan for f, k in zip(rows, ok, strict=True)],
                                      dtype=float),
    }
    if scores is not None:
        out["negative_feedback"] = np.array([nan if f.id not in scores else 1.0 if scores[f.id] < 0.5 else 0.0
                                             for f in rows], dtype=float)
    names = sorted({v for f in rows for v in (f.validators or "").split(",") if v})
    for v in names:
        out[f"guard:{v}"] = np.array([1.0 if v in (f.validators or "").split(",") else 0.0 for f in rows])
    return out


def _guard_columns(cur: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> list[str]:
    return sorted({k for k in (*cur, *ref) if k.startswith("guard:")})


def _count(values: np.ndarray | None) -> int:
    return 0 if values is None else int(np.count_nonzero(~np.isnan(values)))


def _mean(values: np.ndarray | None) -> float | None:
    if values is None or not _count(values):
        return None
    return round(float(np.nanmean(values)), 6)


# -- Evidently ----------------------------------------------------------------------------------------------------


def _evidently():
    os.environ.setdefault("DO_NOT_TRACK", "1")  # before Evidently's first import: no telemetry
    import evidently  # ~9 s the first time

    return evidently


# Evidently's tests that return a p-value (drift below the threshold); the others return a distance (drift above).
_P_VALUE_TESTS = frozenset({"K-S p_value", "chi-square p_value", "Z-test p_value", "Total-Variation-Distance",
                            "Anderson-Darling", "Cramer-von Mises", "Epps-Singleton", "Fisher's Exact test", "g_test",
                            "Mann-Whitney U-rank test", "t_test",  # and their names in monitor.methods:
                            "ks", "chisquare", "z", "TVD", "anderson", "cramer_von_mises", "es", "fisher_exact",
                            "mannw"})


def _statistic_kind(method: str) -> str:
    return "p_value" if method in _P_VALUE_TESTS or "p_value" in method else "distance"


def _run_checks(cur: dict[str, np.ndarray], ref: dict[str, np.ndarray], cur_emb: np.ndarray, ref_emb: np.ndarray,
                settings: MonitorSettings, min_rows: int, *, suite: bool) -> tuple[list[CheckResult], list[Any]]:
    """Every check's result, in the documented order, and the Evidently widgets of the report."""
    _evidently()
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift, ValueDrift

    guards = _guard_columns(cur, ref)
    for g in guards:  # a validator that never acted in a window: all zeros there
        cur.setdefault(g, np.zeros(len(cur["question_length"])))
        if not suite:
            ref.setdefault(g, np.zeros(len(ref["question_length"])))
    order = [EMBEDDING, TOPICS, "question_length", "input_length", "top_score", "no_good_passage", "refusal",
             *(["negative_feedback"] if "negative_feedback" in cur else []), *guards, "answer_length",
             "completion_tokens"]
    checks: dict[str, CheckResult] = {}
    widgets: list[Any] = []

    # Scalar columns: one report over every row of both windows.
    runnable: list[str] = []
    for name in order[2:]:
        kind = "numerical" if name in NUMERICAL else "categorical"
        c = checks[name] = CheckResult(name, kind, "skipped", current_rows=_count(cur.get(name)),
                                       reference_rows=_count(ref.get(name)), current_value=_mean(cur.get(name)),
                                       reference_value=_mean(ref.get(name)))
        if suite and name not in SUITE_CHECKS:
            c.note = "an eval suite's inputs have no such value"
        elif c.current_rows < min_rows or c.reference_rows < min_rows:
            c.note = (f"not enough data ({c.current_rows} current, {c.reference_rows} reference values; "
                      f"{min_rows} needed)")
        else:
            runnable.append(name)
    if runnable:
        size = len(next(iter(cur.values())))

        def frame(cols: dict[str, np.ndarray], n: int) -> pd.DataFrame:
            return pd.DataFrame({k: cols[k] if k in cols else np.zeros(n) for k in runnable})

        ref_n = len(ref["question_length"])
        definition = DataDefinition(numerical_columns=[n for n in runnable if n in NUMERICAL],
                                    categorical_columns=[n for n in runnable if n not in NUMERICAL])
        metrics = [ValueDrift(column=n, method=settings.methods.get(n), threshold=settings.thresholds.get(n))
                   for n in runnable]
        snapshot = _run(Report(metrics, include_tests=True), Dataset, definition, frame(cur, size), frame(ref, ref_n))
        _read_value_drift(snapshot, checks)
        widgets += _widgets(snapshot)

    # Embeddings: PCA fit on the reference, the domain classifier, and the k-means topic mix.
    emb = checks[EMBEDDING] = CheckResult(EMBEDDING, "embedding", "skipped", current_rows=len(cur_emb),
                                          reference_rows=len(ref_emb))
    topic = checks[TOPICS] = CheckResult(TOPICS, "categorical", "skipped", current_rows=len(cur_emb),
                                         reference_rows=len(ref_emb))
    if len(cur_emb) < min_rows or len(ref_emb) < min_rows:
        emb.note = topic.note = (f"not enough embedded questions ({len(cur_emb)} current, {len(ref_emb)} reference; "
                                 f"{min_rows} needed; monitor.embed_sample keeps them)")
    else:
        widgets += _embedding_checks(cur_emb, ref_emb, emb, topic, settings, pd, Dataset, DataDefinition, Report,
                                     EmbeddingsDrift, ValueDrift)
    return [checks[n] for n in order], widgets


def _run(report: Any, dataset: Any, definition: Any, current: Any, reference: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas/scipy chatter about small samples
        return report.run(dataset.from_pandas(current, data_definition=definition),
                          dataset.from_pandas(reference, data_definition=definition))


def _read_value_drift(snapshot: Any, checks: dict[str, CheckResult]) -> None:
    """Scores from the metrics, drift and the resolved method/threshold from each ValueDrift's test."""
    data = snapshot.dict()
    by_id = {m["id"]: m for m in data["metrics"]}
    for test in data["tests"]:
        cfg = test["metric_config"]
        params = cfg["params"]
        c = checks.get(params.get("column"))
        if c is None:
            continue
        status = getattr(test["status"], "value", test["status"])
        method = str(params.get("method"))
        c.method, c.threshold = method, params.get("threshold")
        c.statistic = _float(by_id.get(cfg["metric_id"], {}).get("value"))
        c.statistic_kind = _statistic_kind(method)
        c.drifted = str(status).upper().endswith("FAIL")
        c.state = "drift" if c.drifted else "ok"


def _float(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return round(v, 8) if np.isfinite(v) else None


def _embedding_checks(cur_emb: np.ndarray, ref_emb: np.ndarray, emb: CheckResult, topic: CheckResult,
                      settings: MonitorSettings, pd: Any, Dataset: Any, DataDefinition: Any, Report: Any,
                      EmbeddingsDrift: Any, ValueDrift: Any) -> list[Any]:
    import evidently.legacy.metrics.data_drift.embeddings_drift as evidently_embeddings
    from evidently.metrics.embeddings import ModelDriftMethod
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    # PCA fit on both windows together: blind to which window a row is from, so it does not bias the test, and it
    # keeps the directions a new topic adds. Fit on the reference alone it drops exactly those (measured on MiniLM
    # embeddings of 60 corpus vs 60 Python-stdlib questions: classifier AUC 0.57-0.72, pooled 0.96-0.99; two
    # samples of the corpus questions 0.47-0.55 either way).
    k = max(2, min(settings.embedding_components, len(ref_emb) + len(cur_emb) - 1, ref_emb.shape[1]))
    pca = PCA(n_components=k, random_state=_SEED).fit(np.vstack([ref_emb, cur_emb]))
    cols = [f"pc{i}" for i in range(k)]
    ref_pc = pd.DataFrame(pca.transform(ref_emb), columns=cols)
    cur_pc = pd.DataFrame(pca.transform(cur_emb), columns=cols)
    clusters = max(2, min(settings.clusters, len(ref_emb) // 10))
    model = KMeans(n_clusters=clusters, n_init=3, random_state=_SEED).fit(_unit(ref_emb))
    ref_pc["topic"] = [f"t{i}" for i in model.predict(_unit(ref_emb))]
    cur_pc["topic"] = [f"t{i}" for i in model.predict(_unit(cur_emb))]

    # Evidently's own rule (its default method): under 1000 reference rows the AUC must beat the 95th percentile of
    # a random classifier's AUC on the same held-out half (bootstrap), above it a fixed effect size. The bootstrap
    # threshold is computed once here and handed to the method, which then decides exactly as with bootstrap=True.
    bootstrap = len(ref_emb) < 1000
    threshold = (_bootstrap_threshold(len(ref_emb), len(cur_emb)) if bootstrap
                 else settings.embedding_auc_threshold)
    method = ModelDriftMethod(threshold=threshold, bootstrap=False)
    score, drifted, _ = method(cur_pc[cols].copy(), ref_pc[cols].copy())
    emb.method = (f"Evidently EmbeddingsDrift: domain classifier ROC AUC on {k} PCA components"
                  + (" (bootstrap: above a random classifier's 95th percentile)" if bootstrap else ""))
    emb.statistic, emb.statistic_kind = _float(score), "roc_auc"
    emb.threshold = round(threshold, 6)
    emb.drifted = bool(drifted)
    emb.state = "drift" if emb.drifted else "ok"
    emb.note = f"explained variance of the components: {float(pca.explained_variance_ratio_.sum()):.2f}"

    definition = DataDefinition(categorical_columns=["topic"], embeddings={EMBEDDING: cols})
    # Evidently's default for a categorical column of a small reference is its chi-square goodness-of-fit test,
    # which takes the reference's shares as exact: with two samples of one size it flags ~40% of identical
    # 8-topic mixes. Its TVD test (a permutation test of the total variation distance) is a two-sample test.
    topic_method = settings.methods.get(TOPICS) or ("TVD" if len(ref_emb) <= 1000 else None)
    topic_threshold = settings.thresholds.get(TOPICS) or (0.05 if topic_method == "TVD" else None)
    report = Report([EmbeddingsDrift(embeddings_name=EMBEDDING, drift_method=method),
                     ValueDrift(column="topic", method=topic_method, threshold=topic_threshold)], include_tests=True)
    with _projection(evidently_embeddings, settings.report_points):
        snapshot = _run(report, Dataset, definition, cur_pc, ref_pc)
    _read_value_drift(snapshot, {"topic": topic})
    topic.note = f"{clusters} k-means topics fit on the reference embeddings"
    return _widgets(snapshot)


class _Pca2d:
    """Stands in for t-SNE in the report's picture of the embeddings: a 2-D PCA projection. Evidently's t-SNE (1000
    iterations) took 2 to 15 s for 500 points on 2 cores, varying with the data; this takes milliseconds."""

    def __init__(self, n_components: int = 2, **_: Any) -> None:
        self.n_components = n_components

    def fit_transform(self, x: Any) -> np.ndarray:
        from sklearn.decomposition import PCA

        return PCA(n_components=self.n_components, random_state=_SEED).fit_transform(np.asarray(x, dtype=float))


_PATCH = threading.Lock()


@contextlib.contextmanager
def _projection(module: Any, points: int):
    """The report's embedding picture: ``points`` per window (Evidently's module constant, 2500 by default) in a
    2-D PCA projection instead of t-SNE; Evidently's module globals are restored afterwards. Only the picture
    changes: the drift score comes from the drift method, not from the projection."""
    with _PATCH:
        saved = module.SAMPLE_CONSTANT, module.TSNE
        module.SAMPLE_CONSTANT, module.TSNE = points, _Pca2d
        try:
            yield
        finally:
            module.SAMPLE_CONSTANT, module.TSNE = saved


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _bootstrap_threshold(n_ref: int, n_cur: int) -> float:
    """The AUC Evidently's bootstrapped domain classifier had to beat: the 95th percentile of a random
    classifier's AUC on the same held-out half (its split is seeded, so it is reproduced exactly)."""
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import calc_roc_auc_random
    from sklearn.model_selection import train_test_split

    y = np.r_[np.ones(n_ref, dtype=int), np.zeros(n_cur, dtype=int)]
    *_, y_test = train_test_split(np.zeros((len(y), 1)), y, test_size=0.5, random_state=42, shuffle=True)
    return float(np.percentile([calc_roc_auc_random(y_test, i) for i in range(100)], 95))


def _widgets(snapshot: Any) -> list[Any]:
    # Evidently 0.7.23 keeps a run's rendered widgets here; the two runs of a check share one HTML page.
    return list(getattr(snapshot, "_widgets", []))


def _render_html(result: DriftResult, widgets: list[Any]) -> str:
    from evidently.core.metric_types import render_widgets
    from evidently.legacy.renderers.html_widgets import CounterData, counter, group_widget, table_data

    def when(ts: Any) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + " UTC" if ts else "-"

    def fmt(x: Any) -> str:
        return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)

    cur, ref = result.current, result.reference
    ref_text = {"window": f"window {when(ref.get('since'))} .. {when(ref.get('until'))}",
                "suite": f"eval suite {ref.get('suite')}",
                "release": f"release {ref.get('release')} arm {ref.get('variant')} ({ref.get('compare')})"}[ref["kind"]]
    arm = f" (release {cur['release']}, arm {cur['variant']})" if cur.get("release") else ""
    header = counter(title=f"Keel drift check {result.id}, {when(result.created)}", counters=[
        CounterData("verdict", result.verdict.replace("_", " ")),
        CounterData(f"checks drifted (share {fmt(result.drift_share)}; verdict at {result.settings['drift_share']})",
                    f"{len(result.drifted_checks)} of {sum(c.state != 'skipped' for c in result.checks)}"),
        CounterData(f"current: {when(cur['since'])} .. {when(cur['until'])}{arm}", f"{cur['rows']} rows"),
        CounterData(f"reference: {ref_text}", f"{ref['rows']} rows"),
    ])
    table = table_data(
        title="Checks",
        column_names=["check", "state", "method", "statistic", "threshold", "reference", "current", "note"],
        data=[[c.name, c.state, c.method or "-", fmt(c.statistic), fmt(c.threshold), fmt(c.reference_value),
               fmt(c.current_value), c.note] for c in result.checks])
    return render_widgets([group_widget(title="", widgets=[header, table, *widgets])], as_iframe=False)


def _summary(result: DriftResult) -> str:
    if result.verdict == "not_enough_data":
        return f"not enough data ({result.current['rows']} current rows, {result.reference['rows']} reference rows)"
    ran = sum(c.state != "skipped" for c in result.checks)
    drifted = ", ".join(result.drifted_checks) or "none"
    return f"{result.verdict}: {len(result.drifted_checks)} of {ran} checks drifted ({drifted})"


# -- assembly ---------------------------------------------------------------------------------------------------------


def suite_loader(suites_dir: Path) -> SuiteInputs:
    """A suite's case inputs and system prompt, by name, from the suites folders (``evals.suites_dir`` and the
    shipped ones); an unknown or invalid suite is the caller's mistake (400/404)."""

    def inputs(name: str) -> tuple[list[str], str]:
        from evals.suite import SuiteError, find_named_suite, load_suite, suite_dirs

        try:
            suite = load_suite(find_named_suite(name, suites_dir), roots=suite_dirs(suites_dir))
        except SuiteError as e:
            if str(e).startswith("no suite"):
                raise NotFound(f"{e}; name one of the suites there (keel eval list)", param="suite",
                               code="suite_not_found") from None
            raise InvalidRequest(str(e), param="suite") from None
        return [c.input for c in suite.cases if c.input.strip()], suite.target.system or ""

    return inputs


def build_monitor(settings: Any, lineage_store: LineageStore, metrics: Any, embedder: Any, *,
                  releases: Any = None, flush: Callable[[], None] | None = None) -> DriftMonitor:
    """The container's drift monitor: ``settings`` the whole tree (``monitor``, ``home``, ``evals.suites_dir``);
    ``embedder`` the RAG embedder (``embed_documents``) that embeds the questions' drift features, or None;
    ``releases`` the release service (optional: names a release's arms); ``flush`` the lineage recorder's."""
    embed = getattr(embedder, "embed_documents", embedder) if embedder is not None else None
    return DriftMonitor(settings.monitor, lineage_store, open_drift_store(settings),
                        home=Path(settings.home), metrics=metrics, embed=embed,
                        suite_inputs=suite_loader(Path(settings.evals.suites_dir)), releases=releases, flush=flush,
                        feedback=releases.store.scores_for if releases is not None else None)
