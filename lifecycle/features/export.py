"""Keel's own data as feature rows: per user (API key) from lineage and feedback, per document from ingest snapshots
and lineage. Each export *appends* one row per entity stamped with the export's time, so the Parquet sources keep
the history that point-in-time joins need (a training set built "as of" last week sees last week's values)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The Parquet files written here, which the Feast sources in definitions.py read. Defined here, not there:
# definitions.py imports Feast (~6 s), which the API's start-up must not pay (the container imports this module).
USER_SOURCE = "user_stats.parquet"
DOCUMENT_SOURCE = "document_stats.parquet"

WINDOW_S = 30 * 86400


@dataclass
class Sources:
    """Where the rows come from (None: that part is off on this server)."""

    lineage: Callable[[int], list[dict[str, Any]]] | None = None  # newest records first, at most n
    ratings: Callable[[], list[dict[str, Any]]] | None = None  # every rating: owner, at, score
    snapshots: Any = None  # ingest's SnapshotStore


def user_rows(records: Iterable[dict[str, Any]], ratings: Iterable[dict[str, Any]], now: float) -> list[dict]:
    requests = Counter(r.get("owner") for r in records if r.get("owner") and r.get("created", 0) >= now - WINDOW_S)
    rated, good = Counter(), Counter()
    for r in ratings:
        rated[r["owner"]] += 1
        good[r["owner"]] += r["score"] >= 0.5
    return [{"user_id": u, "requests_30d": requests[u], "ratings": rated[u],
             "feedback_rate": good[u] / rated[u] if rated[u] else -1.0} for u in sorted(set(requests) | set(rated))]


def document_rows(records: Iterable[dict[str, Any]], snapshots: Any, now: float) -> list[dict]:
    retrieved, cited = Counter(), Counter()
    for r in records:
        if r.get("created", 0) < now - WINDOW_S:
            continue
        for passage in r.get("retrieval") or ():
            if passage.get("doc_id"):
                retrieved[passage["doc_id"]] += 1
                cited[passage["doc_id"]] += bool(passage.get("cited"))
    since: dict[str, tuple[str, float]] = {}  # doc -> (version, when that version was first ingested)
    if snapshots is not None:
        done = [s for s in snapshots.list(limit=500) if s.status == "completed" and s.finished_at][::-1]
        for s in done:
            at = datetime.fromisoformat(s.finished_at).timestamp()
            for f in snapshots.get(s.id, with_files=True).files or ():
                if since.get(f.doc_id, ("", 0.0))[0] != f.version:
                    since[f.doc_id] = (f.version, at)
    return [{"doc_id": d, "freshness_days": (now - since[d][1]) / 86400 if d in since else -1.0,
             "retrievals_30d": retrieved[d], "citations_30d": cited[d]} for d in sorted(set(since) | set(retrieved))]


def export(data: Path, sources: Sources, *, max_records: int, now: float) -> dict[str, int]:
    """Append this moment's rows to the sources' Parquet files; returns the rows written per source."""
    import pandas as pd  # lazy: pandas is only needed by the feature store

    records = sources.lineage(max_records) if sources.lineage is not None else []
    ratings = sources.ratings() if sources.ratings is not None else []
    stamp = datetime.fromtimestamp(now, UTC)
    written = {}
    for name, rows, columns in (
            (USER_SOURCE, user_rows(records, ratings, now), ["user_id", "requests_30d", "ratings", "feedback_rate"]),
            (DOCUMENT_SOURCE, document_rows(records, sources.snapshots, now),
             ["doc_id", "freshness_days", "retrievals_30d", "citations_30d"])):
        frame = pd.DataFrame(rows, columns=columns)
        frame["event_timestamp"] = pd.Series([stamp] * len(frame), dtype="datetime64[us, UTC]")
        path = data / name
        if path.exists():
            frame = pd.concat([pd.read_parquet(path), frame], ignore_index=True) if len(frame) else \
                pd.read_parquet(path)
        frame = frame.astype({c: t for c, t in (("requests_30d", "int64"), ("ratings", "int64"),
                                                 ("retrievals_30d", "int64"), ("citations_30d", "int64"),
                                                 ("feedback_rate", "float32"), ("freshness_days", "float32"))
                              if c in frame.columns})
        data.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)  # whole file or the old one: a reader never sees half
        written[name.removesuffix(".parquet")] = len(rows)
    return written
