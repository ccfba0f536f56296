"""The routing table: one contract for the SQLite and the Postgres store, and the table on top of them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from app.core.errors import Conflict, InvalidRequest
from app.core.settings import BackendSettings, ModelAlias
from app.llm.routing import (
    CONFIGURED,
    Label,
    PostgresRoutingStore,
    Route,
    RoutingStore,
    RoutingTable,
    SqliteRoutingStore,
)

CONFIGURED_MODELS = {"smollm2": ModelAlias(backend="local", model="smollm2")}
BACKENDS = {"local": BackendSettings(kind="openai", base_url="http://127.0.0.1:9/v1")}
Opener = Callable[[], RoutingStore]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path) -> Iterator[Opener]:
    """Opens stores on one database: each call is another process's view of the same table."""
    if request.param == "sqlite":
        def opener() -> RoutingStore:
            return SqliteRoutingStore(tmp_path / "routing.db")
    else:
        url = request.getfixturevalue("postgres_url")

        def opener() -> RoutingStore:
            return PostgresRoutingStore(url)
    opened: list[RoutingStore] = []

    def tracked() -> RoutingStore:
        opened.append(opener())
        return opened[-1]

    yield tracked
    for s in opened:
        s.close()


def table(store: RoutingStore, interval: float = 0.0) -> RoutingTable:
    return RoutingTable(CONFIGURED_MODELS, BACKENDS, store, check_interval_s=interval)


def adapter(name: str, fallback: str | None = None) -> ModelAlias:
    return ModelAlias(backend="local", model=name, fallback=fallback, description=f"LoRA {name}")


def test_a_route_set_by_one_process_is_served_by_another_and_survives_a_restart(open_store):
    a, b = table(open_store()), table(open_store())
    assert b.get("support") is None
    a.set("support", adapter("support-v1"), owner="finetune:support", actor="alice")
    assert b.get("support").model == "support-v1"  # b re-reads: the revision moved
    assert b.owner("support") == "finetune:support"
    assert table(open_store()).get("support").model == "support-v1"  # a new process after a restart
    assert set(b.aliases()) == {"smollm2", "support"}


def test_configured_aliases_are_read_only_and_win(open_store):
    t = table(open_store())
    with pytest.raises(Conflict) as e:
        t.set("smollm2", adapter("x"), owner="finetune:m", actor="a")
    assert e.value.code == "alias_not_owned"
    with pytest.raises(Conflict):
        t.remove("smollm2", owner="finetune:m", actor="a")
    assert t.owner("smollm2") == CONFIGURED
    assert t.get("smollm2") == CONFIGURED_MODELS["smollm2"]


def test_an_alias_stays_with_its_owner(open_store):
    t = table(open_store())
    t.set("canary", adapter("v1"), owner="finetune:m", actor="a")
    with pytest.raises(Conflict, match="finetune:m"):
        t.set("canary", adapter("v2"), owner="release:r", actor="b")
    with pytest.raises(Conflict):
        t.remove("canary", owner="release:r", actor="b")
    t.set("canary", adapter("v2"), owner="finetune:m", actor="a")  # the owner moves it
    assert t.get("canary").model == "v2"
    assert t.remove("canary", owner="finetune:m", actor="a") is True
    assert t.get("canary") is None
    assert t.remove("canary", owner="finetune:m", actor="a") is False


def test_bad_routes_are_refused_before_anything_is_written(open_store):
    t = table(open_store())
    before = t.revision
    with pytest.raises(InvalidRequest, match="unknown backend"):
        t.set("x", ModelAlias(backend="nowhere", model="m"), owner="o", actor="a")
    with pytest.raises(InvalidRequest, match="fallback"):
        t.set("x", adapter("m", fallback="missing"), owner="o", actor="a")
    t.set("x", adapter("m", fallback="smollm2"), owner="o", actor="a")
    assert t.revision == before + 1


def test_every_change_is_audited_with_its_revision(open_store):
    t = table(open_store())
    t.set("a1", adapter("v1"), owner="finetune:m", actor="alice", reason="first")
    t.set("a1", adapter("v2"), owner="finetune:m", actor="bob")
    t.remove("a1", owner="finetune:m", actor="carol", reason="retired")
    events = t.history("a1")
    assert [(e.action, e.actor, e.from_ref, e.to_ref) for e in events] == [
        ("route.remove", "carol", "v2", None), ("route.set", "bob", "v1", "v2"), ("route.set", "alice", None, "v1")]
    assert [e.details["revision"] for e in events] == [3, 2, 1]
    assert events[0].reason == "retired"


def test_racing_writers_never_both_take_a_free_alias(open_store):
    stores = [open_store() for _ in range(4)]
    won, lost = [], []

    def take(i: int) -> None:
        try:
            table(stores[i]).set("contested", adapter(f"v{i}"), owner=f"release:r{i}", actor=str(i))
            won.append(i)
        except Conflict:
            lost.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(won) == 1 and len(lost) == 3
    assert table(open_store()).owner("contested") == f"release:r{won[0]}"


def test_reads_do_not_touch_the_store_between_checks(tmp_path):
    calls = []

    class Counting(SqliteRoutingStore):
        def revision(self) -> int:
            calls.append("revision")
            return super().revision()

        def load(self):
            calls.append("load")
            return super().load()

    t = table(Counting(tmp_path / "r.db"), interval=3600)
    assert calls == ["load"]
    for _ in range(100):
        t.get("anything")
        t.aliases()
    assert calls == ["load"]  # within the interval the routes in memory answer
    t.check_interval_s = 0
    t.get("anything")
    assert calls == ["load", "revision"]  # unchanged revision: nothing reloaded


def test_a_read_never_waits_for_a_writer_holding_the_lock(tmp_path):
    """Reads run on the event loop: a deploy waiting for another process's write lock must not hold them up."""
    import sqlite3
    import time

    path = tmp_path / "routing.db"
    t = table(SqliteRoutingStore(path), interval=0.05)
    t.set("a", adapter("v1"), owner="o", actor="x")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process is writing
    try:
        time.sleep(0.06)
        started = time.monotonic()
        for _ in range(50):
            assert t.get("a").model == "v1"
            time.sleep(0.002)
        took = time.monotonic() - started
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert took < 5  # it answered from memory while the write lock was held (a blocked read waits 30 s)


def test_a_change_by_another_process_is_picked_up_in_the_background(tmp_path):
    import time

    writer, reader = table(SqliteRoutingStore(tmp_path / "r.db")), table(SqliteRoutingStore(tmp_path / "r.db"),
                                                                          interval=0.01)
    writer.set("late", adapter("v1"), owner="o", actor="x")
    deadline = time.monotonic() + 10
    while reader.get("late") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reader.get("late").model == "v1"


def test_a_route_to_a_backend_this_process_lacks_is_ignored_not_a_crash(tmp_path):
    wide = RoutingTable(CONFIGURED_MODELS, {**BACKENDS, "gpu": BACKENDS["local"]},
                        SqliteRoutingStore(tmp_path / "r.db"))
    wide.set("on-gpu", ModelAlias(backend="gpu", model="big"), owner="release:r", actor="x")
    narrow = table(SqliteRoutingStore(tmp_path / "r.db"))
    assert narrow.get("on-gpu") is None and "on-gpu" not in narrow.aliases()
    assert wide.get("on-gpu").model == "big"


def test_an_unreadable_store_keeps_serving_the_routes_last_read(tmp_path):
    from app.core.errors import StoreUnavailable

    t = table(SqliteRoutingStore(tmp_path / "r.db"))
    t.set("kept", adapter("v1"), owner="o", actor="x")

    def broken(*a, **kw):
        raise StoreUnavailable("the routing table is unavailable (disk gone)")

    t.store.revision = broken  # type: ignore[method-assign]
    t.store.load = broken  # type: ignore[method-assign]
    assert t.get("kept").model == "v1"
    with pytest.raises(StoreUnavailable):
        t.set("new", adapter("v2"), owner="o", actor="x")


# --- labels: which version of a versioned artifact (a prompt template) a named label serves ---------------------


def test_labels_are_shared_revisioned_and_audited(open_store):
    a, b = table(open_store()), table(open_store())
    rev = a.revision
    assert a.set_label(Label("prompt", "greet", "production", 1, ref="h1", actor="ann")) is None
    assert a.set_label(Label("prompt", "greet", "production", 2, ref="h2", actor="bob"), reason="launch") == 1
    assert a.set_label(Label("prompt", "other", "staging", 4, actor="bob")) is None
    assert a.revision == rev + 3
    b.refresh(force=True)
    got = b.labels("prompt", "greet")["production"]
    assert (got.version, got.ref, got.actor, got.revision) == (2, "h2", "bob", rev + 2)
    assert {s: sorted(ls) for s, ls in b.all_labels("prompt").items()} == {"greet": ["production"],
                                                                            "other": ["staging"]}
    assert b.labels("adapter", "greet") == {} and b.routes() == [r for r in b.routes() if r.owner == CONFIGURED]
    # a label the table has is kept by a hand-over (only_if_absent), and nothing is written for it
    assert b.set_label(Label("prompt", "greet", "production", 1), only_if_absent=True) == 2
    assert b.remove_label("prompt", "other", "staging", actor="carl") == 4
    assert b.remove_label("prompt", "other", "staging", actor="carl") is None
    assert a.catch_up() == b.revision and "other" not in a.all_labels("prompt")
    events = a.label_events("prompt")
    assert [(e.action, e.subject, e.subject_ref, e.from_ref, e.to_ref, e.actor) for e in events] == [
        ("label.remove", "other", "staging", "4", None, "carl"), ("label.move", "other", "staging", None, "4", "bob"),
        ("label.move", "greet", "production", "1", "2", "bob"), ("label.move", "greet", "production", None, "1", "ann")]
    assert events[2].reason == "launch" and events[2].details == {"revision": rev + 2, "ref": "h2"}
    assert a.history() == []  # the model-alias history holds route changes only


def test_racing_label_movers_each_land_once(open_store):
    """Movers on several processes: every move is one revision and one audit row, and the last one serves."""
    stores = [open_store() for _ in range(4)]
    barrier = threading.Barrier(len(stores))

    def move(i: int) -> None:
        barrier.wait()
        stores[i].put_label(Label("prompt", "greet", "production", i + 1, actor=f"w{i}"))

    threads = [threading.Thread(target=move, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t = table(stores[0])
    events = t.label_events("prompt", subject="greet")
    assert len(events) == 4 and len({e.details["revision"] for e in events}) == 4
    assert t.labels("prompt", "greet")["production"].version == int(events[0].to_ref)
    # each move saw the one before it
    assert [e.from_ref for e in reversed(events)][1:] == [e.to_ref for e in reversed(events)][:-1]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_routing_table_of_the_previous_release_is_upgraded_with_its_routes(kind, request, tmp_path):
    """A routing table at revision 0001 (before labels and splits) opens at head: its routes kept, the new
    shapes usable."""
    import sqlite3

    import psycopg
    from alembic import command
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from app.core import audit, migrate
    from app.llm.routing import MIGRATIONS

    if kind == "sqlite":
        path = tmp_path / "routing.db"
        conn = sqlite3.connect(path, isolation_level=None)
        audit.ensure_schema_sqlite(conn)
        conn.close()
        engine, mark = create_engine(f"sqlite:///{path}"), "?"
        reopen = lambda: SqliteRoutingStore(path)  # noqa: E731
    else:
        url = request.getfixturevalue("postgres_url")
        audit.ensure_schema_postgres(url)
        engine = create_engine("postgresql+psycopg://", poolclass=NullPool, creator=lambda: psycopg.connect(url))
        mark, reopen = "%s", lambda: PostgresRoutingStore(url)
    with engine.begin() as bind:
        command.upgrade(migrate.alembic_config(bind, MIGRATIONS), "0001")
        bind.exec_driver_sql(f"INSERT INTO routes VALUES ('ft-v1', {mark}, 'finetune:ft', 'ann', 1, 1.0)",
                             (adapter("ft-v1").model_dump_json(),))
        bind.exec_driver_sql("UPDATE routing_revision SET revision = 1")
    engine.dispose()
    t = table(reopen())
    assert t.get("ft-v1") == adapter("ft-v1") and t.owner("ft-v1") == "finetune:ft" and t.revision == 1
    t.set_label(Label("prompt", "greet", "production", 3, actor="ann"))
    t.set_split("support", {"a": 100}, owner="release:support", release_id=1, release_revision=1, actor="ann")
    assert t.labels("prompt", "greet")["production"].version == 3 and t.revision == 3
    t.close()
    again = table(reopen())  # reopened at head: nothing migrates, everything is there
    assert again.split("support").weights == {"a": 100.0} and again.get("ft-v1") == adapter("ft-v1")
    again.close()


def test_release_splits_share_the_alias_namespace_and_never_go_back(open_store):
    a, b = table(open_store()), table(open_store())
    a.set_split("support", {"stable": 95, "canary": 5}, owner="release:support", release_id=1, release_revision=1,
                actor="ann")
    b.refresh(force=True)
    assert b.split("support").weights == {"stable": 95.0, "canary": 5.0} and b.get("support") is None
    a.set_split("support", {"stable": 0, "canary": 100}, owner="release:support", release_id=1, release_revision=3,
                actor="bob")
    # a writer that read the release before that change: refused quietly, the newer split stays
    stale = b.set_split("support", {"stable": 75, "canary": 25}, owner="release:support", release_id=1,
                        release_revision=2, actor="late")
    assert stale.weights == {"stable": 0.0, "canary": 100.0} and stale.actor == "bob"
    # the same traffic from a later state of the release (a pause) writes nothing
    rev = a.revision
    a.set_split("support", {"stable": 0, "canary": 100}, owner="release:support", release_id=1, release_revision=4,
                actor="carl")
    assert a.revision == rev
    # a new release on the endpoint replaces the split
    a.set_split("support", {"stable": 50, "canary": 50}, owner="release:support", release_id=2, release_revision=1,
                actor="dana")
    with pytest.raises(Conflict, match="routed by release:support"):
        a.set_split("support", {"x": 100}, owner="release:other", release_id=9, release_revision=1, actor="eve")
    with pytest.raises(Conflict, match="release endpoint"):
        b.set("support", adapter("x"), owner="finetune:x", actor="eve")
    with pytest.raises(Conflict, match="release endpoint"):  # checked in the transaction too
        b.store.put(Route("support", adapter("x"), "finetune:x", "eve"))
    a.set("ft-v1", adapter("ft-v1"), owner="finetune:ft", actor="ann")
    with pytest.raises(Conflict, match="routed model alias"):
        b.set_split("ft-v1", {"a": 100}, owner="release:ft-v1", release_id=3, release_revision=1, actor="eve")
    with pytest.raises(Conflict, match="configured model alias"):
        b.set_split("smollm2", {"a": 100}, owner="release:smollm2", release_id=4, release_revision=1, actor="eve")
    events = a.split_events("support")
    assert [(e.actor, e.from_ref, e.to_ref, e.details["release_id"]) for e in events] == [
        ("dana", "stable 0%, canary 100%", "stable 50%, canary 50%", 2),
        ("bob", "stable 95%, canary 5%", "stable 0%, canary 100%", 1), ("ann", None, "stable 95%, canary 5%", 1)]
