"""One contract for both release stores (SQLite and Postgres): what several API processes rely on."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from app.core.errors import Conflict, NotFound
from lifecycle.releases.service import ReleaseService
from lifecycle.releases.spec import ReleaseSpec
from lifecycle.releases.store import Decision, Observation, PostgresReleaseStore, ShadowPair, SqliteReleaseStore

Opener = Callable[[], SqliteReleaseStore | PostgresReleaseStore]
SPEC = ReleaseSpec.model_validate({"name": "support", "strategy": "canary",
                                   "variants": [{"name": "stable"}, {"name": "canary", "model": "m2"}]})


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path) -> Iterator[Opener]:
    opened: list = []
    if request.param == "sqlite":
        def make():
            return SqliteReleaseStore(tmp_path / "releases.db")
    else:
        url = request.getfixturevalue("postgres_url")

        def make():
            return PostgresReleaseStore(url)

    def tracked():
        store = make()
        opened.append(store)
        return store

    yield tracked
    for store in opened:
        store.close()


def obs(release_id: int, variant: str, i: int, *, error: bool = False, blocked: bool = False,
        owner: str = "k1", redacted: bool = False) -> Observation:
    return Observation(release_id, variant, time.time(), f"chatcmpl-{variant}-{i}", owner, f"u{i}", error, blocked,
                       100.0 + i, 20.0, 5, 7, redacted)


def test_a_release_made_by_one_process_is_read_by_another_and_survives_a_restart(open_store) -> None:
    a = open_store()
    r = a.create(SPEC, actor="alice", reason="try the new model")
    b = open_store()
    assert b.get("support") == r
    assert r.weights == {"stable": 95, "canary": 5} and r.status == "running" and r.revision == 1
    a.close()
    c = open_store()
    assert c.current()["support"].spec == SPEC
    with pytest.raises(NotFound):
        c.get("nope")


def test_one_running_release_per_endpoint(open_store) -> None:
    store = open_store()
    first = store.create(SPEC, actor="a")
    with pytest.raises(Conflict, match="finish it first"):
        store.create(SPEC, actor="b")
    done = store.transition(first, status="rolled_back", weights={"stable": 100, "canary": 0},
                            decision=Decision("rollback", "bad", time.time(), "a"))
    assert done is not None
    second = store.create(SPEC, actor="c")
    assert second.id != first.id and store.get("support").id == second.id
    assert [r.id for r in store.history("support")] == [second.id, first.id]


def test_racing_creates_never_both_win(open_store) -> None:
    stores = [open_store() for _ in range(4)]
    won, lost = [], []

    def go(s) -> None:
        try:
            won.append(s.create(SPEC, actor="racer"))
        except Conflict:
            lost.append(1)

    threads = [threading.Thread(target=go, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 3


def test_a_decision_lands_only_on_the_revision_it_was_made_on(open_store) -> None:
    a, b = open_store(), open_store()
    r = a.create(SPEC, actor="x")
    stale = b.get("support")
    advanced = a.transition(r, weights={"stable": 75, "canary": 25}, step=1,
                            decision=Decision("advance", "passed", time.time(), "controller", 1))
    assert advanced is not None and advanced.revision == 2 and advanced.step == 1
    assert b.transition(stale, status="rolled_back", decision=Decision("rollback", "stale", 0, "controller")) is None
    assert a.get("support").status == "running"
    actions = [e.action for e in a.decisions("support")]
    assert actions == ["release.advance", "release.create"]


def test_observations_feedback_and_totals(open_store) -> None:
    store = open_store()
    r = store.create(SPEC, actor="x")
    store.record([obs(r.id, "stable", i, redacted=i < 3) for i in range(10)] +
                 [obs(r.id, "canary", i, error=i < 2, blocked=i == 3) for i in range(4)])
    store.feedback("chatcmpl-canary-1", "k1", 0.0, "wrong")
    store.feedback("chatcmpl-canary-2", "someone-else", 0.0)  # not the key that got it: does not count
    store.feedback("chatcmpl-canary-1", "k1", 0.0, "still wrong")  # rating again replaces
    t = store.totals(r)
    assert t["stable"].requests == 10 and t["canary"].requests == 4 and t["canary"].units == 4
    assert t["canary"].metrics["errors"].total == 2 and t["canary"].metrics["guardrail_blocks"].total == 1
    assert t["canary"].metrics["negative_feedback"].n == 1 and t["canary"].metrics["negative_feedback"].total == 1
    assert t["stable"].metrics["latency_ms"].total == sum(100.0 + i for i in range(10))
    assert t["stable"].prompt_tokens == 50 and t["stable"].metrics["guardrail_redactions"].total == 3
    points = store.series(r.id, 60)
    assert sum(p["requests"] for p in points) == 14 and {p["variant"] for p in points} == {"stable", "canary"}
    assert sum(p["feedback_down"] for p in points) == 1
    lat = store.latencies(r.id)
    assert len(lat["stable"][0]) == 10 and len(lat["canary"][1]) == 4
    store.feedback("chatcmpl-canary-0", "k1", 1.0)
    # The drift monitor's view: each answer's rating by the key that got it, unrated answers left out.
    assert store.scores_for([("chatcmpl-canary-1", "k1"), ("chatcmpl-canary-0", "k1"), ("chatcmpl-canary-2", "k1"),
                             ("chatcmpl-canary-3", "k1")]) == {"chatcmpl-canary-1": 0.0, "chatcmpl-canary-0": 1.0}
    assert store.scores_for([]) == {}


def test_shadow_pairs_round_trip(open_store) -> None:
    store = open_store()
    r = store.create(SPEC.model_copy(update={"strategy": "shadow"}), actor="x")
    pair = ShadowPair(r.id, "canary", time.time(), "chatcmpl-1", "q?", "primary", "shadow", 0.8, 120.0, 300.0,
                      5, 6, False, True, None)
    store.record_pairs([pair, ShadowPair(r.id, "canary", time.time(), "chatcmpl-2", "q?", "p", "", None, 100.0,
                                         None, 3, 0, False, False, "TimeoutError")])
    got = store.pairs(r.id)
    assert got[1] == pair and got[0].shadow_error == "TimeoutError"
    totals = store.shadow_totals(r.id)
    assert totals["pairs"] == 2 and totals["shadow_errors"] == 1 and totals["shadow_blocked"] == 1
    assert totals["similarity_n"] == 1 and abs(totals["similarity_mean"] - 0.8) < 1e-9


def test_the_controller_in_two_processes_decides_once(open_store) -> None:
    spec = SPEC.model_copy(update={"canary": SPEC.canary.model_copy(update={"min_requests": 5,
                                                                           "min_duration_s": 0})})
    a, b = (ReleaseService(open_store(), check_interval_s=0) for _ in range(2))
    r = a.create(spec, actor="x")
    a.store.record([obs(r.id, "stable", i) for i in range(50)] + [obs(r.id, "canary", i, error=True)
                                                                   for i in range(15)])
    results: list = []
    threads = [threading.Thread(target=lambda s=s: results.extend(s.tick())) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [action for _, action, _ in results] == ["rollback"]
    assert b.get("support").status == "rolled_back"
    assert [e.action for e in a.store.decisions("support")].count("release.rollback") == 1
    a.close()
    b.close()
