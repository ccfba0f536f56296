"""The adapter promotion gate (``FinetuneService.set_gate``): a registered adapter version reaches
``production`` only with passing latest runs of its job's eval suites on exactly that adapter.

Built on :func:`evals.gate.artifact_verdict`, like the prompt gate; it lives here, above evals, because
it knows what an adapter version is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from app.core.paths import same_folder
from evals.gate import artifact_verdict, run_adapter
from evals.store import EvalStoreBase, RunRow
from finetune.tracking import AdapterVersion
from prompts.registry import GateVerdict


def evaluated(path: Path | str, content_hash: str | None) -> Callable[[RunRow], bool]:
    """Did a run evaluate exactly this adapter? The same content hash when both the run identity and the version
    carry one, else the same adapter folder (each registered version has its own artifact folder)."""
    folder = Path(path)

    def matches(r: RunRow) -> bool:
        got = run_adapter(r)
        if content_hash and got["hash"]:
            return got["hash"] == content_hash
        return same_folder(got["path"], folder)

    return matches


def _adapter_runs(store: EvalStoreBase, suites: Sequence[str] | None, scan_limit: int) -> list[RunRow]:
    # Runs on adapters only (a base-model or RAG run of the same suite is other content); newest first, like
    # prompt_runs, so the first run of a suite is its latest.
    pool = [r for s in (suites or [None]) for r in store.list_runs(suite=s, limit=scan_limit)]
    return sorted((r for r in pool if r.status == "completed" and r.target_kind != "rag"),
                  key=lambda r: r.finished_at or "", reverse=True)


def runs_on_adapter(store: EvalStoreBase, *, path: Path | str, content_hash: str | None,
                    scan_limit: int = 500) -> list[RunRow]:
    """Completed eval runs of exactly this adapter, newest first (what an answer's lineage lists)."""
    matches = evaluated(path, content_hash)
    return [r for r in _adapter_runs(store, None, scan_limit) if matches(r)]


def adapter_gate(store: EvalStoreBase, *, required_suites: Sequence[str] | None = None,
                 max_age_days: float | None = None, scan_limit: int = 500) -> Callable[[AdapterVersion], GateVerdict]:
    """A :data:`finetune.tracking.AdapterGate`: ``gate(version) -> GateVerdict``.

    The suites required are ``required_suites`` or, by default, the ones the version's job spec
    named (its ``keel.evals`` tag); with none, any suite that ran on the adapter counts, and at
    least one must have. A run counts for the version only if it evaluated exactly that adapter:
    the same content hash when both the run identity and the version (``keel.adapter_hash`` tag)
    carry one, else the same adapter folder (each registered version has its own artifact folder).
    """
    max_age = timedelta(days=max_age_days) if max_age_days is not None else None

    def gate(version: AdapterVersion) -> GateVerdict:
        suites = list(required_suites) if required_suites is not None else [
            s for s in version.tags.get("keel.evals", "").split(",") if s.strip()]
        path = version.local_path()
        want_hash = version.tags.get("keel.adapter_hash") or None
        key = want_hash or str(path)
        matches = evaluated(path, want_hash)
        runs = _adapter_runs(store, suites, scan_limit)
        return artifact_verdict(
            f"adapter {version.ref}", runs, content_hash=key, hash_of=lambda r: key if matches(r) else None,
            required_suites=suites, max_age=max_age,
            how_to_fix=("a fine-tuning worker evaluates each new adapter after training; `keel finetune evaluate "
                        f"{version.tags.get('keel.job_id', '<job>')}` queues its suites again"),
        )

    return gate
