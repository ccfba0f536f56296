"""Releases as a service: create and steer them, route each request to a variant, record what it served,
and let the controller move canaries.

What an endpoint serves is decided in the routing table (:mod:`app.llm.routing`), like every other decision about
what serves traffic: each change of a release's weights (its start, a canary step, a promotion, a rollback, a
blue/green switch) is written there as the endpoint's *split*, audited in the ``routing`` trail, after the
release's own transition (which keeps the plan, the state machine and the measurements). Requests are assigned by
the split; a release whose split is not written yet (a process that died between the two writes) is reconciled by
:meth:`ReleaseService.reconcile`, which every process runs on start and the controller on every tick — the way a
rollout controller keeps its traffic router's weights in line with the rollout.

Every process holds the current releases in memory and re-reads them when the release store's or the routing
table's revision moved, at most every ``check_interval_s`` and never on the request path (a background thread
does it), so a decision made by one process (or the CLI) is served by all within about that interval.
Observations are buffered and written in batches off the request path.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from app.core.audit import BufferedWriter
from app.core.db import ThrottledRefresh
from app.core.errors import Conflict, InvalidRequest, KeelError, StoreUnavailable
from app.llm.routing import RoutingTable, memory_table
from lifecycle.releases import controller
from lifecycle.releases.assign import layout, pick, ranges
from lifecycle.releases.spec import ReleaseSpec, VariantSpec
from lifecycle.releases.store import (
    FINISHED,
    Decision,
    JudgeScore,
    Observation,
    Release,
    ShadowPair,
    SqliteReleaseStore,
)

log = logging.getLogger("keel.releases")

#: Raises InvalidRequest when a variant names something this server lacks (alias, prompt, policy, workflow).
VariantCheck = Callable[[VariantSpec], None]
#: The eval gates' verdict on a variant's artifacts: (passed, reason); None when nothing in it is gated.
VariantGate = Callable[[VariantSpec], "tuple[bool, str] | None"]
#: Is this name taken by something else clients call as a model (an alias)?
NameTaken = Callable[[str], bool]
#: Raises ValueError when this server cannot judge live answers with the metric.
JudgeCheck = Callable[[str], None]


def owner_of(endpoint: str) -> str:
    """The routing table's owner of a release endpoint's split."""
    return f"release:{endpoint}"


@dataclass(frozen=True, slots=True)
class Assignment:
    release: Release
    variant: VariantSpec
    unit: str  # digest of the unit value


class ReleaseService:
    def __init__(self, store: SqliteReleaseStore | Any, *, check_interval_s: float = 1.0,
                 check_variant: VariantCheck | None = None, gate: VariantGate | None = None,
                 name_taken: NameTaken | None = None, check_judge: JudgeCheck | None = None,
                 flush_interval_s: float = 0.2, routes: RoutingTable | None = None) -> None:
        """``routes``: the routing table the endpoints' splits are written to and served from (an in-memory one,
        closed with the service, when omitted: tests)."""
        self.store = store
        self.routes = routes if routes is not None else memory_table({}, {})
        self._owns_routes = routes is None
        self.check_variant = check_variant or (lambda v: None)
        self.gate = gate or (lambda v: None)
        self.name_taken = name_taken or (lambda n: False)
        self.check_judge = check_judge
        self._releases: dict[str, Release] = {}
        self._tables: dict[tuple[int, tuple[tuple[str, float], ...]], tuple[list[str], list[tuple[float, float]],
                                                                            dict]] = {}
        self._revision: tuple[int, int] = (-1, -1)
        self._unpublished: set[tuple[str, int]] = set()
        self._refresh = ThrottledRefresh(check_interval_s, self._check, name="keel-releases-refresh")
        self._observations: BufferedWriter[Observation] = BufferedWriter(
            store.record, interval_s=flush_interval_s, name="keel-release-observations", what="release observations")
        self._pairs: BufferedWriter[ShadowPair] = BufferedWriter(
            store.record_pairs, interval_s=flush_interval_s, name="keel-shadow-pairs", what="shadow answers")
        self._scores: BufferedWriter[JudgeScore] = BufferedWriter(
            store.record_scores, interval_s=flush_interval_s, name="keel-judge-scores", what="online judge scores")
        self.reconcile()
        self.refresh(force=True)

    # -- the request path ----------------------------------------------------------------------------

    def active(self, model: str | None) -> Release | None:
        """The release behind the endpoint ``model``, if any (finished releases still route to their outcome),
        with the weights its split in the routing table serves."""
        if not model:
            return None
        self.refresh()
        return self._releases.get(model)

    def names(self) -> list[str]:
        self.refresh()
        return sorted(self._releases)

    def assign(self, release: Release, unit: str) -> Assignment:
        """The variant serving ``unit``: the same unit, the same variant, in every process, until weights move."""
        key = (release.id, tuple(release.weights.items()))
        table = self._tables.get(key)
        if table is None:  # the layout and bucket ranges change only with the weights served
            spec = release.spec
            order = [v.name for v in spec.variants]
            if spec.strategy != "ab":
                order = layout(order, spec.baseline, spec.candidate)
            if len(self._tables) > 256:
                self._tables.clear()
            table = self._tables[key] = (order, ranges(order, release.weights),
                                         {v.name: v for v in spec.variants})
        order, rng, variants = table
        name = pick(release.seed, unit, order, rng, release.weights)
        digest = hashlib.blake2b(unit.encode(), digest_size=8).hexdigest()
        return Assignment(release, variants[name], digest)

    def observe(self, observation: Observation) -> None:
        self._observations.submit([observation])

    def record_shadow(self, pair: ShadowPair) -> None:
        self._pairs.submit([pair])

    def record_score(self, score: JudgeScore) -> None:
        self._scores.submit([score])

    def flush(self, timeout: float | None = 10.0) -> None:
        for writer in (self._observations, self._pairs, self._scores):
            writer.flush(timeout)

    # -- cache -----------------------------------------------------------------------------------------

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the releases when the store's revision moved, at most every ``check_interval_s``, never
        waiting on the store on the request path (:class:`app.core.db.ThrottledRefresh`)."""
        self._refresh(force=force)

    def _check(self, force: bool) -> None:
        try:
            revision = (self.store.revision(), self.routes.catch_up())
            if not force and revision == self._revision:
                return
            # read after the revisions: a later change is re-read next time
            releases, splits = self.store.current(), self.routes.splits()
        except StoreUnavailable as e:
            if force:
                raise
            log.warning("releases not refreshed (serving revisions %s): %s", self._revision, e.message)
            return
        served = {}
        for name, release in releases.items():
            split = splits.get(name)
            if split is not None and split.release_id != release.id:
                # a new release whose split is not written yet: the endpoint serves the one the split names
                release = self._release(name, split.release_id)
            if split is not None and release is not None:
                served[name] = replace(release, weights=split.weights)
            elif split is None and (name, release.revision) not in self._unpublished:
                self._unpublished.add((name, release.revision))
                log.warning("release %s (id %d) has no split in the routing table yet: not served until it is "
                            "reconciled", name, release.id)
        self._releases = served
        self._revision = revision

    def _release(self, name: str, release_id: int) -> Release | None:
        held = self._releases.get(name)
        if held is not None and held.id == release_id:
            return held
        try:
            return self.store.by_id(release_id)
        except KeelError as e:
            log.warning("release %s: the split names release %d, which cannot be read: %s", name, release_id,
                        e.message)
            return None

    def reconcile(self) -> list[str]:
        """Write the split of every release whose routing-table split lags its state (a process that died between
        the release's transition and the split's write, a release store written by an earlier version); returns
        the endpoints written. Safe anywhere, any time: a split never goes back to an older state."""
        written = []
        for name, release in self.store.current().items():
            split = self.routes.split(name)
            if split is None or split.behind(release.id, release.revision, release.weights):
                self._publish(release, actor="controller", reason="reconciled with the release's state")
                written.append(name)
        return written

    def _publish(self, release: Release, *, actor: str, reason: str) -> None:
        try:
            self.routes.set_split(release.name, release.weights, owner=owner_of(release.name),
                                  release_id=release.id, release_revision=release.revision,
                                  actor=actor or "controller", reason=reason)
        except StoreUnavailable as e:
            # The decision stands (it is the release's state); the traffic follows at the next reconcile.
            log.warning("release %s: its split was not written to the routing table (%s); the controller's next "
                        "tick writes it", release.name, e.message)
        except Conflict as e:
            # The endpoint's name was taken by a model alias meanwhile (another process's deploy, or the settings
            # of an upgraded process): this release cannot serve until the alias goes; the others go on.
            log.error("release %s: its split cannot be written: %s", release.name, e.message)

    # -- changes ---------------------------------------------------------------------------------------

    def create(self, spec: ReleaseSpec, *, actor: str, reason: str = "", override_reason: str | None = None) -> Release:
        """Start ``spec``. Every variant must name what exists here, the endpoint may not shadow a model alias,
        and every artifact of a canary's (or green's) variant (prompt, documents, workflow, policy) must have
        passed its eval gate; an admin may override a gate failure with a reason, which is recorded."""
        if self.name_taken(spec.name):
            raise Conflict(f"{spec.name!r} is already a model name clients call; a release endpoint needs a name "
                           "of its own", param="name", code="release_name_taken")
        for v in spec.variants:
            self.check_variant(v)
        if spec.judge is not None:
            if self.check_judge is None:
                raise InvalidRequest("this server cannot judge live answers (no eval metrics)", param="judge")
            try:
                self.check_judge(spec.judge.metric)
            except ValueError as e:
                raise InvalidRequest(f"judge: {e}", param="judge", code="unknown_metric") from None
        note = reason
        if spec.strategy in ("canary", "bluegreen"):
            verdict = self.gate(spec.candidate_spec)
            if verdict is not None and not verdict[0]:
                if not (override_reason and override_reason.strip()):
                    raise InvalidRequest(f"variant {spec.candidate!r} has not passed its eval gate: {verdict[1]}. "
                                         "Run its suites on exactly what it names, or have an admin override "
                                         "with a reason", param="variants", code="gate_failed")
                note = f"{reason + '; ' if reason else ''}gate overridden by {actor}: {override_reason.strip()}"
            elif verdict is not None:
                note = f"{reason + '; ' if reason else ''}gate: {verdict[1]}"
        release = self.store.create(spec, actor=actor, reason=note)
        self._publish(release, actor=actor, reason=f"create: {note}" if note else "create")
        self.refresh(force=True)
        log.info("release %s (%s) created by %s: %s", spec.name, spec.strategy, actor,
                 ", ".join(f"{k}={v:g}%" for k, v in release.weights.items()))
        return release

    def get(self, name: str) -> Release:
        return self.store.get(name)

    def pause(self, name: str, *, actor: str, reason: str = "") -> Release:
        release = self._running(name, "pause")
        if release.status == "paused":
            return release
        return self._apply(release, "pause", status="paused", reason=reason or "paused", actor=actor)

    def resume(self, name: str, *, actor: str, reason: str = "") -> Release:
        release = self._running(name, "resume")
        if release.status == "running":
            return release
        return self._apply(release, "resume", status="running", reason=reason or "resumed", actor=actor)

    def promote(self, name: str, *, actor: str, reason: str = "", variant: str | None = None) -> Release:
        """All traffic to ``variant`` (default: the candidate), now. For blue/green this is the switch: call it
        after the readiness probe (:meth:`lifecycle.releases.serving.ReleaseGateway.switch` does both)."""
        release = self._running(name, "promote")
        target = variant or release.spec.candidate
        if target not in {v.name for v in release.spec.variants}:
            raise InvalidRequest(f"release {name!r} has no variant {target!r}", param="variant")
        weights = {v.name: 100.0 if v.name == target else 0.0 for v in release.spec.variants}
        return self._apply(release, "promote", status="promoted", weights=weights,
                           reason=reason or f"{target} promoted by {actor}", actor=actor)

    def rollback(self, name: str, *, actor: str, reason: str = "") -> Release:
        """All traffic back to the baseline, now; allowed after a promotion too (blue/green's instant rollback)."""
        release = self.store.get(name)
        if release.status in ("rolled_back", "stopped"):
            return release
        baseline = release.spec.baseline
        weights = {v.name: 100.0 if v.name == baseline else 0.0 for v in release.spec.variants}
        return self._apply(release, "rollback", status="rolled_back", weights=weights,
                           reason=reason or f"rolled back by {actor}", actor=actor)

    def _running(self, name: str, what: str) -> Release:
        release = self.store.get(name)
        if release.status in FINISHED:
            raise Conflict(f"release {name!r} is {release.status}; it cannot {what} any more (create a new release)",
                           param="name", code="release_finished")
        return release

    def _apply(self, release: Release, action: str, *, actor: str, reason: str, status: str | None = None,
               weights: dict[str, float] | None = None, step: int | None = None) -> Release:
        decision = Decision(action, reason, time.time(), actor, release.step if step is None else step)
        new = self.store.transition(release, status=status, weights=weights, step=step, decision=decision)
        if new is None:
            raise Conflict(f"release {release.name!r} changed while this was decided; read it again and retry",
                           param="name", code="release_changed")
        self._publish(new, actor=actor, reason=f"{action}: {reason}")
        self.refresh(force=True)
        log.info("release %s: %s by %s (%s)", release.name, action, actor or "controller", reason)
        return new

    # -- the controller ---------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[tuple[str, str, str]]:
        """Judge every running canary and A/B test once; returns the changes made (name, action, reason).
        Safe in every process at once: a decision lands only on the revision it was made on."""
        now = time.time() if now is None else now
        self.flush(5.0)
        reconciled = self.reconcile()
        changes: list[tuple[str, str, str]] = []
        for release in self.store.current().values():
            if release.finished or release.spec.strategy not in ("canary", "ab"):
                continue
            totals = self.store.totals(release)
            if release.spec.strategy == "canary":
                verdict = controller.judge_canary(release, totals, now)
            else:
                verdict = controller.judge_ab(release, totals)
            if verdict.action == "hold":
                if release.note != verdict.reason:
                    # why it holds is visible (CLI, page) without an audit row per tick
                    self.store.note(release, verdict.reason)
                continue
            status, weights, step = _effect(release, verdict.action)
            decision = Decision(verdict.action, verdict.reason, now, "controller", release.step if step is None
                                else step)
            new = self.store.transition(release, status=status, weights=weights, step=step, decision=decision,
                                        now=now)
            if new is not None:
                self._publish(new, actor="controller", reason=f"{verdict.action}: {verdict.reason}")
                changes.append((release.name, verdict.action, verdict.reason))
                log.info("release %s: %s: %s", release.name, verdict.action, verdict.reason)
        if changes or reconciled:
            self.refresh(force=True)
        return changes

    # -- reading ------------------------------------------------------------------------------------------

    def report(self, name: str) -> dict[str, Any]:
        """Everything a person needs to judge a release: state, traffic, numbers per variant, the comparisons
        and the decisions so far."""
        self.flush(5.0)
        release = self.store.get(name)
        totals = self.store.totals(release)
        lat = self.store.latencies(release.id)
        spec = release.spec
        variants = {}
        for v in spec.variants:
            t = totals.get(v.name)
            lats, ttfts = lat.get(v.name, ([], []))
            m = t.metrics if t else {}
            variants[v.name] = {
                **v.model_dump(exclude_none=True), "weight": release.weights.get(v.name, 0.0),
                "requests": t.requests if t else 0, "units": t.units if t else 0,
                "errors": int(m["errors"].total) if t else 0,
                "error_rate": _rate(m.get("errors")), "guardrail_blocks": int(m["guardrail_blocks"].total) if t else 0,
                "block_rate": _rate(m.get("guardrail_blocks")),
                "redaction_rate": _rate(m.get("guardrail_redactions")),
                "feedback": {"rated": m["negative_feedback"].n if t else 0,
                             "negative": int(m["negative_feedback"].total) if t else 0,
                             "negative_rate": _rate(m.get("negative_feedback"))},
                "latency_ms": _percentiles(lats), "ttft_ms": _percentiles(ttfts),
                "judge": {"metric": spec.judge.metric if spec.judge else None,
                          "scored": m["judge_score"].n if t else 0,
                          "mean": _rate(m.get("judge_score"))},
                "prompt_tokens": t.prompt_tokens if t else 0, "completion_tokens": t.completion_tokens if t else 0,
            }
        out: dict[str, Any] = {**public(release), "variants": variants}
        others = [v.name for v in spec.variants if v.name != spec.baseline]
        out["comparisons"] = {o: {k: _comparison(c) for k, c in controller.comparisons(
            spec, totals, spec.baseline, o).items()} for o in others}
        check = controller.sample_ratio(release, totals)
        out["sample_ratio"] = None if check is None else {"p_value": check.p_value, "mismatch": check.mismatch,
                                                          "reason": check.reason}
        if spec.strategy == "shadow":
            out["shadow"] = self.store.shadow_totals(release.id)
        out["decisions"] = [{"at": e.at, "action": e.action.removeprefix("release."), "actor": e.actor,
                             "reason": e.reason, "from": e.from_ref, "to": e.to_ref, **dict(e.details)}
                            for e in self.store.decisions(name, limit=100)]
        return out

    def close(self) -> None:
        for writer in (self._observations, self._pairs, self._scores):
            try:
                writer.close(10.0)
            except Exception:
                log.exception("closing %s", writer.name)
        self.store.close()
        if self._owns_routes:
            self.routes.close()


def _effect(release: Release, action: str) -> tuple[str | None, dict[str, float] | None, int | None]:
    spec = release.spec
    if action == "advance":
        step = release.step + 1
        return None, controller.weights_at(spec, step), step
    if action == "promote":
        return "promoted", {spec.baseline: 0.0, spec.candidate: 100.0}, len(spec.canary.steps) - 1
    if action in ("rollback", "stop"):
        return ("rolled_back" if action == "rollback" else "stopped"), {
            v.name: 100.0 if v.name == spec.baseline else 0.0 for v in spec.variants}, None
    raise ValueError(action)


def public(release: Release) -> dict[str, Any]:
    spec = release.spec
    out = {"id": release.id, "name": release.name, "strategy": spec.strategy, "status": release.status,
           "unit": spec.unit, "baseline": spec.baseline, "candidate": spec.candidate, "weights": release.weights,
           "step": release.step, "step_started_at": release.step_started_at,
           "decision": release.decision.public() if release.decision else None, "note": release.note,
           "ready": controller.is_ready(release),
           "created_by": release.created_by,
           "created_at": release.created_at, "updated_at": release.updated_at, "revision": release.revision,
           "spec_hash": spec.content_hash(), "spec": spec.model_dump(mode="json")}
    if spec.strategy == "canary":
        out["steps"] = spec.canary.steps
    return out


def _rate(m: Any) -> float | None:
    return m.total / m.n if m is not None and m.n else None


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(np.asarray(values), [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def _comparison(c: Any) -> dict[str, Any]:
    return {"state": c.state, "diff": c.diff, "diff_ci": [c.diff_ci.low, c.diff_ci.high] if c.diff_ci else None,
            "control_ci": [c.control_ci.low, c.control_ci.high] if c.control_ci else None,
            "treatment_ci": [c.treatment_ci.low, c.treatment_ci.high] if c.treatment_ci else None,
            "reason": c.reason}
