"""Agent storage on both backends: the runs table's contract suite, and the service on a real Postgres
(checkpointer and runs table shared by several service instances, as by several API processes).

Postgres comes from ``tests/postgres.py`` (pgserver, or ``KEEL_TEST_POSTGRES_URL``); where none can be
had these tests fail rather than skip. The model is the scripted fake: no vLLM needed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.events import ErrorEvent, InterruptEvent, NodeFinished
from agents.runs import TERMINAL, PostgresRunStore, RunRecord, RunStore, RunStoreBase, runs_db_path
from agents.service import STALL_MARGIN_S, AgentService, AgentStoreUnavailable
from agents.settings import AgentSettings
from agents.testing import KeywordRetriever, ScriptedLLM, SideEffectTool
from agents.tools import ToolRegistry, builtin_tools
from agents.workflows.common import Deps
from tests.unit.test_agents import ANSWER, DOCS, StallingLLM, by_kind, collect, final

RunStoreFactory = Callable[[], RunStoreBase]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path) -> dict[str, Any]:
    """Where a service keeps its state: ``db_path`` always (SQLite), ``postgres_url`` for Postgres."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    return {"db_path": tmp_path / "agents.db", "postgres_url": url}


@pytest.fixture
def open_runs(backend) -> Iterator[RunStoreFactory]:
    """Opens independent handles on one runs table (like two API processes)."""
    opened: list[RunStoreBase] = []

    def make() -> RunStoreBase:
        store = (PostgresRunStore(backend["postgres_url"]) if backend["postgres_url"]
                 else RunStore(runs_db_path(backend["db_path"])))
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def record(run_id: str, thread_id: str = "t-1", *, owner: str | None = "alice", status: str = "running",
           workflow: str = "rag-qa") -> RunRecord:
    return RunRecord(run_id=run_id, thread_id=thread_id, workflow=workflow, owner=owner,
                     namespace=["users", owner or "anonymous"], status=status, question=f"question of {run_id}")


# -- the runs table: one contract, both stores ---------------------------------------------------------


def test_runs_round_trip_and_filters(open_runs) -> None:
    a, b = open_runs(), open_runs()
    a.create(record("run-1"))
    a.create(record("run-2", "t-2", owner="bob", workflow="research"))
    a.update("run-1", status="completed", answer="Qdrant [1].", citations=[{"index": 1, "source": "/q.md"}],
             steps=[{"node": "retrieve", "duration_ms": 1.5}])
    got = b.get("run-1")  # seen through the other handle
    assert got is not None and got.status == "completed" and got.answer == "Qdrant [1]."
    assert got.citations == [{"index": 1, "source": "/q.md"}] and got.steps[0]["node"] == "retrieve"
    assert got.namespace == ["users", "alice"] and got.finished_at is not None and got.duration_ms is not None
    assert "completed" in TERMINAL and b.get("run-missing") is None
    assert [r.run_id for r in b.list()] == ["run-2", "run-1"]  # newest first
    assert [r.run_id for r in b.list(owner="bob")] == ["run-2"]
    assert [r.run_id for r in b.list(workflow="rag-qa", status="completed")] == ["run-1"]
    assert [r.run_id for r in b.list(thread_id="t-2")] == ["run-2"] and len(b.list(limit=1)) == 1
    assert b.active_on_thread("t-2").run_id == "run-2" and b.active_on_thread("t-1") is None
    a.update("run-2", status="interrupted", pending={"tool": "send_report", "args": {"to": "x"}})
    assert b.get("run-2").pending == {"tool": "send_report", "args": {"to": "x"}}
    assert b.active_on_thread("t-2").status == "interrupted"
    a.update("run-2", status="failed", error={"code": "node_timeout", "message": "slow"})
    failed = b.get("run-2")
    assert failed.error == {"code": "node_timeout", "message": "slow"} and failed.finished_at is None


def test_one_claim_wins(open_runs) -> None:
    a, b = open_runs(), open_runs()
    a.create(record("run-1", status="interrupted"))
    for _ in range(5):
        a.update("run-1", status="interrupted", pending={"tool": "t"})
        barrier = threading.Barrier(2)
        won: list[bool] = []

        def claim(store: RunStoreBase, barrier: threading.Barrier = barrier, won: list[bool] = won) -> None:
            barrier.wait()
            won.append(store.claim("run-1", ("interrupted",)))

        threads = [threading.Thread(target=claim, args=(s,)) for s in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(won) == [False, True]
        rec = a.get("run-1")
        assert rec.status == "running" and rec.pending is None
    assert not a.claim("run-1", ("stalled", "failed"))  # a running run is not claimable


def test_mark_stalled_all_or_only_idle_runs(open_runs) -> None:
    store = open_runs()
    store.create(record("run-old", "t-1"))
    store.create(record("run-new", "t-2"))
    store.create(record("run-done", "t-3", status="completed"))
    store._execute("UPDATE agent_runs SET updated_at=? WHERE run_id=?", (time.time() - 3600, "run-old"))
    assert store.mark_stalled(idle_for_s=600) == 1  # a shared store: only the long-idle run is an orphan
    assert [store.get(r).status for r in ("run-old", "run-new", "run-done")] == ["stalled", "running", "completed"]
    assert store.mark_stalled() == 1  # a store one process owns: every running run is an orphan
    assert store.get("run-new").status == "stalled" and store.get("run-done").status == "completed"


# -- the service: several instances on one store ----------------------------------------------------------


_OPEN: list[AgentService] = []


@pytest.fixture(autouse=True)
async def _close_services():
    yield
    while _OPEN:  # an open pool or aiosqlite connection keeps threads (and the test process) alive
        await _OPEN.pop().aclose()


def service(backend: dict[str, Any], llm: ScriptedLLM, *, tools: ToolRegistry | None = None,
            **settings: Any) -> AgentService:
    deps = Deps(llm=llm, tools=tools or ToolRegistry(builtin_tools(), risky={"memory_write"}),
                settings=AgentSettings(**settings), retriever=KeywordRetriever(DOCS))
    svc = AgentService(deps, db_path=backend["db_path"], postgres_url=backend["postgres_url"])
    _OPEN.append(svc)
    return svc


def rag_llm() -> ScriptedLLM:
    return ScriptedLLM(responder=by_kind(text=[ANSWER], supported=[{"supported": True}]))


async def test_a_new_instance_continues_the_thread_with_its_history(backend) -> None:
    first = service(backend, rag_llm())
    f1 = final(await collect(first.run("rag-qa", "Where does Keel store vectors?", thread_id="t-1", owner="alice")))
    await first.aclose()
    llm = rag_llm()
    second = service(backend, llm)  # a restarted or another API process on the same database
    f2 = final(await collect(second.run("rag-qa", "And which engine is that?", thread_id="t-1", owner="alice")))
    hist = await second.thread_history("t-1")
    assert [h["run_id"] for h in hist["history"]] == [f1.run_id, f2.run_id]
    assert hist["runs"] == [f1.run_id, f2.run_id]
    answer_prompt = [m for m, s in llm.calls if s is None][-1]
    assert any(m.content == "Where does Keel store vectors?" for m in answer_prompt)  # the first turn, from storage
    run = await second.get_run(f1.run_id)
    assert run["status"] == "completed" and run["steps"][0]["node"] == "retrieve"


def hitl_llm(*, after_restart: bool) -> ScriptedLLM:
    decisions = [{"next": "analyst", "reason": "send"}, {"next": "researcher", "reason": "r"},
                 {"next": "writer", "reason": "w"}, {"next": "critic", "reason": "c"},
                 {"next": "FINISH", "reason": "f"}]
    return ScriptedLLM(responder=by_kind(
        next=decisions[1:] if after_restart else decisions,
        tool=[{"tool": "send_report", "args": {"to": "team@example.com", "body": "hi"}}],
        accepted=[{"accepted": True, "feedback": "ok"}], text=[ANSWER],
        worth_keeping=[{"worth_keeping": False, "fact": ""}]))


async def test_an_interrupt_is_resumed_by_another_instance(backend) -> None:
    tool = SideEffectTool()
    tools = ToolRegistry(builtin_tools())
    tools.register(tool)
    first = service(backend, hitl_llm(after_restart=False), tools=tools)
    events = await collect(first.run("research", "Send the vector store report", owner="alice"))
    intr = events[-1]
    assert isinstance(intr, InterruptEvent) and tool.executed == []
    second = service(backend, hitl_llm(after_restart=True), tools=tools)  # while the first is still up
    pending = await second.pending_approvals(owner="alice")
    assert [p["run_id"] for p in pending] == [intr.run_id] and pending[0]["tool"] == "send_report"
    assert (await first.get_run(intr.run_id))["status"] == "interrupted"  # starting `second` stalled nothing
    resumed = await collect(second.resume(intr.run_id, "approve", owner="alice"))
    assert final(resumed).status == "completed" and final(resumed).answer == ANSWER
    assert tool.executed == [{"to": "team@example.com", "body": "hi"}]
    assert "analyst" not in [e.node for e in resumed if isinstance(e, NodeFinished)][1:]
    assert (await first.get_run(intr.run_id))["status"] == "completed"  # one shared runs table
    assert await first.pending_approvals() == []


async def test_a_timed_out_run_is_continued_by_another_instance(backend) -> None:
    llm = StallingLLM(responder=by_kind(text=[ANSWER], supported=[{"supported": True}]))
    first = service(backend, llm, node_timeout_s=120, run_timeout_s=0.5)
    events = await collect(first.run("rag-qa", "Where does Keel store vectors?"))
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "run_timeout" and llm.cancelled == 1
    second = service(backend, rag_llm())
    assert (await second.get_run(events[-1].run_id))["status"] == "timed_out"
    resumed = await collect(second.resume(events[-1].run_id, "continue"))
    assert final(resumed).answer == ANSWER
    assert next(e.node for e in resumed if isinstance(e, NodeFinished)) == "answer"  # retrieval kept


async def test_a_shared_store_stalls_only_runs_no_live_process_can_own(postgres_url, tmp_path: Path) -> None:
    """On Postgres a starting process must not stall the runs other live processes are driving; a run idle
    for longer than the time limit allows can only be an orphan, and becomes resumable. (A SQLite runs file
    belongs to one process, which stalls every running run at its start-up: test_agents.py.)"""
    backend = {"db_path": tmp_path / "agents.db", "postgres_url": postgres_url}
    orphaned_at = time.time() - 300 - STALL_MARGIN_S - 5
    first = service(backend, rag_llm())
    await first.start()
    first.runs.create(record("run-live", "t-live"))
    first.runs.create(record("run-orphan", "t-orphan"))
    first.runs._execute("UPDATE agent_runs SET updated_at=? WHERE run_id=?", (orphaned_at, "run-orphan"))
    second = service(backend, rag_llm(), run_timeout_s=300)
    await second.start()
    assert (await second.get_run("run-live"))["status"] == "running"
    assert (await second.get_run("run-orphan"))["status"] == "stalled"
    # a process that dies later leaves runs that age into orphans long after anyone's start-up: swept again
    first.runs._execute("UPDATE agent_runs SET updated_at=? WHERE run_id=?", (orphaned_at, "run-live"))
    assert (await second.get_run("run-live"))["status"] == "running"  # swept at most every 30 s
    second._swept_at -= 31
    assert [r["status"] for r in await second.list_runs(thread_id="t-live")] == ["stalled"]


async def test_unreachable_postgres_is_a_clear_error(tmp_path: Path) -> None:
    svc = service({"db_path": tmp_path / "agents.db",
                   "postgres_url": f"postgresql://keel:secret@/keel?host={tmp_path}/no-socket&connect_timeout=1"},
                  rag_llm())
    with pytest.raises(AgentStoreUnavailable, match="is unavailable") as e:
        await svc.start()
    assert e.value.status == 503 and e.value.code == "store_unavailable" and "secret" not in e.value.message
    assert svc.runs is None and svc.checkpointer is None  # nothing half-open left behind


def test_postgres_url_setting_is_validated() -> None:
    assert AgentSettings(postgres_url="").postgres_url is None
    with pytest.raises(ValueError, match="must be a postgresql:// URL"):
        AgentSettings(postgres_url="mysql://root:hunter2@db/keel")
    settings = AgentSettings(postgres_url="postgresql://keel:hunter2@db/keel")
    assert "hunter2" not in settings.model_dump_json()  # `keel config` shows it masked
    assert settings.postgres_url.get_secret_value() == "postgresql://keel:hunter2@db/keel"


def test_open_run_store_follows_the_settings(tmp_path: Path, postgres_url: str) -> None:
    from agents.runs import open_run_store

    sqlite = open_run_store(AgentSettings(), tmp_path)
    assert isinstance(sqlite, RunStore) and (tmp_path / "agents.runs.db").exists()
    sqlite.close()
    pg = open_run_store(AgentSettings(postgres_url=postgres_url), tmp_path)
    assert isinstance(pg, PostgresRunStore) and pg.list() == []
    pg.close()


async def test_settings_wire_the_service_to_postgres(tmp_path: Path, postgres_url: str) -> None:
    from agents.service import build_agents
    from app.settings import Settings

    settings = Settings(home=tmp_path, auth={"enabled": False}, agents={"postgres_url": postgres_url})
    svc = build_agents(settings, None, llm=rag_llm(), tools=ToolRegistry(builtin_tools()))
    _OPEN.append(svc)
    await svc.start()
    assert isinstance(svc.runs, PostgresRunStore) and type(svc.checkpointer).__name__ == "AsyncPostgresSaver"
    assert not (tmp_path / "agents.db").exists() and not (tmp_path / "agents.runs.db").exists()


async def test_concurrent_first_uses_open_the_service_once(backend) -> None:
    svc = service(backend, rag_llm())
    events = await asyncio.gather(*(collect(svc.run("rag-qa", "Where does Keel store vectors?")) for _ in range(3)))
    assert [final(e).status for e in events] == ["completed"] * 3
    assert len({final(e).run_id for e in events}) == 3 and len(await svc.list_runs()) == 3


async def test_two_processes_first_starting_at_once_take_turns(postgres_url, tmp_path: Path) -> None:
    # Two API processes on an empty database: one set-up's CREATE INDEX CONCURRENTLY waited for the other's
    # snapshot, held while it waited for the first one's lock (hung until killed before the lock was polled).
    first = service({"db_path": tmp_path / "a.db", "postgres_url": postgres_url}, rag_llm())
    second = service({"db_path": tmp_path / "b.db", "postgres_url": postgres_url}, rag_llm())
    await asyncio.wait_for(asyncio.gather(first.start(), second.start()), timeout=120)
    done = final(await collect(second.run("rag-qa", "Where does Keel store vectors?", owner="alice")))
    assert done.status == "completed" and (await first.get_run(done.run_id))["status"] == "completed"
