"""The routing table: one contract for the SQLite and the Postgres store, and the table on top of them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from app.core.errors import Conflict, InvalidRequest
from app.core.settings import BackendSettings, ModelAlias
from app.llm.routing import (
    CONFIGURED,
    PostgresRoutingStore,
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
