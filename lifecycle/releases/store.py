"""Where releases live: their state, what each variant served, feedback and shadow answers.

SQLite (``<home>/releases.db``) on one machine, Postgres (``releases.url``) across machines: every API process
reads the same releases and writes its observations to the same tables, so a canary's decision counts the
traffic of all of them and survives restarts. A state change is one transaction with its audit event (trail
``releases``) and is made against the revision the writer read (compare-and-set): when several processes judge
the same canary at once, exactly one decision lands.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from app.core import audit
from app.core.audit import AuditEvent
from app.core.db import PostgresPool, SqliteFile
from app.core.errors import Conflict, NotFound
from app.core.migrate import Migrations, upgrade_postgres
from lifecycle.releases.spec import ReleaseSpec

MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_releases",
                        pg_lock_key=0x6B65656C_726C)  # "keelrl"
TRAIL = "releases"

Status = Literal["running", "paused", "promoted", "rolled_back", "stopped"]
FINISHED: frozenset[str] = frozenset({"promoted", "rolled_back", "stopped"})


@dataclass(frozen=True, slots=True)
class Decision:
    """The latest call on a release, by the controller or a person."""

    action: str          # create, advance, promote, rollback, hold, pause, resume, stop, switch
    reason: str
    at: float
    actor: str = ""
    step: int = 0

    def public(self) -> dict[str, Any]:
        return {"action": self.action, "reason": self.reason, "at": self.at, "actor": self.actor, "step": self.step}


@dataclass(frozen=True, slots=True)
class Release:
    id: int
    spec: ReleaseSpec
    status: Status
    weights: dict[str, float]
    step: int
    step_started_at: float
    decision: Decision | None  # the last change (by the controller or a person)
    created_by: str
    created_at: float
    updated_at: float
    revision: int
    note: str | None = None  # why it holds where it is now (the controller's latest reading)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def seed(self) -> str:
        """Assignment seed: a new release on the same endpoint reshuffles its units."""
        return f"{self.spec.name}:{self.id}"

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True, slots=True)
class Observation:
    """One answer a variant gave, as the chat path saw it (written in batches, off the request path)."""

    release_id: int
    variant: str
    at: float
    response_id: str
    owner: str
    unit: str  # a digest of what assignment stuck to (sample-ratio checks count units, not requests)
    error: bool
    blocked: bool  # refused or retracted by the guardrails
    latency_ms: float
    ttft_ms: float | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    redacted: bool = False  # the guardrails masked something in the input or the answer


@dataclass(frozen=True, slots=True)
class JudgeScore:
    release_id: int
    variant: str
    at: float
    response_id: str
    metric: str
    score: float


@dataclass(frozen=True, slots=True)
class ShadowPair:
    release_id: int
    variant: str
    at: float
    response_id: str
    question: str
    primary_text: str
    shadow_text: str
    similarity: float | None
    primary_latency_ms: float | None
    shadow_latency_ms: float | None
    primary_tokens: int
    shadow_tokens: int
    primary_blocked: bool
    shadow_blocked: bool
    shadow_error: str | None = None

    def public(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(frozen=True, slots=True)
class Moments:
    """Sufficient statistics of one metric of one variant."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0


@dataclass(frozen=True, slots=True)
class VariantTotals:
    requests: int
    metrics: dict[str, Moments]
    prompt_tokens: int
    completion_tokens: int
    since_step: int  # requests since the current step began
    units: int  # distinct units assigned


_RELEASE_COLUMNS = ("id, spec, status, weights, step, step_started_at, decision, created_by, created_at, "
                    "updated_at, revision, note")
_OBS_COLUMNS = ("release_id", "variant", "at", "response_id", "owner", "unit", "error", "blocked", "latency_ms",
                "ttft_ms", "prompt_tokens", "completion_tokens", "redacted")
_PAIR_COLUMNS = ("release_id", "variant", "at", "response_id", "question", "primary_text", "shadow_text",
                 "similarity", "primary_latency_ms", "shadow_latency_ms", "primary_tokens", "shadow_tokens",
                 "primary_blocked", "shadow_blocked", "shadow_error")


def _decode(row: Sequence[Any]) -> Release:
    rid, spec, status, weights, step, started, decision, created_by, created_at, updated_at, revision, note = row
    d = json.loads(decision) if decision else None
    return Release(int(rid), ReleaseSpec.model_validate_json(spec), status, json.loads(weights), int(step),
                   float(started), Decision(**d) if d else None, created_by, float(created_at), float(updated_at),
                   int(revision), note)


def _executemany(db: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    if isinstance(db, sqlite3.Connection):
        db.executemany(sql, rows)
    else:  # psycopg: executemany lives on its cursors
        with db.cursor() as cur:
            cur.executemany(sql, rows)


def _not_found(name: str) -> NotFound:
    return NotFound(f"no release {name!r}; create it first (POST /v1/releases or keel release create)",
                    param="name", code="release_not_found")


class _SqlReleaseStore:
    """The SQL both stores share; subclasses provide transactions and reads."""

    _mark = "?"

    def _tx(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _state_tx(self):
        """A transaction that changes releases: writers of release state take turns (SQLite: already so)."""
        return self._tx()

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:  # pragma: no cover
        raise NotImplementedError

    def _q(self, sql: str) -> str:
        return sql.replace("?", self._mark)

    # -- releases ---------------------------------------------------------------------------------

    def revision(self) -> int:
        return int(self._read("SELECT revision FROM releases_revision WHERE id = 1")[0][0])

    def current(self) -> dict[str, Release]:
        """Every endpoint's current release (finished ones still route their endpoint to what they decided)."""
        rows = self._read(f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE current = 1 ORDER BY name")
        return {r.name: r for r in map(_decode, rows)}

    def get(self, name: str) -> Release:
        rows = self._read(self._q(f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE name = ? AND current = 1"),
                          (name,))
        if not rows:
            raise _not_found(name)
        return _decode(rows[0])

    def by_id(self, release_id: int) -> Release:
        rows = self._read(self._q(f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE id = ?"), (release_id,))
        if not rows:
            raise NotFound(f"no release with id {release_id}", param="id", code="release_not_found")
        return _decode(rows[0])

    def history(self, name: str) -> list[Release]:
        rows = self._read(self._q(f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE name = ? ORDER BY id DESC"),
                          (name,))
        return [_decode(r) for r in rows]

    def _bump(self, db: Any) -> None:
        db.execute("UPDATE releases_revision SET revision = revision + 1 WHERE id = 1")

    def create(self, spec: ReleaseSpec, *, actor: str, reason: str = "", now: float | None = None) -> Release:
        """A new current release for ``spec.name``: refused (409) while another release of that name runs."""
        now = time.time() if now is None else now
        weights = spec.initial_weights()
        decision = Decision("create", reason or f"{spec.strategy} release created", now, actor, 0)
        with self._state_tx() as db:
            rows = db.execute(self._q(f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE name = ? AND current = 1"),
                              (spec.name,)).fetchall()
            if rows:
                old = _decode(tuple(rows[0]))
                if not old.finished:
                    raise Conflict(f"release {spec.name!r} is {old.status}; finish it first (promote, roll back) "
                                   "or pick another name", param="name", code="release_exists")
                db.execute(self._q("UPDATE releases SET current = 0 WHERE id = ?"), (old.id,))
            values = (spec.name, spec.model_dump_json(), spec.content_hash(), "running", json.dumps(weights), 0, now,
                      json.dumps(decision.public()), actor, now, now, 1, 1)
            marks = ", ".join([self._mark] * len(values))
            rid = self._insert_returning_id(db, "INSERT INTO releases (name, spec, spec_hash, status, weights, step, "
                                            "step_started_at, decision, created_by, created_at, updated_at, "
                                            f"revision, current) VALUES ({marks})", values)
            self._bump(db)
            audit.append(db, AuditEvent(trail=TRAIL, action="release.create", subject_kind="release",
                                        subject=spec.name, actor=actor, subject_ref=str(rid),
                                        to_ref=spec.candidate, reason=decision.reason,
                                        details={"strategy": spec.strategy, "spec_hash": spec.content_hash(),
                                                 "weights": weights}))
        return self.by_id(rid)

    def _insert_returning_id(self, db: Any, sql: str, values: Sequence[Any]) -> int:
        return int(db.execute(sql + " RETURNING id", tuple(values)).fetchone()[0])

    def transition(self, release: Release, *, status: Status | None = None, weights: dict[str, float] | None = None,
                   step: int | None = None, decision: Decision, now: float | None = None) -> Release | None:
        """Apply a decision to ``release`` as read (its revision): None when someone else changed it first, so a
        decision made on stale data never lands."""
        now = time.time() if now is None else now
        new = replace(release, status=status or release.status, weights=weights or release.weights,
                      step=release.step if step is None else step,
                      step_started_at=now if step is not None and step != release.step else release.step_started_at,
                      decision=decision, updated_at=now, revision=release.revision + 1, note=None)
        with self._state_tx() as db:
            cur = db.execute(self._q("UPDATE releases SET status = ?, weights = ?, step = ?, step_started_at = ?, "
                                     "decision = ?, updated_at = ?, revision = ?, note = NULL "
                                     "WHERE id = ? AND revision = ?"),
                             (new.status, json.dumps(new.weights), new.step, new.step_started_at,
                              json.dumps(decision.public()), now, new.revision, release.id, release.revision))
            if cur.rowcount != 1:
                return None
            self._bump(db)
            audit.append(db, AuditEvent(trail=TRAIL, action=f"release.{decision.action}", subject_kind="release",
                                        subject=release.name, actor=decision.actor, subject_ref=str(release.id),
                                        from_ref=release.status, to_ref=new.status, reason=decision.reason,
                                        details={"step": new.step, "weights": new.weights,
                                                 "revision": new.revision}))
        return new

    def note(self, release: Release, reason: str) -> None:
        """Why the release holds where it is, for whoever looks: no new revision, no audit row (a hold is the
        absence of a decision, re-stated on every check)."""
        with self._tx() as db:
            db.execute(self._q("UPDATE releases SET note = ? WHERE id = ? AND revision = ?"),
                       (reason, release.id, release.revision))

    def decisions(self, name: str, limit: int = 100) -> list[AuditEvent]:
        return self.audit_events(subject=name, limit=limit)

    def audit_events(self, **filters: Any) -> list[AuditEvent]:
        """The releases trail, newest first (filters: :func:`app.core.audit.select`'s)."""
        sql, args = audit.select(postgres=self._mark == "%s", trail=TRAIL, **filters)
        return [audit.decode(r) for r in self._read(sql, args)]

    # -- observations ------------------------------------------------------------------------------

    def record(self, observations: Sequence[Observation]) -> None:
        marks = ", ".join([self._mark] * len(_OBS_COLUMNS))
        rows = [tuple(getattr(o, c) if not isinstance(getattr(o, c), bool) else int(getattr(o, c))
                      for c in _OBS_COLUMNS) for o in observations]
        with self._tx() as db:
            _executemany(db, f"INSERT INTO release_observations ({', '.join(_OBS_COLUMNS)}) VALUES ({marks})", rows)

    def record_scores(self, scores: Sequence[JudgeScore]) -> None:
        with self._tx() as db:
            _executemany(db, self._q("INSERT INTO judge_scores (release_id, variant, at, response_id, metric, score) "
                                     "VALUES (?, ?, ?, ?, ?, ?)"),
                         [(j.release_id, j.variant, j.at, j.response_id, j.metric, j.score) for j in scores])

    def record_pairs(self, pairs: Sequence[ShadowPair]) -> None:
        marks = ", ".join([self._mark] * len(_PAIR_COLUMNS))
        rows = [tuple(int(v) if isinstance(v, bool) else v for v in (getattr(p, c) for c in _PAIR_COLUMNS))
                for p in pairs]
        with self._tx() as db:
            _executemany(db, f"INSERT INTO shadow_pairs ({', '.join(_PAIR_COLUMNS)}) VALUES ({marks})", rows)

    def feedback(self, response_id: str, owner: str, score: float, comment: str = "", *,
                 now: float | None = None) -> None:
        """One rating per response and key; rating again replaces it."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(self._q("INSERT INTO feedback (response_id, owner, at, score, comment) VALUES (?, ?, ?, ?, ?) "
                               "ON CONFLICT (response_id, owner) DO UPDATE SET at = excluded.at, "
                               "score = excluded.score, comment = excluded.comment"),
                       (response_id, owner, now, score, comment))

    def feedback_for(self, response_id: str) -> list[dict[str, Any]]:
        rows = self._read(self._q("SELECT owner, at, score, comment FROM feedback WHERE response_id = ? ORDER BY at"),
                          (response_id,))
        return [{"owner": o, "at": float(at), "score": float(sc), "comment": c} for o, at, sc, c in rows]

    def scores_for(self, answers: Sequence[tuple[str, str]]) -> dict[str, float]:
        """The rating (0 bad .. 1 good) of each of these (response id, key id) answers that the key that got it
        rated — as in a release's totals, another key's rating does not count — for the drift monitor."""
        owner = dict(answers)
        out: dict[str, float] = {}
        ids = list(owner)
        for i in range(0, len(ids), 500):  # well under SQLite's bound-parameter limit
            chunk = ids[i:i + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self._read(self._q(f"SELECT response_id, owner, score FROM feedback WHERE response_id IN ({marks})"),
                              chunk)
            out.update((r, float(score)) for r, o, score in rows if o == owner[r])
        return out

    def ratings(self, *, since: float = 0.0, min_score: float | None = None,
                limit: int = 10_000) -> list[dict[str, Any]]:
        """Ratings given at or after ``since`` (at least ``min_score``), newest first: what a continuous-training
        pipeline counts and learns from (the newest when there are more than ``limit``)."""
        rows = self._read(self._q("SELECT response_id, owner, at, score FROM feedback WHERE at >= ? AND score >= ? "
                                  "ORDER BY at DESC LIMIT ?"), (since, -1.0 if min_score is None else min_score,
                                                                limit))
        return [{"response_id": r, "owner": o, "at": float(at), "score": float(sc)} for r, o, at, sc in rows]

    def count_ratings(self, *, since: float = 0.0, min_score: float | None = None) -> int:
        rows = self._read(self._q("SELECT COUNT(*) FROM feedback WHERE at >= ? AND score >= ?"),
                          (since, -1.0 if min_score is None else min_score))
        return int(rows[0][0])

    def observed_owner(self, response_id: str) -> str | None:
        rows = self._read(self._q("SELECT owner FROM release_observations WHERE response_id = ? LIMIT 1"),
                          (response_id,))
        return rows[0][0] if rows else None

    def totals(self, release: Release) -> dict[str, VariantTotals]:
        """Per variant: request count and the moments of every metric, over the whole release (both arms over the
        same period), plus the requests since the current step began."""
        q = self._q
        rows = self._read(q("SELECT variant, COUNT(*), SUM(error), SUM(blocked), SUM(latency_ms), "
                            "SUM(latency_ms * latency_ms), COUNT(ttft_ms), SUM(ttft_ms), SUM(ttft_ms * ttft_ms), "
                            "SUM(prompt_tokens), SUM(completion_tokens), "
                            "SUM(CASE WHEN at >= ? THEN 1 ELSE 0 END), COUNT(DISTINCT unit), SUM(redacted) "
                            "FROM release_observations WHERE release_id = ? GROUP BY variant"),
                         (release.step_started_at, release.id))
        fb = dict((r[0], r[1:]) for r in self._read(q(
            "SELECT o.variant, COUNT(*), SUM(CASE WHEN f.score < 0.5 THEN 1 ELSE 0 END) FROM release_observations o "
            "JOIN feedback f ON f.response_id = o.response_id AND f.owner = o.owner WHERE o.release_id = ? "
            "GROUP BY o.variant"), (release.id,)))
        judged = {r[0]: Moments(int(r[1]), float(r[2] or 0), float(r[3] or 0)) for r in self._read(q(
            "SELECT variant, COUNT(*), SUM(score), SUM(score * score) FROM judge_scores WHERE release_id = ? "
            "GROUP BY variant"), (release.id,))}
        out: dict[str, VariantTotals] = {}
        for variant, n, err, blocked, lat, lat2, n_ttft, ttft, ttft2, ptok, ctok, since, units, red in rows:
            n = int(n)
            f_n, f_neg = (int(fb[variant][0]), int(fb[variant][1] or 0)) if variant in fb else (0, 0)
            out[variant] = VariantTotals(n, {
                "errors": Moments(n, float(err or 0), float(err or 0)),
                "guardrail_blocks": Moments(n, float(blocked or 0), float(blocked or 0)),
                "guardrail_redactions": Moments(n, float(red or 0), float(red or 0)),
                "latency_ms": Moments(n, float(lat or 0), float(lat2 or 0)),
                "ttft_ms": Moments(int(n_ttft), float(ttft or 0), float(ttft2 or 0)),
                "negative_feedback": Moments(f_n, float(f_neg), float(f_neg)),
                "judge_score": judged.get(variant, Moments()),
            }, int(ptok or 0), int(ctok or 0), int(since or 0), int(units or 0))
        return out

    def latencies(self, release_id: int, limit: int = 5000) -> dict[str, tuple[list[float], list[float]]]:
        """The latest latencies and TTFTs per variant (for percentiles)."""
        rows = self._read(self._q("SELECT variant, latency_ms, ttft_ms FROM release_observations WHERE release_id = ? "
                                  "ORDER BY id DESC LIMIT ?"), (release_id, limit))
        out: dict[str, tuple[list[float], list[float]]] = {}
        for variant, lat, ttft in rows:
            lats, ttfts = out.setdefault(variant, ([], []))
            lats.append(float(lat))
            if ttft is not None:
                ttfts.append(float(ttft))
        return out

    def series(self, release_id: int, bucket_s: float) -> list[dict[str, Any]]:
        """Requests, errors, blocks, mean latency and feedback per variant per time bucket, oldest first."""
        b = float(bucket_s)
        rows = self._read(self._q(
            "SELECT o.variant, FLOOR(o.at / ?) * ?, COUNT(*), SUM(o.error), SUM(o.blocked), AVG(o.latency_ms), "
            "AVG(o.ttft_ms), SUM(CASE WHEN f.score >= 0.5 THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN f.score < 0.5 THEN 1 ELSE 0 END) FROM release_observations o LEFT JOIN feedback f "
            "ON f.response_id = o.response_id AND f.owner = o.owner WHERE o.release_id = ? "
            "GROUP BY 1, 2 ORDER BY 2, 1"), (b, b, release_id))
        return [{"t": float(t), "variant": v, "requests": int(n), "errors": int(e or 0), "blocked": int(bl or 0),
                 "latency_ms": float(lat) if lat is not None else None,
                 "ttft_ms": float(tt) if tt is not None else None, "feedback_up": int(up or 0),
                 "feedback_down": int(down or 0)} for v, t, n, e, bl, lat, tt, up, down in rows]

    def pairs(self, release_id: int, limit: int = 50) -> list[ShadowPair]:
        rows = self._read(self._q(f"SELECT {', '.join(_PAIR_COLUMNS)} FROM shadow_pairs WHERE release_id = ? "
                                  "ORDER BY id DESC LIMIT ?"), (release_id, limit))
        return [ShadowPair(*(bool(v) if c in ("primary_blocked", "shadow_blocked") else v
                             for c, v in zip(_PAIR_COLUMNS, r, strict=True))) for r in rows]

    def shadow_totals(self, release_id: int) -> dict[str, Any]:
        rows = self._read(self._q(
            "SELECT COUNT(*), AVG(similarity), COUNT(similarity), AVG(primary_latency_ms), AVG(shadow_latency_ms), "
            "AVG(primary_tokens), AVG(shadow_tokens), SUM(primary_blocked), SUM(shadow_blocked), "
            "SUM(CASE WHEN shadow_error IS NOT NULL THEN 1 ELSE 0 END) FROM shadow_pairs WHERE release_id = ?"),
            (release_id,))
        n, sim, n_sim, plat, slat, ptok, stok, pblk, sblk, errs = rows[0]
        return {"pairs": int(n or 0), "similarity_mean": sim, "similarity_n": int(n_sim or 0),
                "primary_latency_ms_mean": plat, "shadow_latency_ms_mean": slat, "primary_tokens_mean": ptok,
                "shadow_tokens_mean": stok, "primary_blocked": int(pblk or 0), "shadow_blocked": int(sblk or 0),
                "shadow_errors": int(errs or 0)}


class SqliteReleaseStore(_SqlReleaseStore):
    """One file in WAL mode; writes take the write lock up front, reads use a connection of their own."""

    def __init__(self, path: Path | str) -> None:
        self._file = SqliteFile(path, MIGRATIONS, what="the release store", before=audit.ensure_schema_sqlite)
        self.path = self._file.path

    def _tx(self):
        return self._file.tx()

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._file.read(sql, args)

    def close(self) -> None:
        self._file.close()


class PostgresReleaseStore(_SqlReleaseStore):
    """Several API processes (and machines) on one set of releases."""

    _mark = "%s"

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        def migrate(timeout: float) -> None:
            audit.ensure_schema_postgres(url, connect_timeout_s=timeout)
            upgrade_postgres(url, MIGRATIONS, connect_timeout_s=timeout)

        self._pg = PostgresPool(url, whose="the release store's", setting="releases.url", name="keel-releases",
                                migrate=migrate, timeout_s=timeout_s)

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._pg.transaction() as conn:
            yield conn

    @contextmanager
    def _state_tx(self) -> Iterator[Any]:
        with self._pg.transaction() as conn:
            conn.execute("LOCK TABLE releases_revision IN EXCLUSIVE MODE")  # a second create waits, then sees 409
            yield conn

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._pg.read(sql, args)

    def close(self) -> None:
        self._pg.close()


def open_release_store(url: str | None, home: Path) -> SqliteReleaseStore | PostgresReleaseStore:
    return PostgresReleaseStore(url) if url else SqliteReleaseStore(Path(home) / "releases.db")
