"""The routing table: which model alias is served by what, durable and shared by every API process.

Keel has one model of what serves traffic. The aliases configured in the settings (``models``) are its base
and never change at run time; everything that moves traffic while Keel runs (an adapter deploy today, blue/green
switches and releases next) writes a *route* here instead of touching the settings: an alias, the
:class:`~app.core.settings.ModelAlias` it resolves to, and the owner that wrote it (``finetune:<model>``,
``release:<name>``), so one component cannot take over another's alias. Each change is one transaction with
its audit event (trail ``routing``) and bumps the table's revision.

The store is SQLite (``<home>/routing.db``) on one machine and Postgres (``routing.url``) across machines. Every
process keeps the table in memory and re-reads it when the revision moved, checking at most every
``check_interval_s`` on the request path: a deploy by one API process, a worker or the CLI is served by every
process within that interval, and survives restarts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
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


class RoutingStore(Protocol):
    """Where run-time routes live. Writes are atomic with their audit event and bump the revision."""

    def revision(self) -> int: ...

    def load(self) -> tuple[int, dict[str, Route]]: ...

    def put(self, route: Route, *, reason: str = "") -> int: ...

    def remove(self, alias: str, *, owner: str, actor: str, reason: str = "") -> int | None: ...

    def history(self, alias: str | None = None, limit: int = 100) -> list[AuditEvent]: ...

    def audit_events(self, **filters: Any) -> list[AuditEvent]: ...

    def close(self) -> None: ...


def _decode(row: tuple[Any, ...]) -> Route:
    alias, spec, owner, actor, revision, updated_at = row
    return Route(alias, ModelAlias.model_validate(json.loads(spec)), owner, actor, int(revision), float(updated_at))


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

    def load(self) -> tuple[int, dict[str, Route]]:
        revision, rows = self._read_all(("SELECT revision FROM routing_revision WHERE id = 1", ()),
                                        ("SELECT alias, spec, owner, actor, revision, updated_at FROM routes", ()))
        return int(revision[0][0]), {r[0]: _decode(tuple(r)) for r in rows}

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

    def history(self, alias: str | None = None, limit: int = 100) -> list[AuditEvent]:
        return self.audit_events(subject=alias, limit=limit)

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
        self._revision = -1
        self._refresh = ThrottledRefresh(check_interval_s, self._check, name="keel-routing-refresh")
        self._unusable: dict[str, int] = {}
        #: names other things clients call as a model own (release endpoints): a route may not take them
        self.reserved: Callable[[str], str | None] = lambda alias: None
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

    def _check(self, force: bool) -> None:
        try:
            if not force and self.store.revision() == self._revision:
                return
            revision, routes = self.store.load()
        except StoreUnavailable as e:
            if force:
                raise
            log.warning("routing table not refreshed (serving revision %d): %s", self._revision, e.message)
            return
        self._routes = {a: r for a, r in routes.items() if self._usable(r)}
        self._revision = revision

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
        taken = self.reserved(alias)
        if taken:
            raise Conflict(f"{alias!r} is {taken}; clients would reach that, not this route: use another alias",
                           param="alias", code="alias_not_owned")
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
