"""The promotion gate: a protected prompt label moves to a version only with a passing eval run of
exactly that version (same name, version and content hash).

Plug it into the registry (the container does this when ``settings.evals.gate_enabled``)::

    registry.set_gate(prompt_gate(open_eval_store(settings), registry))

Generic over artifact kinds: :func:`artifact_verdict` takes the runs bound to any artifact and
the identity field that must match. ``finetune.gate.adapter_gate`` reuses it for fine-tuned LoRA
adapters; :func:`rag_gate`, :func:`workflow_gate` and :func:`policy_gate` for what else a release variant
may change (a canary starts only once each passed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prompts.registry import GateVerdict

if TYPE_CHECKING:
    from evals.store import EvalStoreBase, RunRow
    from prompts.registry import PromptRegistry

_RUN_FIRST = "run `keel eval run <suite>` on this version first"


def artifact_verdict(artifact: str, runs: Sequence[RunRow], *, content_hash: str | None,
                     hash_of: Callable[[RunRow], str | None], required_suites: Sequence[str] = (),
                     max_age: timedelta | None = None, how_to_fix: str = _RUN_FIRST) -> GateVerdict:
    """Pass when, for every required suite (or, with none named, at least one suite), the latest
    completed run on this exact content hash passed. ``runs`` are newest first."""
    fresh = [r for r in runs if content_hash is None or hash_of(r) == content_hash]
    if max_age is not None:
        cutoff = datetime.now(UTC) - max_age
        fresh = [r for r in fresh if r.finished_at and datetime.fromisoformat(r.finished_at) >= cutoff]
    stale = len(runs) - len(fresh)
    if not fresh:
        extra = f" ({stale} run(s) evaluated other content)" if stale else ""
        which = f" for suite(s) {', '.join(required_suites)}" if required_suites else ""
        return GateVerdict(passed=False, reason=f"no completed eval run of {artifact}{which}{extra}; {how_to_fix}",
                           details={"runs": [r.id for r in runs]})
    latest: dict[str, RunRow] = {}
    for r in fresh:
        latest.setdefault(r.suite, r)
    suites = list(required_suites) or list(latest)
    missing = [s for s in suites if s not in latest]
    failed = {s: latest[s] for s in suites if s in latest and not latest[s].passed}
    details = {"runs": {s: r.id for s, r in latest.items()}, "hash": content_hash}
    if missing:
        return GateVerdict(passed=False, reason=f"no eval run of {artifact} for suite(s) {', '.join(missing)}",
                           details=details)
    if failed:
        parts = []
        for s, r in failed.items():
            v = r.verdict or {}
            metrics = ", ".join(v.get("failing_metrics", [])) or "; ".join(v.get("reasons", [])) or "gate failed"
            parts.append(f"{s} ({r.id}) failed: {metrics}")
        return GateVerdict(passed=False, reason="; ".join(parts), details={
            **details, "failing_metrics": {s: (r.verdict or {}).get("failing_metrics", []) for s, r in failed.items()},
            "reasons": {s: (r.verdict or {}).get("reasons", []) for s, r in failed.items()}})
    ok = [s for s in suites if s in latest and latest[s].passed]
    return GateVerdict(passed=True, reason=f"passing eval run(s): {', '.join(f'{s} {latest[s].id}' for s in ok)}",
                       details=details)


def prompt_gate(store: EvalStoreBase, registry: PromptRegistry, *, required_suites: Sequence[str] = (),
                suites_dir: Path | None = None,
                max_age_days: float | None = None) -> Callable[[str, int], GateVerdict]:
    """A :data:`prompts.registry.PromotionGate`: ``gate(name, version) -> GateVerdict``.

    The suites required are ``required_suites`` plus, with ``suites_dir``, every suite in it (or in the
    shipped evals/suites, :func:`evals.suite.suite_dirs`) bound to the
    prompt (``gate.bind``, see :func:`evals.suite.bound_suites`): each needs a passing latest run on this
    exact version (name, version, content hash), of the suite as it is now (its hash), so a run of a
    weakened copy under the same name does not count. With none required, at least one run must exist
    and the latest run of every suite that ran on the version must pass; the reason then says that no
    suite guards the prompt.
    """
    # finetune.gate imports this module, so the CLI loads it on every command
    # lazy: keeps `keel --help` fast: the suite models and metric registry pull numpy, ~0.1 s
    from evals.suite import SuiteError, bound_suites, suite_dirs

    dirs = suite_dirs(suites_dir) if suites_dir is not None else None
    max_age = timedelta(days=max_age_days) if max_age_days is not None else None

    def gate(name: str, version: int) -> GateVerdict:
        content_hash = registry.store.get_version(name, version).hash
        runs = store.prompt_runs(name, version)
        bound: dict[str, str] = {}
        if dirs is not None:
            try:
                bound = bound_suites(name, dirs, registry.protected_labels)
            except SuiteError as e:  # fail closed: an unreadable suite may be the one that guards this prompt
                return GateVerdict(passed=False, reason=f"the gate cannot tell which suites guard {name}: {e}")
        other = {r.id for r in runs if r.suite in bound and r.suite_hash != bound[r.suite]}
        required = list(dict.fromkeys([*required_suites, *bound]))
        verdict = artifact_verdict(f"{name}@{version}", [r for r in runs if r.id not in other],
                                   content_hash=content_hash, hash_of=lambda r: r.prompt_hash,
                                   required_suites=required, max_age=max_age)
        notes = []
        if other and not verdict.passed:
            notes.append(f"{len(other)} run(s) evaluated another version of a bound suite "
                         f"({', '.join(sorted({r.suite for r in runs if r.id in other}))}): run it again")
        if dirs is not None and not bound and verdict.passed:
            notes.append(f"no suite in {', '.join(map(str, dirs))} guards {name} (gate.bind), so any suite "
                         f"that ran on this version counts; bind one to require it")
        details = {**verdict.details, "bound_suites": sorted(bound)}
        return verdict.model_copy(update={"reason": "; ".join([verdict.reason, *notes]), "details": details})

    return gate


def run_adapter(run: RunRow) -> dict[str, Any]:
    """The adapter a run evaluated, as its identity recorded it (``{}`` for a base model or a prompt)."""
    model = run.identity.get("model") or {}
    return {"path": model.get("adapter"), "hash": model.get("adapter_hash")}


# The gates of what else a release variant may change. A run counts for a collection, a workflow or a policy
# when its identity recorded exactly that artifact as it is now; with no suite bound to these, at least one run
# must exist and the latest run of every suite that ran on it must pass (as for an unbound prompt).
ArtifactGate = Callable[[str], GateVerdict]


def _age(max_age_days: float | None) -> timedelta | None:
    return timedelta(days=max_age_days) if max_age_days is not None else None


def rag_gate(store: EvalStoreBase, newest_snapshot: Callable[[str], tuple[str, str] | None], *,
             max_age_days: float | None = None, scan_limit: int = 500) -> ArtifactGate:
    """``gate(collection)``: passing runs of a ``rag:<collection>`` suite on the collection's documents as they
    are now: its newest ingest snapshot (``newest_snapshot``: its id and status), which must have completed (an
    ingest that runs or failed has changed documents no run judged); a re-ingest needs a new run."""

    def gate(collection: str) -> GateVerdict:
        newest = newest_snapshot(collection)
        if newest is None:
            return GateVerdict(passed=False, reason=f"collection {collection!r} has no ingest snapshot, so no run can "
                               "have judged its documents; ingest them (`keel ingest`), then run a suite on them")
        snapshot, status = newest
        if status != "completed":
            return GateVerdict(passed=False, reason=(
                f"collection {collection!r}: its newest ingest ({snapshot}) is {status}, so its documents are not "
                "the ones any run judged; " + ("wait for it to finish" if status == "running" else "ingest again")
                + f", then run a suite whose target is rag:{collection}"))
        runs = [r for r in store.completed_runs(kind="rag", contains=("collection", collection),
                                                limit=scan_limit)
                if (r.identity.get("rag") or {}).get("collection") == collection]
        return artifact_verdict(
            f"collection {collection!r}", runs, content_hash=snapshot,
            hash_of=lambda r: r.identity["rag"].get("snapshot"), max_age=_age(max_age_days),
            how_to_fix=f"run a suite whose target is rag:{collection} (`keel eval run <suite>`) on its documents "
                       "as they are now")

    return gate


def workflow_fingerprint(agent: dict[str, Any]) -> str:
    """What a workflow's gate matches, from a run identity's ``agent`` part (:func:`evals.runner.agent_identity`):
    the workflow, its settings, the model it calls and its answer prompt. Not the documents' snapshot: a re-ingest
    is the collection's gate's concern."""
    picked = {k: agent.get(k) for k in ("workflow", "model", "settings", "prompt")}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()


def workflow_gate(store: EvalStoreBase, fingerprint_of: Callable[[str], str], *,
                  max_age_days: float | None = None, scan_limit: int = 500) -> ArtifactGate:
    """``gate(workflow)``: passing runs of an ``agent:<workflow>`` suite on the workflow as it runs now
    (``fingerprint_of``: the :func:`workflow_fingerprint` of its current identity)."""

    def gate(workflow: str) -> GateVerdict:
        runs = [r for r in store.completed_runs(kind="agent", contains=("workflow", workflow),
                                                limit=scan_limit)
                if (r.identity.get("agent") or {}).get("workflow") == workflow]
        return artifact_verdict(
            f"workflow {workflow!r}", runs, content_hash=fingerprint_of(workflow),
            hash_of=lambda r: workflow_fingerprint(r.identity["agent"]), max_age=_age(max_age_days),
            how_to_fix=f"run a suite whose target is agent:{workflow} (`keel eval run <suite>`) with the "
                       "workflow's settings, model and answer prompt as they are now")

    return gate


def policy_gate(store: EvalStoreBase, version_tag: str, *, max_age_days: float | None = None,
                scan_limit: int = 500) -> ArtifactGate:
    """``gate(policy)``: passing runs of a suite whose target names ``policy: <name>``, checked under the policy
    file as it is loaded now (``version_tag``: its version and content hash; an edited file needs new runs)."""

    def gate(policy: str) -> GateVerdict:
        runs = [r for r in store.completed_runs(contains=("policy", policy), limit=scan_limit)
                if r.identity.get("policy") == policy]
        return artifact_verdict(
            f"guardrail policy {policy!r}", runs, content_hash=version_tag,
            hash_of=lambda r: r.identity.get("guardrails"), max_age=_age(max_age_days),
            how_to_fix=f"run a suite with `policy: {policy}` in its target (`keel eval run <suite>`) under the "
                       f"policy file as it is now ({version_tag})")

    return gate
