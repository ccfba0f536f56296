"""The lineage store's contract on both backends: SQLite (``<home>/lineage.db``) and Postgres (``monitor.url``),
where every API process reads every answer's lineage and the drift monitor sees the whole fleet's traffic."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from app.settings import Settings
from lifecycle.lineage import Features, LineageStore, PostgresLineageStore, open_lineage_store
from tests.postgres import store_handles

Open = Callable[[], LineageStore]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path: Path) -> Iterator[Open]:
    """Opens independent handles on one store (like two API processes)."""
    yield from store_handles(request, lambda: LineageStore(tmp_path / "lineage.db"), PostgresLineageStore)


def features(i: int, at: float, **kw) -> Features:
    vector = np.full(4, i / 10, dtype=np.float16)
    return Features(**{"id": f"chatcmpl-{i}", "at": at, "owner": "k", "model": "m", "release": None,
                       "variant": None, "question_chars": 10 + i, "input_chars": 20 + i, "answer_chars": 30,
                       "prompt_tokens": 5, "completion_tokens": 7, "top_score": 0.0312 if i % 2 else None,
                       "grounded": bool(i % 2), "refused": i == 3, "validators": "pii" if i == 2 else "",
                       "outcome": "ok", "embedding": vector.tobytes() if i != 4 else None, **kw})


def record(i: int, at: float, owner: str = "k") -> dict:
    return {"id": f"chatcmpl-{i}", "request_id": f"req-{i}", "created": at, "owner": owner, "model": "m",
            "route": {"alias": "m"}, "usage": {"completion_tokens": 7}}


def test_records_and_features_round_trip_across_handles(open_store: Open) -> None:
    a, b = open_store(), open_store()
    t0 = 1_765_000_000.123456  # a unix time whose microseconds a 4-byte float would lose
    a.write([record(i, t0 + i) for i in range(5)], [features(i, t0 + i, release="r" if i < 2 else None,
                                                              variant="v" if i < 2 else None) for i in range(5)])
    assert b.get("chatcmpl-2") == record(2, t0 + 2) and b.get("chatcmpl-9") is None
    assert [r["id"] for r in b.recent(limit=2)] == ["chatcmpl-4", "chatcmpl-3"]
    got = b.features(since=t0 + 1, until=t0 + 4)
    assert [f.id for f in got] == ["chatcmpl-1", "chatcmpl-2", "chatcmpl-3"]  # oldest first, until exclusive
    assert got[0].at == t0 + 1 and got[0].grounded is True and got[2].refused is True and got[1].validators == "pii"
    assert got[0].top_score == pytest.approx(0.0312) and got[1].top_score is None
    assert np.allclose(got[1].vector(), 0.2, atol=1e-3) and b.features()[4].embedding is None
    assert [f.id for f in b.features(release="r", variant="v")] == ["chatcmpl-0", "chatcmpl-1"]
    assert [f.id for f in b.features(limit=2)] == ["chatcmpl-3", "chatcmpl-4"]  # the newest rows
    # Writing an id again replaces its record and its features.
    a.write([{**record(2, t0 + 2), "outcome": "cancelled"}], [features(2, t0 + 2, outcome="cancelled")])
    assert b.get("chatcmpl-2")["outcome"] == "cancelled" and b.features(since=t0 + 2, until=t0 + 3)[0].outcome == (
        "cancelled")
    assert [r["id"] for r in b.recent(owner="nobody")] == []


def test_one_process_per_round_gets_a_periodic_task(open_store: Open) -> None:
    a, b = open_store(), open_store()
    assert a.claim("drift-check", 60, now=1000.0)
    assert not b.claim("drift-check", 60, now=1001.0)  # the other process, the same round
    assert b.claim("other-task", 60, now=1001.0)
    assert not a.claim("drift-check", 60, now=1050.0)
    assert b.claim("drift-check", 60, now=1055.0)  # next round (a tenth early is still the next round)
    # By the database's clock: a round claimed now, then not again within the round.
    assert a.claim("clocked", 3600) and not b.claim("clocked", 3600)


def test_the_settings_choose_the_store(tmp_path: Path, postgres_url: str) -> None:
    shared = Settings(home=tmp_path, database_url=postgres_url)
    assert shared.monitor.url.get_secret_value() == postgres_url
    store = open_lineage_store(shared)
    assert isinstance(store, PostgresLineageStore) and not (tmp_path / "lineage.db").exists()
    store.close()
    local = open_lineage_store(Settings(home=tmp_path))
    assert type(local) is LineageStore and (tmp_path / "lineage.db").exists()
    local.close()
    with pytest.raises(ValueError, match=r"monitor\.url must be a postgresql:// URL"):
        Settings(monitor={"url": "sqlite:///x"})
