"""The routing table: which model alias is served by what, durable and shared by every API process.

Keel has one model of what serves traffic. The aliases configured in the settings (``models``) are its base
and never change at run time; everything that moves traffic while Keel runs writes here instead of touching the
settings, in three shapes:

* a *route*: a model alias, the :class:`~app.core.settings.ModelAlias` it resolves to, and the owner that wrote
  it (``finetune:<model>`` for an adapter deploy), so one component cannot take over another's alias;
* a *label*: which version of a versioned artifact a named label serves (``kind`` ``prompt``: a prompt
  template's ``production``, ``staging``, ...), with the version's content hash. The artifact's own store keeps
  its immutable versions; which one serves is decided here;
* a *split*: how a release endpoint divides its traffic between its release's variants (percent per variant),
  written by the release (owner ``release:<name>``) at every step, promotion, rollback and blue/green switch.
  The release store keeps the plan and the measurements; what serves is read from here.

Model aliases and release endpoints are one namespace (names clients call as a model): a name is a route or a
split, never both, checked in the writing transaction. Each change is one transaction with its audit event
(trail ``routing``: ``route.set``/``route.remove`` on a ``model_alias``, ``label.move``/``label.override``/
``label.remove`` on a ``<kind>_label``, ``split.set`` on a ``release_endpoint``) and bumps the table's revision.

The store is SQLite (``<home>/routing.db``) on one machine and Postgres (``routing.url``) across machines. Every
process keeps the table in memory and re-reads it when the revision moved, checking at most every
``check_interval_s`` on the request path: a deploy by one API process, a worker or the CLI is served by every
process within that interval, and survives restarts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from app.core import audit
from app.core.audit import AuditEvent
from app.core.db import PostgresPool, SqliteFile, ThrottledRefresh
from app.core.errors import Conflict, InvalidRequest, StoreUnavailable
from app.core.migrate import Migrations, upgrade_postgres
from app.core.settings import BackendSettings, CoreConfig, ModelAlias

log = logging.getLogger("keel.routing")

MIGRATIONS = Migrations(Path(__file__).with_name("migrations"), "alembic_version_routing",
                        pg_lock_key=0x6B65656C_726F)  # "keelro"
TRAIL = "routing"
CONFIGURED = "config"  # the owner of every alias the settings define


@dataclass(frozen=True, slots=True)
class Route:
    alias: str
    spec: ModelAlias
    owner: str
    actor: str = ""
    revision: int = 0
    updated_at: float = 0.0

    def public(self) -> dict[str, Any]:
        return {"alias": self.alias, "owner": self.owner, "actor": self.actor, "revision": self.revision,
                "updated_at": self.updated_at, **self.spec.model_dump(mode="json")}


@dataclass(frozen=True, slots=True)
class Label:
    """A named pointer at one version of ``subject`` (a prompt template when ``kind`` is ``prompt``)."""

    kind: str
    subject: str
    label: str
    version: int
    ref: str = ""  # what that version is (its content hash), as the mover saw it
    actor: str = ""
    revision: int = 0
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Split:
    """How a release endpoint's traffic is divided between the variants of one release (percent per variant)."""

    endpoint: str
    owner: str
    release_id: int
    release_revision: int  # the release's state it was written from: an older one never overwrites a newer
    weights: dict[str, float]
    actor: str = ""
    revision: int = 0
    updated_at: float = 0.0

    def behind(self, release_id: int, release_revision: int, weights: Mapping[str, float]) -> bool:
        """Whether writing that state of the release would change this split: it is newer, and it serves another
        split or another release (a pause keeps the traffic: nothing to write)."""
        return (self.release_id, self.release_revision) < (release_id, release_revision) and not (
            self.release_id == release_id and self.weights == dict(weights))

    def public(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "owner": self.owner, "release_id": self.release_id,
                "release_revision": self.release_revision, "weights": self.weights, "actor": self.actor,
                "revision": self.revision, "updated_at": self.updated_at}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the table serves, at one revision."""

    revision: int
    routes: dict[str, Route]
    labels: dict[tuple[str, str], dict[str, Label]]
    splits: dict[str, Split]


class RoutingStore(Protocol):
    """Where run-time routes live. Writes are atomic with their audit event and bump the revision."""

    def revision(self) -> int: ...

    def load(self) -> Snapshot: ...

    def put(self, route: Route, *, reason: str = "") -> int: ...

    def remove(self, alias: str, *, owner: str, actor: str, reason: str = "") -> int | None: ...

    def put_label(self, label: Label, *, action: str = "label.move", reason: str = "",
                  details: Mapping[str, Any] | None = None, only_if_absent: bool = False) -> int | None:
        """Point the label at ``label.version``; return the version it pointed at before (None: it was new).
        ``only_if_absent``: leave a label that exists as it is (and return its version)."""

    def remove_label(self, kind: str, subject: str, label: str, *, actor: str, reason: str = "",
                     action: str = "label.remove") -> int | None:
        """Remove the label; return the version it pointed at (None: there was no such label)."""

    def put_split(self, split: Split, *, reason: str = "") -> Split | None:
        """Write the endpoint's split (only its owner may change it; not a routed alias's name). A split of an
        older state of the same release than the one written is not written (returned: the one that stays)."""

    def history(self, alias: str | None = None, limit: int = 100) -> list[AuditEvent]: ...

    def audit_events(self, **filters: Any) -> list[AuditEvent]: ...

    def close(self) -> None: ...


def _decode(row: tuple[Any, ...]) -> Route:
    alias, spec, owner, actor, revision, updated_at = row
    return Route(alias, ModelAlias.model_validate(json.loads(spec)), owner, actor, int(revision), float(updated_at))


def _decode_label(row: tuple[Any, ...]) -> Label:
    kind, subject, label, version, ref, actor, revision, updated_at = row
    return Label(kind, subject, label, int(version), ref, actor, int(revision), float(updated_at))


_LABEL_COLUMNS = "kind, subject, label, version, ref, actor, revision, updated_at"
_SPLIT_COLUMNS = "endpoint, owner, release_id, release_revision, weights, actor, revision, updated_at"


def _decode_split(row: tuple[Any, ...]) -> Split:
    endpoint, owner, release_id, release_revision, weights, actor, revision, updated_at = row
    return Split(endpoint, owner, int(release_id), int(release_revision),
                 {k: float(v) for k, v in json.loads(weights).items()}, actor, int(revision), float(updated_at))


def _split_text(weights: Mapping[str, float] | None) -> str | None:
    return ", ".join(f"{k} {v:g}%" for k, v in weights.items()) if weights is not None else None


def _event(action: str, route: Route, *, previous: Route | None, reason: str, revision: int) -> AuditEvent:
    return AuditEvent(trail=TRAIL, action=action, subject_kind="model_alias", subject=route.alias, actor=route.actor,
                      subject_ref=route.owner, from_ref=previous.spec.model if previous else None,
                      to_ref=route.spec.model if action != "route.remove" else None, reason=reason,
                      details={"revision": revision, "backend": route.spec.backend,
                               "adapter": str(route.spec.adapter) if route.spec.adapter else None})


class _SqlRoutingStore:
    """The SQL both stores share; subclasses provide a transaction and a reader."""

    _mark = "?"

    def _tx(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:  # pragma: no cover
        raise NotImplementedError

    def _read_all(self, *queries: tuple[str, tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:  # pragma: no cover
        """Several reads from one snapshot (the routes and the revision they are at)."""
        raise NotImplementedError

    def revision(self) -> int:
        return int(self._read("SELECT revision FROM routing_revision WHERE id = 1")[0][0])

    def load(self) -> Snapshot:
        revision, rows, label_rows, split_rows = self._read_all(
            ("SELECT revision FROM routing_revision WHERE id = 1", ()),
            ("SELECT alias, spec, owner, actor, revision, updated_at FROM routes", ()),
            (f"SELECT {_LABEL_COLUMNS} FROM route_labels ORDER BY kind, subject, label", ()),
            (f"SELECT {_SPLIT_COLUMNS} FROM route_splits", ()))
        labels: dict[tuple[str, str], dict[str, Label]] = {}
        for row in label_rows:
            label = _decode_label(tuple(row))
            labels.setdefault((label.kind, label.subject), {})[label.label] = label
        return Snapshot(int(revision[0][0]), {r[0]: _decode(tuple(r)) for r in rows}, labels,
                        {r[0]: _decode_split(tuple(r)) for r in split_rows})

    def _bump(self, db: Any) -> int:
        db.execute("UPDATE routing_revision SET revision = revision + 1 WHERE id = 1")
        return int(db.execute("SELECT revision FROM routing_revision WHERE id = 1").fetchone()[0])

    def _current(self, db: Any, alias: str) -> Route | None:
        m = self._mark
        row = db.execute(f"SELECT alias, spec, owner, actor, revision, updated_at FROM routes WHERE alias = {m}",
                         (alias,)).fetchone()
        return _decode(tuple(row)) if row else None

    def put(self, route: Route, *, reason: str = "") -> int:
        """Write ``route``. An alias that exists keeps its owner: only that owner may move it (checked in the
        transaction, so two writers cannot both take a free alias)."""
        m = self._mark
        with self._tx() as db:
            previous = self._current(db, route.alias)
            if previous is not None and previous.owner != route.owner:
                raise _owned(route.alias, previous.owner, route.owner)
            if self._split(db, route.alias) is not None:
                raise Conflict(f"{route.alias!r} is a release endpoint; clients would reach the release, not this "
                               "route: use another alias", param="alias", code="alias_not_owned")
            revision = self._bump(db)
            spec = route.spec.model_dump_json()
            db.execute(f"INSERT INTO routes (alias, spec, owner, actor, revision, updated_at) VALUES ({m}, {m}, {m}, "
                       f"{m}, {m}, {m}) ON CONFLICT (alias) DO UPDATE SET spec = excluded.spec, owner = "
                       "excluded.owner, actor = excluded.actor, revision = excluded.revision, updated_at = "
                       "excluded.updated_at", (route.alias, spec, route.owner, route.actor, revision, time.time()))
            audit.append(db, _event("route.set", route, previous=previous, reason=reason, revision=revision))
            return revision

    def remove(self, alias: str, *, owner: str, actor: str, reason: str = "") -> int | None:
        with self._tx() as db:
            previous = self._current(db, alias)
            if previous is None:
                return None
            if previous.owner != owner:
                raise _owned(alias, previous.owner, owner)
            revision = self._bump(db)
            db.execute(f"DELETE FROM routes WHERE alias = {self._mark}", (alias,))
            gone = Route(alias, previous.spec, owner, actor)
            audit.append(db, _event("route.remove", gone, previous=previous, reason=reason, revision=revision))
            return revision

    def _label_version(self, db: Any, kind: str, subject: str, label: str) -> int | None:
        m = self._mark
        row = db.execute(f"SELECT version FROM route_labels WHERE kind = {m} AND subject = {m} AND label = {m}",
                         (kind, subject, label)).fetchone()
        return int(row[0]) if row else None

    def put_label(self, label: Label, *, action: str = "label.move", reason: str = "",
                  details: Mapping[str, Any] | None = None, only_if_absent: bool = False) -> int | None:
        m = self._mark
        with self._tx() as db:
            previous = self._label_version(db, label.kind, label.subject, label.label)
            if previous is not None and only_if_absent:
                return previous
            revision = self._bump(db)
            db.execute(f"INSERT INTO route_labels ({_LABEL_COLUMNS}) VALUES ({m}, {m}, {m}, {m}, {m}, {m}, {m}, {m}) "
                       "ON CONFLICT (kind, subject, label) DO UPDATE SET version = excluded.version, ref = "
                       "excluded.ref, actor = excluded.actor, revision = excluded.revision, updated_at = "
                       "excluded.updated_at", (label.kind, label.subject, label.label, label.version, label.ref,
                                               label.actor, revision, time.time()))
            audit.append(db, _label_event(action, label.kind, label.subject, label.label, actor=label.actor,
                                          previous=previous, version=label.version, reason=reason,
                                          details={"revision": revision, "ref": label.ref, **(details or {})}))
            return previous

    def remove_label(self, kind: str, subject: str, label: str, *, actor: str, reason: str = "",
                     action: str = "label.remove") -> int | None:
        m = self._mark
        with self._tx() as db:
            previous = self._label_version(db, kind, subject, label)
            if previous is None:
                return None
            revision = self._bump(db)
            db.execute(f"DELETE FROM route_labels WHERE kind = {m} AND subject = {m} AND label = {m}",
                       (kind, subject, label))
            audit.append(db, _label_event(action, kind, subject, label, actor=actor, previous=previous, version=None,
                                          reason=reason, details={"revision": revision}))
            return previous

    def _split(self, db: Any, endpoint: str) -> Split | None:
        row = db.execute(f"SELECT {_SPLIT_COLUMNS} FROM route_splits WHERE endpoint = {self._mark}",
                         (endpoint,)).fetchone()
        return _decode_split(tuple(row)) if row else None

    def put_split(self, split: Split, *, reason: str = "") -> Split | None:
        m = self._mark
        with self._tx() as db:
            previous = self._split(db, split.endpoint)
            if previous is not None and previous.owner != split.owner:
                raise _owned(split.endpoint, previous.owner, split.owner)
            if previous is not None and (previous.release_id, previous.release_revision) >= (
                    split.release_id, split.release_revision):
                return previous  # already there, or newer: a late writer must not turn the clock back
            if self._current(db, split.endpoint) is not None:
                raise Conflict(f"{split.endpoint!r} is a routed model alias; a release endpoint needs a name of its "
                               "own", param="name", code="release_name_taken")
            revision = self._bump(db)
            db.execute(f"INSERT INTO route_splits ({_SPLIT_COLUMNS}) VALUES ({', '.join([m] * 8)}) ON "
                       "CONFLICT (endpoint) DO UPDATE SET owner = excluded.owner, release_id = excluded.release_id, "
                       "release_revision = excluded.release_revision, weights = excluded.weights, actor = "
                       "excluded.actor, revision = excluded.revision, updated_at = excluded.updated_at",
                       (split.endpoint, split.owner, split.release_id, split.release_revision,
                        json.dumps(split.weights), split.actor, revision, time.time()))
            audit.append(db, AuditEvent(
                trail=TRAIL, action="split.set", subject_kind="release_endpoint", subject=split.endpoint,
                subject_ref=split.owner, actor=split.actor, reason=reason,
                from_ref=_split_text(previous.weights) if previous else None, to_ref=_split_text(split.weights),
                details={"revision": revision, "release_id": split.release_id,
                         "release_revision": split.release_revision, "weights": split.weights}))
            return None

    def history(self, alias: str | None = None, limit: int = 100) -> list[AuditEvent]:
        return self.audit_events(subject_kind="model_alias", subject=alias, limit=limit)

    def audit_events(self, **filters: Any) -> list[AuditEvent]:
        """The routing trail's events, newest first (filters: :func:`app.core.audit.select`'s)."""
        sql, args = audit.select(postgres=self._mark == "%s", trail=TRAIL, **filters)
        return [audit.decode(r) for r in self._read(sql, args)]


class SqliteRoutingStore(_SqlRoutingStore):
    """One file; writes take SQLite's write lock (``BEGIN IMMEDIATE``). Reads use a connection of their own, so a
    write waiting for another process's lock never holds up a read (WAL readers do not wait for writers)."""

    def __init__(self, path: Path | str) -> None:
        self._file = SqliteFile(path, MIGRATIONS, what="the routing table", before=audit.ensure_schema_sqlite)
        self.path = self._file.path

    def _tx(self):
        return self._file.tx()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._file.read(sql, args)

    def _read_all(self, *queries: tuple[str, tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
        return self._file.read_all(*queries)

    def close(self) -> None:
        self._file.close()


class PostgresRoutingStore(_SqlRoutingStore):
    """Several API processes (and machines) on one table; every write one transaction."""

    _mark = "%s"

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        def migrate(timeout: float) -> None:
            audit.ensure_schema_postgres(url, connect_timeout_s=timeout)
            upgrade_postgres(url, MIGRATIONS, connect_timeout_s=timeout)

        self._pg = PostgresPool(url, whose="the routing table's", setting="routing.url", name="keel-routing",
                                migrate=migrate, timeout_s=timeout_s)

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._pg.transaction() as conn:
            conn.execute("LOCK TABLE routing_revision IN EXCLUSIVE MODE")  # writers take turns
            yield conn

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._pg.read(sql, args)

    def _read_all(self, *queries: tuple[str, tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
        return self._pg.read_all(*queries)

    def close(self) -> None:
        self._pg.close()


def _label_event(action: str, kind: str, subject: str, label: str, *, actor: str, previous: int | None,
                 version: int | None, reason: str, details: dict[str, Any]) -> AuditEvent:
    return AuditEvent(trail=TRAIL, action=action, subject_kind=label_subject_kind(kind), subject=subject,
                      subject_ref=label, actor=actor, from_ref=previous, to_ref=version, reason=reason,
                      details=details)


def label_subject_kind(kind: str) -> str:
    """The audit ``subject_kind`` of a kind's label events (``prompt`` -> ``prompt_label``)."""
    return f"{kind}_label"


def _owned(alias: str, owner: str, wanted_by: str) -> Conflict:
    return Conflict(f"model alias {alias!r} is routed by {owner}; {wanted_by} may not change it: use another alias",
                    param="alias", code="alias_not_owned")


class RoutingTable:
    """Configured aliases overlaid with the store's run-time routes (which may never shadow a configured one)."""

    def __init__(self, configured: Mapping[str, ModelAlias], backends: Mapping[str, BackendSettings],
                 store: RoutingStore, *, check_interval_s: float = 1.0) -> None:
        self.configured = dict(configured)
        self.backends = backends
        self.store = store
        self._routes: dict[str, Route] = {}
        self._labels: dict[tuple[str, str], dict[str, Label]] = {}
        self._splits: dict[str, Split] = {}
        self._revision = -1
        self._refresh = ThrottledRefresh(check_interval_s, self._check, name="keel-routing-refresh")
        self._unusable: dict[str, int] = {}
        self.refresh(force=True)

    # -- reads (hot path) ----------------------------------------------------------------------------

    def get(self, alias: str) -> ModelAlias | None:
        spec = self.configured.get(alias)
        if spec is not None:
            return spec
        self.refresh()
        route = self._routes.get(alias)
        return route.spec if route else None

    def aliases(self) -> dict[str, ModelAlias]:
        self.refresh()
        return {**{a: r.spec for a, r in self._routes.items() if a not in self.configured}, **self.configured}

    def owner(self, alias: str) -> str | None:
        if alias in self.configured:
            return CONFIGURED
        self.refresh()
        route = self._routes.get(alias)
        return route.owner if route else None

    def routes(self) -> list[Route]:
        """Every alias with its owner: configured ones (revision 0), then the run-time routes."""
        self.refresh()
        out = [Route(a, s, CONFIGURED) for a, s in sorted(self.configured.items())]
        return out + [r for a, r in sorted(self._routes.items()) if a not in self.configured]

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def check_interval_s(self) -> float:
        return self._refresh.interval_s

    @check_interval_s.setter
    def check_interval_s(self, value: float) -> None:
        self._refresh.interval_s = value

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the routes when the store's revision moved, at most every ``check_interval_s``, never waiting
        on the store on the request path (:class:`app.core.db.ThrottledRefresh`): a change is served within about
        one interval. A store that cannot be read keeps the routes last read (logged)."""
        self._refresh(force=force)

    def catch_up(self) -> int:
        """Check the store now, on the caller's thread, re-reading what moved; the revision served after. For a
        reader with a cache of its own keyed by this revision (the prompt registry), which checks on its own
        schedule and must not wait a second interval for this table's."""
        self._refresh.now()
        return self._revision

    def _check(self, force: bool) -> None:
        try:
            if not force and self.store.revision() == self._revision:
                return
            snapshot = self.store.load()
        except StoreUnavailable as e:
            if force:
                raise
            log.warning("routing table not refreshed (serving revision %d): %s", self._revision, e.message)
            return
        self._routes = {a: r for a, r in snapshot.routes.items() if self._usable(r)}
        self._labels = snapshot.labels
        self._splits = snapshot.splits
        self._revision = snapshot.revision

    def _usable(self, route: Route) -> bool:
        """A route written when its backend existed (or by a process with other settings sharing the store) is
        ignored while this process has no such backend: a 404 for the alias, not a 500."""
        if route.spec.backend in self.backends:
            return True
        if self._unusable.get(route.alias) != route.revision:
            self._unusable[route.alias] = route.revision
            log.warning("route %r (revision %d, %s) names backend %r, which this process does not have: ignored",
                        route.alias, route.revision, route.owner, route.spec.backend)
        return False

    # -- writes ---------------------------------------------------------------------------------------

    def set(self, alias: str, spec: ModelAlias, *, owner: str, actor: str, reason: str = "") -> Route:
        """Route ``alias`` to ``spec`` for ``owner``. Refused for a configured alias and for one another owner
        routes (409 ``alias_not_owned``), and for a backend or fallback that does not exist (400)."""
        if alias in self.configured:
            raise Conflict(f"model alias {alias!r} is configured in the settings (models.{alias}); it cannot be "
                           "changed at run time: use another alias, or remove it from the settings first",
                           param="alias", code="alias_not_owned")
        if alias in self._splits:
            raise Conflict(f"{alias!r} is a release endpoint; clients would reach the release, not this route: use "
                           "another alias", param="alias", code="alias_not_owned")
        if spec.backend not in self.backends:
            raise InvalidRequest(f"unknown backend {spec.backend!r}; configured: {', '.join(self.backends)}",
                                 param="backend")
        if spec.fallback and self.get(spec.fallback) is None:
            raise InvalidRequest(f"fallback {spec.fallback!r} is not a model alias", param="fallback")
        self.refresh(force=True)
        current = self._routes.get(alias)
        if current is not None and current.owner == owner and current.spec == spec:
            return current  # already so (a restore after a restart): no new revision, no audit noise
        self.store.put(Route(alias, spec, owner, actor), reason=reason)
        self.refresh(force=True)
        return self._routes.get(alias) or Route(alias, spec, owner, actor)  # (unless removed meanwhile)

    def remove(self, alias: str, *, owner: str, actor: str, reason: str = "") -> bool:
        if alias in self.configured:
            raise Conflict(f"model alias {alias!r} is configured in the settings; it cannot be removed at run time",
                           param="alias", code="alias_not_owned")
        gone = self.store.remove(alias, owner=owner, actor=actor, reason=reason) is not None
        self.refresh(force=True)
        return gone

    def history(self, alias: str | None = None, limit: int = 100) -> list[AuditEvent]:
        return self.store.history(alias, limit)

    # -- labels ---------------------------------------------------------------------------------------

    def labels(self, kind: str, subject: str) -> dict[str, Label]:
        """``subject``'s labels of ``kind``, by name (served from memory, like the routes)."""
        self.refresh()
        return dict(self._labels.get((kind, subject), {}))

    def all_labels(self, kind: str) -> dict[str, dict[str, Label]]:
        """Every subject's labels of ``kind``."""
        self.refresh()
        return {subject: dict(labels) for (k, subject), labels in self._labels.items() if k == kind}

    def set_label(self, label: Label, *, action: str = "label.move", reason: str = "",
                  details: Mapping[str, Any] | None = None, only_if_absent: bool = False) -> int | None:
        """Point ``label`` at its version; return the version it pointed at before. The caller checks that the
        version exists: versions are immutable and never deleted, so the check cannot go stale."""
        previous = self.store.put_label(label, action=action, reason=reason, details=details,
                                        only_if_absent=only_if_absent)
        self.refresh(force=True)
        return previous

    def remove_label(self, kind: str, subject: str, label: str, *, actor: str, reason: str = "",
                     action: str = "label.remove") -> int | None:
        previous = self.store.remove_label(kind, subject, label, actor=actor, reason=reason, action=action)
        self.refresh(force=True)
        return previous

    def label_events(self, kind: str, *, subject: str | None = None, label: str | None = None, limit: int = 100,
                     before_id: int | None = None, until: float | None = None) -> list[AuditEvent]:
        """The audit events of ``kind``'s label moves, newest first."""
        return self.store.audit_events(subject_kind=label_subject_kind(kind), subject=subject, subject_ref=label,
                                       before_id=before_id, until=until, limit=limit)

    # -- splits ---------------------------------------------------------------------------------------

    def split(self, endpoint: str | None) -> Split | None:
        """How the release endpoint ``endpoint`` divides its traffic (served from memory)."""
        if not endpoint:
            return None
        self.refresh()
        return self._splits.get(endpoint)

    def splits(self) -> dict[str, Split]:
        self.refresh()
        return dict(self._splits)

    def set_split(self, endpoint: str, weights: Mapping[str, float], *, owner: str, release_id: int,
                  release_revision: int, actor: str, reason: str = "") -> Split:
        """Divide ``endpoint``'s traffic by ``weights`` for ``owner``, as of revision ``release_revision`` of its
        release ``release_id``. Refused for a configured or routed model alias and for an endpoint another owner
        splits (409); a split already written from that state or a later one stays as it is (returned)."""
        if endpoint in self.configured:
            raise Conflict(f"{endpoint!r} is a configured model alias (models.{endpoint}); a release endpoint needs "
                           "a name of its own", param="name", code="release_name_taken")
        self.refresh(force=True)
        current = self._splits.get(endpoint)
        wanted = Split(endpoint, owner, release_id, release_revision, {k: float(v) for k, v in weights.items()},
                       actor)
        if current is not None and current.owner == owner and not current.behind(release_id, release_revision,
                                                                                 wanted.weights):
            return current  # newer, or the same traffic (a pause): nothing to write
        self.store.put_split(wanted, reason=reason)
        self.refresh(force=True)
        return self._splits.get(endpoint) or wanted

    def split_events(self, endpoint: str | None = None, limit: int = 100) -> list[AuditEvent]:
        return self.store.audit_events(subject_kind="release_endpoint", subject=endpoint, limit=limit)

    def close(self) -> None:
        self.store.close()


def open_routing_store(url: str | None, home: Path) -> RoutingStore:
    """Postgres when ``url`` is set, else ``<home>/routing.db``."""
    return PostgresRoutingStore(url) if url else SqliteRoutingStore(Path(home) / "routing.db")


def open_routing_table(settings: CoreConfig) -> RoutingTable:
    """The durable routing table of a Keel home (or of ``routing.url``), as every process opens it."""
    url = settings.routing.url
    return RoutingTable(settings.models, settings.backends,
                        open_routing_store(url.get_secret_value() if url else None, settings.home),
                        check_interval_s=settings.routing.check_interval_s)


def memory_table(configured: Mapping[str, ModelAlias], backends: Mapping[str, BackendSettings]) -> RoutingTable:
    """A table on an in-memory store (tests, a router built without a Keel home)."""
    return RoutingTable(configured, backends, SqliteRoutingStore(":memory:"), check_interval_s=0.0)
