"""Persistence of prompt versions and their audit log.

Which version a label (``production``, ``staging``, ...) serves is not kept here: labels live in the routing
table (:mod:`app.llm.routing`), with every other decision about what serves traffic; the registry
(:mod:`prompts.registry`) checks a version here before it points a label at it. Labels written by an earlier
release in this store's ``prompt_labels`` table are handed over once (:meth:`PromptStore.legacy_labels`) and
left there, read-only.

``PromptStore`` is the contract; ``SqlitePromptStore`` the default implementation and
``prompts.store_pg.PostgresPromptStore`` the one for several API instances (both pass the same
contract suite); ``prompts.factory.build_prompt_store`` picks one from the settings. Stores enforce the
invariants that need a transaction — version numbering, optimistic concurrency,
audit rows written together with the change — and nothing about rendering.

The audit rows are the kernel's (:mod:`app.core.audit`): trail ``prompts`` in the ``audit_events`` table of the
registry's database, appended on the write transaction's own connection (a change and its audit row commit
together or not at all), subject the template (``subject_kind`` ``prompt``, ``subject_ref`` the label, if
any), ``from_ref``/``to_ref`` the versions. :class:`~prompts.models.AuditEntry` is the registry's view of one.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from app.core import audit
from app.core.audit import AuditEvent, AuditRetention, Pruner
from app.core.db import enable_wal, write_transaction
from app.core.errors import NotFound
from app.core.migrate import Migrations, upgrade_sqlite
from prompts.errors import ImportConflict, VersionConflict
from prompts.models import AuditEntry, TemplateContent, TemplateSummary, TemplateVersion, validate_name

TRAIL = "prompts"
_LABELS_ADOPTED = "labels_adopted"  # prompt_meta: the labels of prompt_labels were handed to the routing table


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


@runtime_checkable
class PromptStore(Protocol):
    def save(
        self, name: str, content: TemplateContent, *, author: str, message: str, base_version: int | None
    ) -> TemplateVersion:
        """Append a version. ``base_version`` None creates the template; otherwise it must be the latest."""

    def import_version(self, version: TemplateVersion, *, actor: str) -> bool:
        """Insert a version with its number, author and time kept. False if it already exists identically."""

    def get_version(self, name: str, version: int) -> TemplateVersion: ...

    def latest_version(self, name: str) -> int | None: ...

    def list_versions(self, name: str) -> list[TemplateVersion]: ...

    def list_templates(self, query: str | None = None) -> list[TemplateSummary]: ...

    def legacy_labels(self) -> list[tuple[str, str, int, str]]:
        """Labels an earlier release kept in this store (name, label, version, who set it), until they were handed
        over to the routing table (:meth:`legacy_labels_adopted`); empty after."""

    def legacy_labels_adopted(self) -> None:
        """Record the hand-over. The rows stay as they were (read-only: what a process of the earlier release,
        or a downgrade, still reads)."""

    def audit_log(
        self, *, name: str | None = None, label: str | None = None, limit: int = 100,
        before_id: int | None = None, until: float | None = None,
    ) -> list[AuditEntry]: ...

    def audit_events(self, **filters: Any) -> list[AuditEvent]: ...

    def revision(self) -> int:
        """A counter bumped by every write, for cheap change detection by other workers."""

    def close(self) -> None: ...


# The registry's tables come from these Alembic migrations (prompts/migrations), run when a store opens, on
# SQLite and Postgres alike, after the kernel's audit schema (revision 0002 moves prompt_audit into it). The
# advisory lock key (Postgres) is the one the release before Alembic took around its schema set-up ("keelpr"),
# so a process of that release starting at the same time waits too.
MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_prompts",
                        pg_lock_key=0x6B65656C_7072)


class SqlPromptStore:
    """The registry's logic over SQL, written once for every database (SQLite's ``?`` placeholders).

    A subclass provides ``_write()`` (a context manager yielding an object with ``execute(sql, args)``
    for one transaction that holds the registry's write lock and has bumped the revision counter),
    ``_read(sql, args)``, ``close()``, ``_prune_audit()`` (the audit retention, on a connection of its own)
    and three dialect details below.
    """

    _placeholder = "?"   # what stands for a parameter in the database's SQL
    _collate = ""        # ORDER BY suffix for byte order (SQLite's default)
    _pruner: Pruner | None = None  # the audit retention (set by the subclass's __init__)

    def _write(self) -> AbstractContextManager[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:  # pragma: no cover
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql if self._placeholder == "?" else sql.replace("?", self._placeholder)

    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._read(self._sql(sql), args)

    @staticmethod
    def _one(db: Any, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        return db.execute(sql, args).fetchone()

    # --- writes -------------------------------------------------------------------------------
    def save(
        self, name: str, content: TemplateContent, *, author: str, message: str, base_version: int | None
    ) -> TemplateVersion:
        validate_name(name)
        now = utc_now()
        with self._write() as db:
            row = self._one(db, self._sql("SELECT latest_version FROM prompt_templates WHERE name = ?"), (name,))
            latest = row[0] if row else None
            if base_version != latest:
                raise _stale(name, base_version, latest)
            version = TemplateVersion(
                name=name, version=(latest or 0) + 1, content=content, hash=content.content_hash(),
                parent=latest, author=author, message=message, created_at=now,
            )
            self._insert_version(db, version)
            self._audit(db, actor=author, action="version.create", name=name, from_version=latest,
                        to_version=version.version, reason=message, details={"hash": version.hash})
        return version

    def import_version(self, version: TemplateVersion, *, actor: str) -> bool:
        validate_name(version.name)
        with self._write() as db:
            existing = self._one(db, self._sql("SELECT hash FROM prompt_versions WHERE name = ? AND version = ?"),
                                 (version.name, version.version))
            if existing:
                if existing[0] != version.hash:
                    raise ImportConflict(
                        f"{version.ref} already exists with hash {existing[0]}, but the import has "
                        f"{version.hash}: history differs; export the registry and reconcile before importing",
                        param=version.ref,
                    )
                return False
            row = self._one(db, self._sql("SELECT latest_version FROM prompt_templates WHERE name = ?"),
                            (version.name,))
            latest = row[0] if row else 0
            if version.version != latest + 1:
                raise ImportConflict(
                    f"cannot import {version.ref}: the registry's latest version of {version.name!r} is "
                    f"{latest}, so the next must be {latest + 1}",
                    param=version.ref,
                )
            self._insert_version(db, version)
            self._audit(db, actor=actor, action="version.import", name=version.name,
                        from_version=latest or None, to_version=version.version,
                        reason=version.message, details={"hash": version.hash, "author": version.author})
        return True

    def _insert_version(self, db: Any, v: TemplateVersion) -> None:
        if v.version == 1:
            db.execute(self._sql("INSERT INTO prompt_templates VALUES (?, 1, ?, ?, ?)"),
                       (v.name, v.content.description, v.created_at, v.created_at))
        else:
            db.execute(
                self._sql("UPDATE prompt_templates SET latest_version = ?, description = ?, updated_at = ? "
                          "WHERE name = ?"),
                (v.version, v.content.description, v.created_at, v.name),
            )
        db.execute(
            self._sql("INSERT INTO prompt_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
            (v.name, v.version, v.content.canonical_json(), v.hash, v.parent, v.author, v.message, v.created_at),
        )

    def legacy_labels_adopted(self) -> None:
        with self._write() as db:
            db.execute(self._sql("INSERT INTO prompt_meta VALUES (?, 1) ON CONFLICT (key) DO NOTHING"),
                       (_LABELS_ADOPTED,))

    def _audit(
        self, db: Any, *, actor: str, action: str, name: str, label: str | None = None,
        from_version: int | None = None, to_version: int | None = None, reason: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        """The change's audit event, in the change's transaction (``db``)."""
        audit.append(db, AuditEvent(trail=TRAIL, actor=actor, action=action, subject_kind="prompt", subject=name,
                                    subject_ref=label, from_ref=from_version, to_ref=to_version, reason=reason,
                                    details=details or {}))

    def _after_write(self) -> None:
        """After a write committed: the audit retention, when due (one clock read otherwise)."""
        if self._pruner is not None and self._pruner.due():
            self._prune_audit()

    def _prune_audit(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- reads --------------------------------------------------------------------------------
    def get_version(self, name: str, version: int) -> TemplateVersion:
        rows = self._q(
            "SELECT name, version, content, hash, parent, author, message, created_at FROM prompt_versions "
            "WHERE name = ? AND version = ?", (name, version),
        )
        if not rows:
            latest = self.latest_version(name)
            if latest is None:
                raise NotFound(f"no prompt template named {name!r}", param="name")
            raise NotFound(f"{name!r} has no version {version} (latest is {latest})", param="version")
        return _row_to_version(rows[0])

    def latest_version(self, name: str) -> int | None:
        rows = self._q("SELECT latest_version FROM prompt_templates WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def list_versions(self, name: str) -> list[TemplateVersion]:
        rows = self._q(
            "SELECT name, version, content, hash, parent, author, message, created_at FROM prompt_versions "
            "WHERE name = ? ORDER BY version", (name,),
        )
        if not rows:
            raise NotFound(f"no prompt template named {name!r}", param="name")
        return [_row_to_version(r) for r in rows]

    def list_templates(self, query: str | None = None) -> list[TemplateSummary]:
        sql = "SELECT name, description, latest_version, created_at, updated_at FROM prompt_templates"
        args: tuple[Any, ...] = ()
        if query:
            like = "%" + query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            sql += " WHERE lower(name) LIKE ? ESCAPE '\\' OR lower(description) LIKE ? ESCAPE '\\'"
            args = (like, like)
        rows = self._q(f"{sql} ORDER BY name{self._collate}", args)
        return [
            TemplateSummary(name=r[0], description=r[1], latest_version=r[2], labels={},
                            created_at=r[3], updated_at=r[4])
            for r in rows
        ]

    def legacy_labels(self) -> list[tuple[str, str, int, str]]:
        if self._q("SELECT 1 FROM prompt_meta WHERE key = ?", (_LABELS_ADOPTED,)):
            return []
        return [(r[0], r[1], int(r[2]), r[3]) for r in self._q(
            f"SELECT name, label, version, updated_by FROM prompt_labels ORDER BY name{self._collate}, "
            f"label{self._collate}")]

    def audit_log(
        self, *, name: str | None = None, label: str | None = None, limit: int = 100,
        before_id: int | None = None, until: float | None = None,
    ) -> list[AuditEntry]:
        events = self.audit_events(subject_kind="prompt" if name is not None else None, subject=name,
                                   subject_ref=label, before_id=before_id, until=until,
                                   limit=max(1, min(limit, 1000)))
        return [audit_entry(e) for e in events]

    def audit_events(self, **filters: Any) -> list[AuditEvent]:
        """The kernel's audit query (:func:`app.core.audit.select`'s filters) on the registry's trail."""
        sql, args = audit.select(postgres=self._placeholder != "?", **{**filters, "trail": TRAIL})
        return [audit.decode(r) for r in self._read(sql, args)]

    def revision(self) -> int:
        return self._q("SELECT value FROM prompt_meta WHERE key = 'revision'")[0][0]


class SqlitePromptStore(SqlPromptStore):
    """SQLite in WAL mode. One connection per store, serialised by a lock; other processes or
    store instances on the same file are serialised by SQLite's write lock (``BEGIN IMMEDIATE``)."""

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 10_000,
                 audit_retention: AuditRetention | None = None) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        enable_wal(self._db)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._lock = threading.RLock()
        audit.ensure_schema_sqlite(self._db)  # the kernel's audit table first: revision 0002 moves rows into it
        upgrade_sqlite(self._db, MIGRATIONS)
        self._pruner = Pruner(TRAIL, audit_retention)
        self._after_write()  # the retention, on open

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with write_transaction(self._db, self._lock) as db:
            db.execute("UPDATE prompt_meta SET value = value + 1 WHERE key = 'revision'")
            yield db
        self._after_write()

    def _prune_audit(self) -> None:
        self._pruner.run(self._db, lock=self._lock)

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()


def _stale(name: str, base: int | None, latest: int | None) -> VersionConflict:
    if latest is None:
        return VersionConflict(
            f"template {name!r} does not exist yet: create it without base_version", latest=None
        )
    if base is None:
        return VersionConflict(
            f"template {name!r} already exists (latest version {latest}); to add a version, send "
            f"base_version={latest} after reviewing it",
            latest=latest,
        )
    return VersionConflict(
        f"version {base} of {name!r} is no longer the latest (latest is {latest}): someone saved in "
        f"between; reload {name}@{latest}, merge your change and save with base_version={latest}",
        latest=latest,
    )


def _version(ref: str | None) -> int | None:
    return int(ref) if ref is not None else None


def audit_entry(e: AuditEvent) -> AuditEntry:
    """The registry's view of an audit event about a template (of the ``prompts`` trail, or a label move of the
    routing table's)."""
    return AuditEntry(id=e.id, at=_iso(e.at), actor=e.actor, action=e.action, name=e.subject, label=e.subject_ref,
                      from_version=_version(e.from_ref), to_version=_version(e.to_ref), reason=e.reason,
                      details=dict(e.details), trail=e.trail, ts=e.at)


def _row_to_version(row: tuple[Any, ...]) -> TemplateVersion:
    return TemplateVersion(
        name=row[0], version=row[1], content=TemplateContent.model_validate_json(row[2]), hash=row[3],
        parent=row[4], author=row[5], message=row[6], created_at=row[7],
    )
