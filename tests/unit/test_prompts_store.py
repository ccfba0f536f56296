"""Contract tests for PromptStore implementations.

Every implementation must pass the same suite: add a factory to ``STORES``. The Postgres
store runs on a real server (``tests/postgres.py``: pgserver or ``KEEL_TEST_POSTGRES_URL``);
where none can be had, its tests fail rather than skip.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.core.errors import Conflict, InvalidRequest, NotFound
from app.llm.routing import PostgresRoutingStore, RoutingTable, SqliteRoutingStore
from prompts.errors import ImportConflict, VersionConflict
from prompts.models import TemplateVersion
from prompts.store import PromptStore, SqlitePromptStore
from prompts.testing import content

StoreFactory = Callable[[], PromptStore]


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    path = tmp_path / "prompts.db"
    return lambda: SqlitePromptStore(path)


def _postgres(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    from prompts.store_pg import PostgresPromptStore

    url = request.getfixturevalue("postgres_url")  # a fresh database per test
    return lambda: PostgresPromptStore(url)


STORES: dict[str, Callable[[pytest.FixtureRequest, Path], StoreFactory]] = {
    "sqlite": _sqlite, "postgres": _postgres,
}


@pytest.fixture(params=sorted(STORES))
def open_store(request, tmp_path) -> Iterator[StoreFactory]:
    """Opens independent connections to one shared store (like two API workers)."""
    factory = STORES[request.param](request, tmp_path)
    opened: list[PromptStore] = []

    def make() -> PromptStore:
        store = factory()
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store) -> PromptStore:
    return open_store()


@pytest.fixture
def open_routes(request, tmp_path) -> Iterator[Callable[[], RoutingTable]]:
    """Routing tables on one store of the same kind as ``open_store``'s (where the labels live)."""
    kind = request.node.callspec.params["open_store"]
    opened: list[RoutingTable] = []

    def make() -> RoutingTable:
        store = (SqliteRoutingStore(tmp_path / "routing.db") if kind == "sqlite"
                 else PostgresRoutingStore(request.getfixturevalue("postgres_url")))
        opened.append(RoutingTable({}, {}, store, check_interval_s=0.0))
        return opened[-1]

    yield make
    for table in opened:
        table.close()


def test_protocol(store):
    assert isinstance(store, PromptStore)


def test_versions_are_numbered_and_linked(store):
    v1 = store.save("greet", content("Hi"), author="ann", message="first", base_version=None)
    v2 = store.save("greet", content("Hello"), author="bob", message="warmer", base_version=1)
    assert (v1.version, v1.parent, v2.version, v2.parent) == (1, None, 2, 1)
    assert v2.author == "bob" and v2.message == "warmer" and v2.created_at
    assert v2.hash == content("Hello").content_hash() != v1.hash
    got = store.get_version("greet", 1)
    assert got == v1 and got.content.messages[0].content == "Hi"
    assert [v.version for v in store.list_versions("greet")] == [1, 2]
    assert store.latest_version("greet") == 2 and store.latest_version("nope") is None


def test_optimistic_concurrency(store):
    store.save("greet", content("Hi"), author="a", message="", base_version=None)
    store.save("greet", content("Hi 2"), author="a", message="", base_version=1)
    with pytest.raises(VersionConflict, match=r"version 1 of 'greet' is no longer the latest \(latest is 2\)") as e:
        store.save("greet", content("stale"), author="b", message="", base_version=1)
    assert e.value.status == 409 and e.value.latest == 2
    with pytest.raises(VersionConflict, match="already exists \\(latest version 2\\)"):
        store.save("greet", content("again"), author="b", message="", base_version=None)
    with pytest.raises(VersionConflict, match="does not exist yet"):
        store.save("other", content("x"), author="b", message="", base_version=3)
    assert store.latest_version("greet") == 2


def test_not_found_messages(store):
    with pytest.raises(NotFound, match="no prompt template named 'nope'"):
        store.get_version("nope", 1)
    store.save("greet", content("Hi"), author="a", message="", base_version=None)
    with pytest.raises(NotFound, match=r"no version 9 \(latest is 1\)"):
        store.get_version("greet", 9)
    with pytest.raises(NotFound):
        store.list_versions("nope")


@pytest.mark.parametrize("name", ["../evil", "a/b", "UPPER", "", ".x", "a" * 65])
def test_names_are_validated(store, name):
    with pytest.raises(InvalidRequest, match="invalid template name"):
        store.save(name, content("x"), author="a", message="", base_version=None)


def test_audit(store):
    for i in range(3):
        store.save("greet", content(f"v{i + 1}"), author="a", message=f"m{i}", base_version=i or None)
    everything = store.audit_log(name="greet")
    assert [(e.action, e.to_version, e.actor, e.trail) for e in everything] == [
        ("version.create", 3, "a", "prompts"), ("version.create", 2, "a", "prompts"),
        ("version.create", 1, "a", "prompts")]
    assert store.audit_log(name="greet", limit=2, before_id=everything[0].id) == everything[1:3]
    assert store.audit_log(name="greet", until=everything[1].ts) == everything[1:3]
    summary = store.list_templates()[0]
    assert (summary.name, summary.latest_version, summary.labels) == ("greet", 3, {})  # labels: the registry's


def test_labels_live_in_the_routing_table(open_store, open_routes):
    """Moves, history, the summary's labels and the checks a move makes, through the registry: the versions in
    the prompt store, the labels in the routing table (audited there, trail ``routing``)."""
    from prompts.registry import PromptRegistry
    from prompts.settings import PromptSettings

    routes = open_routes()
    reg = PromptRegistry(open_store(), PromptSettings(seed_library=False), routes=routes)
    for i in range(3):
        reg.save("greet", content(f"v{i + 1}"), author="a", message=f"m{i}", base_version=i or None)
    rev = routes.revision
    assert reg.move_label("greet", "production", 1, actor="ann").from_version is None
    assert reg.move_label("greet", "production", 3, actor="bob").from_version == 1
    assert reg.move_label("greet", "staging", 2, actor="bob").from_version is None
    assert routes.revision > rev and reg.labels("greet") == {"production": 3, "staging": 2}
    assert routes.labels("prompt", "greet")["production"].ref == reg.resolve("greet@3").hash
    history = reg.label_history("greet", "production")
    assert [(h.from_version, h.to_version, h.actor, h.trail) for h in history] == [
        (1, 3, "bob", "routing"), (None, 1, "ann", "routing")]
    assert history[0].action == "label.move" and history[0].at and history[0].details["hash"]
    assert [e.action for e in routes.store.audit_events(subject_kind="prompt_label")] == ["label.move"] * 3
    assert reg.remove_label("greet", "staging", actor="c").from_version == 2
    assert reg.labels("greet") == {"production": 3}
    with pytest.raises(NotFound, match="no label 'staging'"):
        reg.remove_label("greet", "staging", actor="c")
    with pytest.raises(NotFound, match="has no version 5"):
        reg.move_label("greet", "production", 5, actor="a")
    with pytest.raises(NotFound, match="no prompt template named 'nope'"):
        reg.labels("nope")
    with pytest.raises(NotFound, match="no prompt template named 'nope'"):
        reg.remove_label("nope", "staging", actor="c")
    assert [(t.name, t.labels) for t in reg.list_templates()] == [("greet", {"production": 3})]
    assert routes.routes() == []  # no model alias was touched


def test_search(store):
    store.save("rag-answer", content("x").model_copy(update={"description": "Answer with Citations"}),
               author="a", message="", base_version=None)
    store.save("summarize", content("y"), author="a", message="", base_version=None)
    assert [t.name for t in store.list_templates("citation")] == ["rag-answer"]
    assert [t.name for t in store.list_templates("SUMM")] == ["summarize"]
    assert store.list_templates("%") == [] and store.list_templates("_") == []
    assert len(store.list_templates()) == 2


def test_import_version_is_idempotent_and_refuses_other_history(store):
    v = TemplateVersion("imp", 1, content("x"), content("x").content_hash(), None, "ann", "m",
                        "2026-01-01T00:00:00.000+00:00")
    assert store.import_version(v, actor="ci") is True
    assert store.get_version("imp", 1) == v  # author and time are kept
    assert store.import_version(v, actor="ci") is False
    other = TemplateVersion("imp", 1, content("y"), content("y").content_hash(), None, "x", "", v.created_at)
    with pytest.raises(ImportConflict, match="history differs"):
        store.import_version(other, actor="ci")
    gap = TemplateVersion("imp", 3, content("z"), content("z").content_hash(), 2, "x", "", v.created_at)
    with pytest.raises(ImportConflict, match="the next must be 2"):
        store.import_version(gap, actor="ci")


@pytest.mark.parametrize("shared_connection", [False, True], ids=["two-connections", "one-connection"])
def test_two_writers_race(open_store, shared_connection):
    """Two writers editing the same base: exactly one wins, the other gets a 409."""
    first = open_store()
    first.save("race", content("base"), author="a", message="", base_version=None)
    for round_ in range(5):
        stores = [first, first] if shared_connection else [first, open_store()]
        barrier = threading.Barrier(2)
        results: list[object] = [None, None]
        base = first.latest_version("race")

        def write(i: int, base: int = base, stores: list = stores, results: list = results,
                  barrier: threading.Barrier = barrier, round_: int = round_) -> None:
            barrier.wait()
            try:
                results[i] = stores[i].save("race", content(f"writer {i} round {round_}"), author=f"w{i}",
                                            message="", base_version=base)
            except Exception as exc:  # collected and asserted below
                results[i] = exc

        threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wins = [r for r in results if isinstance(r, TemplateVersion)]
        losses = [r for r in results if isinstance(r, Exception)]
        assert len(wins) == 1 and len(losses) == 1, results
        assert isinstance(losses[0], Conflict) and losses[0].status == 409
        assert f"latest is {base + 1}" in str(losses[0])
        assert first.latest_version("race") == base + 1


def test_failed_writes_roll_back_partial_writes(open_store):
    store = open_store()
    store.save("greet", content("Hi"), author="a", message="", base_version=None)
    broken = open_store()  # another connection whose audit insert fails after the version rows are written

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    broken._audit = boom
    rev = store.revision()
    with pytest.raises(RuntimeError):
        broken.save("greet", content("Hello"), author="a", message="", base_version=1)
    with pytest.raises(RuntimeError):
        broken.save("fresh", content("Hello"), author="a", message="", base_version=None)
    assert store.latest_version("greet") == 1 and store.latest_version("fresh") is None
    assert [v.version for v in store.list_versions("greet")] == [1]
    assert [e.action for e in store.audit_log()] == ["version.create"]
    assert store.revision() == rev  # nothing committed, so other workers have nothing to reload
    # the failed connection is still usable afterwards
    assert broken.latest_version("greet") == 1
    del broken._audit
    assert broken.save("greet", content("Hello"), author="a", message="", base_version=1).version == 2


def test_registries_on_one_store_see_each_others_label_moves(open_store, open_routes):
    """Two API workers: a label moved through one is rendered by the other after its next change check,
    without a restart; until then the other serves its cached version from memory."""
    from prompts.registry import PromptRegistry
    from prompts.settings import PromptSettings

    now = [0.0]
    settings = PromptSettings(seed_library=False, change_check_interval_s=0.5)
    a = PromptRegistry(open_store(), settings, clock=lambda: now[0], routes=open_routes())
    b = PromptRegistry(open_store(), settings, clock=lambda: now[0], routes=open_routes())
    a.create("greet", content("Hi {{ who }}", variables=[{"name": "who"}]), author="ann")
    a.save("greet", content("Hello {{ who }}!", variables=[{"name": "who"}]), author="bob", base_version=1)
    a.move_label("greet", "production", 1, actor="ann")
    now[0] += 0.6
    assert b.render("greet", {"who": "x"}).messages[0].content == "Hi x"
    a.move_label("greet", "production", 2, actor="ann")
    assert b.render("greet", {"who": "x"}).version == 1  # within the interval: served from memory
    now[0] += 0.6
    moved = b.render("greet", {"who": "x"})
    assert (moved.version, moved.messages[0].content) == (2, "Hello x!")
    assert [h.to_version for h in b.label_history("greet", "production")] == [2, 1]
    b.remove_label("greet", "production", actor="admin", override_reason="retire")
    now[0] += 0.6
    with pytest.raises(NotFound, match="has no label 'production'"):
        a.render("greet", {"who": "x"})


def test_settings_pick_the_store(tmp_path, postgres_url):
    from app.settings import Settings
    from prompts.factory import build_prompt_store, build_registry
    from prompts.registry import LIBRARY_DIR
    from prompts.settings import PromptSettings
    from prompts.store_pg import PostgresPromptStore

    default = build_prompt_store(PromptSettings(), tmp_path)
    assert isinstance(default, SqlitePromptStore) and (tmp_path / "prompts.db").exists()
    default.close()
    settings = Settings(home=tmp_path / "home", auth={"enabled": False}, prompts={"url": postgres_url})
    registry = build_registry(settings)
    assert isinstance(registry.store, PostgresPromptStore)
    seeded = {t.name for t in registry.list_templates()}
    assert seeded and seeded == {p.name for p in LIBRARY_DIR.iterdir() if p.is_dir()}
    registry.close()
    again = build_registry(settings)  # a second worker on the same database: seeds nothing twice
    assert {t.name for t in again.list_templates()} == seeded
    shipped = {name: len(list((LIBRARY_DIR / name).glob("v*.yaml"))) for name in seeded}
    assert {name: len(again.versions(name)) for name in seeded} == shipped  # imported once, not twice
    again.close()
    assert not (tmp_path / "home" / "prompts.db").exists()


def test_postgres_settings_and_connection_errors_are_clear(tmp_path):
    from pydantic import ValidationError

    from prompts.settings import PromptSettings
    from prompts.store_pg import PostgresPromptStore, PromptStoreUnavailable

    assert PromptSettings(url=" ").url is None
    assert "secret" not in PromptSettings(url="postgresql://keel:secret@db/keel").model_dump_json()
    with pytest.raises(ValidationError, match="must be a postgresql:// URL"):
        PromptSettings(url="sqlite:///prompts.db")
    with pytest.raises(PromptStoreUnavailable, match="is unavailable") as e:
        PostgresPromptStore(f"postgresql://keel:secret@/keel?host={tmp_path}/no-socket", timeout_s=2)
    assert e.value.status == 503 and e.value.code == "store_unavailable" and "secret" not in e.value.message
