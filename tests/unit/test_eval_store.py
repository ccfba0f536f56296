"""The eval store's contract on both backends: SQLite (``<home>/evals.db``) and Postgres (``evals.url``), where
every API process gates promotions on the same runs. Postgres from ``tests/postgres.py`` (fails, never skips)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.core.errors import NotFound
from app.settings import Settings
from evals.gate import prompt_gate
from evals.store import EvalStore, EvalStoreBase, PostgresEvalStore, open_eval_store
from tests.postgres import store_handles

Open = Callable[[], EvalStoreBase]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path: Path) -> Iterator[Open]:
    """Opens independent handles on one store (like two API processes)."""
    yield from store_handles(request, lambda: EvalStore(tmp_path / "evals.db"), PostgresEvalStore)


def identity(suite: str, *, prompt: tuple[str, int, str] | None = None) -> dict:
    ident = {"kind": "prompt" if prompt else "model", "suite": suite, "suite_hash": "s" * 64}
    if prompt:
        ident["prompt"] = {"name": prompt[0], "version": prompt[1], "hash": prompt[2]}
    return ident


def run(store: EvalStoreBase, suite: str = "golden", *, key: str = "k", prompt=None, passed: bool | None = True) -> str:
    rid = store.create_run(suite=suite, suite_hash="s" * 64, identity_key=key, identity=identity(suite, prompt=prompt),
                           cases_total=2)
    if passed is not None:
        store.finish_run(rid, passed=passed, summary={"pass_rate": 1.0 if passed else 0.0},
                         verdict={"passed": passed, "failing_metrics": [], "reasons": []})
    return rid


def test_runs_round_trip_across_handles(open_store: Open) -> None:
    a, b = open_store(), open_store()
    first = run(a, key="k1")
    second = run(a, "smoke", key="k2", prompt=("greet", 2, "h2"), passed=False)
    unfinished = run(a, key="k3", passed=None)
    got = b.get_run(second)  # through the other handle
    assert got.suite == "smoke" and got.passed is False and got.status == "completed"
    assert got.identity["prompt"] == {"name": "greet", "version": 2, "hash": "h2"} and got.prompt_hash == "h2"
    assert got.verdict == {"passed": False, "failing_metrics": [], "reasons": []} and got.finished_at
    # newest first; runs started in the same second keep their insertion order
    assert [r.id for r in b.list_runs()] == [unfinished, second, first]
    assert [r.id for r in b.list_runs(suite="golden")] == [unfinished, first] and len(b.list_runs(limit=1)) == 1
    assert b.unfinished_run("k3").id == unfinished and b.unfinished_run("k1") is None
    assert [r.id for r in b.prompt_runs("greet", 2)] == [second] and b.prompt_runs("greet", 1) == []
    b.set_status(first, "cancelled")  # a finished run keeps its status
    assert a.get_run(first).status == "completed"
    a.set_baseline(unfinished, first)
    assert b.get_run(unfinished).baseline == first
    with pytest.raises(NotFound):
        b.get_run("run-missing")


def test_a_case_result_counts_once_and_keeps_its_order(open_store: Open) -> None:
    a, b = open_store(), open_store()
    rid = run(a, passed=None)
    assert a.save_result(rid, "c2", record={"answer": "x"}, scores={"m": {"value": 1}}, error=None, cached=False)
    assert a.save_result(rid, "c1", record={"answer": "y"}, scores={}, error="timeout", cached=True)
    assert not b.save_result(rid, "c2", record={"answer": "again"}, scores={}, error=None, cached=False)
    assert b.done_cases(rid) == {"c1", "c2"}
    rows = b.results(rid)
    assert [r.case_id for r in rows] == ["c2", "c1"] and rows[0].record == {"answer": "x"}
    assert rows[1].error == "timeout" and rows[1].cached is True and rows[0].scores == {"m": {"value": 1}}


def test_the_response_cache_replaces(open_store: Open) -> None:
    a, b = open_store(), open_store()
    assert a.cache_get("q") is None
    a.cache_put("q", {"answer": 1})
    b.cache_put("q", {"answer": 2})
    assert a.cache_get("q") == {"answer": 2}


def test_a_gate_on_one_process_sees_the_runs_made_on_another(postgres_url: str, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "a", database_url=postgres_url)
    assert settings.evals.url.get_secret_value() == postgres_url  # database_url fills it
    on_a = open_eval_store(settings)
    on_b = open_eval_store(Settings(home=tmp_path / "b", database_url=postgres_url))
    assert isinstance(on_b, PostgresEvalStore) and not (tmp_path / "a" / "evals.db").exists()

    class Versions:  # the one call the gate makes: the version's content hash
        def get_version(self, name, version):
            return SimpleNamespace(hash="h2")

    class Registry:
        store = Versions()
        protected_labels = ("production",)

    run(on_a, prompt=("greet", 2, "h2"))
    gate = prompt_gate(on_b, Registry())
    verdict = gate("greet", 2)
    assert verdict.passed, verdict.reason
    on_a.close()
    on_b.close()
    assert isinstance(open_eval_store(Settings(home=tmp_path / "c")), EvalStore)


def test_a_home_whose_runs_stay_behind_in_sqlite_says_so(postgres_url: str, tmp_path: Path, caplog) -> None:
    old = open_eval_store(Settings(home=tmp_path))  # a home that gated on SQLite before
    run(old)
    old.close()
    with caplog.at_level("WARNING", logger="keel.db"):
        store = open_eval_store(Settings(home=tmp_path, database_url=postgres_url))
    store.close()
    assert "the eval store now lives in Postgres" in caplog.text and "evals.db" in caplog.text
    assert "hunter" not in caplog.text and postgres_url not in caplog.text  # never the URL


def test_the_url_setting_is_validated() -> None:
    with pytest.raises(ValueError, match=r"evals\.url must be a postgresql:// URL"):
        Settings(evals={"url": "mysql://x"})
