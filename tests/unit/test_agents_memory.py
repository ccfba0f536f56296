"""Contract of the Qdrant-backed LangGraph store (agent long-term memory) on both store engines."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from langgraph.graph import END, START, StateGraph
from langgraph.store.base import BaseStore
from typing_extensions import TypedDict

from agents.memory import QdrantMemoryStore
from agents.tools import ToolContext, ToolRegistry, builtin_tools, execute
from ingest.embedding import Bm25Encoder, HashingEmbedder
from ingest.store.edge import EdgeStore
from ingest.store.qdrant import QdrantClientStore


@pytest.fixture(params=["edge", "qdrant-memory"])
def mem(request, tmp_path: Path):
    store = EdgeStore(tmp_path / "edge") if request.param == "edge" else QdrantClientStore(path=":memory:")
    store.warm_up()
    m = QdrantMemoryStore(store, HashingEmbedder(64), sparse=Bm25Encoder(), collection="mem", dedup_threshold=0.95)
    yield m
    store.close()


ALICE, BOB, TEAM = ("users", "alice"), ("users", "bob"), ("teams", "ml")


def test_is_a_langgraph_store_and_reads_nothing_when_empty(mem: QdrantMemoryStore) -> None:
    assert isinstance(mem, BaseStore)
    assert mem.get(ALICE, "k") is None
    assert mem.search(ALICE, query="anything") == []
    assert mem.list_namespaces() == []
    assert mem.delete_memory(ALICE, "k") is False


def test_put_get_update_delete(mem: QdrantMemoryStore) -> None:
    mem.put(ALICE, "pref", {"text": "Alice prefers short answers", "source_run": "run-1"})
    item = mem.get(ALICE, "pref")
    assert item is not None and item.value["text"] == "Alice prefers short answers"
    assert item.value["source_run"] == "run-1" and item.namespace == ALICE and item.key == "pref"
    assert item.created_at == item.updated_at
    time.sleep(0.01)
    mem.put(ALICE, "pref", {"text": "Alice prefers answers with bullet points", "source_run": "run-2"})
    updated = mem.get(ALICE, "pref")
    assert updated.value["source_run"] == "run-2" and updated.created_at == item.created_at
    assert updated.updated_at > item.updated_at
    assert len(mem.search(ALICE)) == 1  # replaced, not duplicated
    assert mem.get(BOB, "pref") is None  # namespaces are separate
    mem.delete(ALICE, "pref")
    assert mem.get(ALICE, "pref") is None and mem.search(ALICE) == []


def test_search_by_prefix_query_and_filter(mem: QdrantMemoryStore) -> None:
    mem.put(ALICE, "a1", {"text": "Alice works on the billing service", "kind": "fact", "n": 1})
    mem.put(ALICE, "a2", {"text": "Alice likes green tea in the morning", "kind": "preference", "n": 2})
    mem.put(BOB, "b1", {"text": "Bob maintains the billing database", "kind": "fact", "n": 3})
    mem.put(TEAM, "t1", {"text": "The ML team deploys on Fridays", "kind": "fact", "n": 4})
    assert {i.key for i in mem.search(("users",))} == {"a1", "a2", "b1"}
    assert {i.key for i in mem.search(ALICE)} == {"a1", "a2"}
    assert {i.key for i in mem.search(())} == {"a1", "a2", "b1", "t1"}
    hits = mem.search(("users",), query="billing service")
    assert hits[0].key == "a1" and hits[0].score >= hits[-1].score
    assert all(-1.0 <= h.score <= 1.0001 for h in hits)
    assert {i.key for i in mem.search(("users",), filter={"kind": "fact"})} == {"a1", "b1"}
    assert {i.key for i in mem.search((), filter={"n": {"$gte": 2, "$lt": 4}})} == {"a2", "b1"}
    top = mem.search((), query="billing", filter={"kind": "fact"}, limit=1)
    assert len(top) == 1 and top[0].key in {"a1", "b1"}
    page = mem.search((), limit=2, offset=1)
    assert len(page) == 2


def test_list_namespaces(mem: QdrantMemoryStore) -> None:
    for ns in (ALICE, BOB, TEAM, ("users", "alice", "drafts")):
        mem.put(ns, "k", {"text": f"something about {'/'.join(ns)}"})
    assert mem.list_namespaces() == sorted([ALICE, BOB, TEAM, ("users", "alice", "drafts")])
    assert mem.list_namespaces(prefix=("users",)) == [ALICE, ("users", "alice", "drafts"), BOB]
    assert mem.list_namespaces(suffix=("drafts",)) == [("users", "alice", "drafts")]
    assert mem.list_namespaces(max_depth=1) == [("teams",), ("users",)]


def test_near_duplicates_update_the_existing_memory(mem: QdrantMemoryStore) -> None:
    k1 = mem.put_memory(ALICE, "m1", {"text": "Alice prefers short answers", "source_run": "run-1"})
    k2 = mem.put_memory(ALICE, "m2", {"text": "alice prefers short answers.", "source_run": "run-2"})
    assert k1 == "m1" and k2 == "m1"
    items = mem.search(ALICE)
    assert len(items) == 1 and items[0].value["source_runs"] == ["run-1", "run-2"]
    # a different namespace is never merged; a different fact is kept
    assert mem.put_memory(BOB, "m2", {"text": "Alice prefers short answers"}) == "m2"
    assert mem.put_memory(ALICE, "m3", {"text": "Alice runs the nightly evaluation jobs"}) == "m3"
    assert len(mem.search(ALICE)) == 2


async def test_async_api_and_memory_tools(mem: QdrantMemoryStore) -> None:
    await mem.aput(ALICE, "x", {"text": "Deploys happen on Tuesdays"})
    assert (await mem.aget(ALICE, "x")).value["text"] == "Deploys happen on Tuesdays"
    reg = ToolRegistry(builtin_tools())
    ctx = ToolContext(run_id="run-9", thread_id="t", namespace=ALICE, search_namespaces=(ALICE, TEAM), memory=mem)
    wrote = await execute(reg, "memory_write", {"text": "The staging cluster is called kestrel"}, ctx)
    assert wrote.ok
    stored = mem.get(ALICE, wrote.data["key"])
    assert stored.value["source_run"] == "run-9" and stored.value["thread_id"] == "t"
    found = await execute(reg, "memory_search", {"query": "staging cluster kestrel"}, ctx)
    assert found.ok and "kestrel" in found.data[0]["text"]
    await mem.adelete(ALICE, "x")
    assert await mem.aget(ALICE, "x") is None


async def test_nodes_reach_the_store_through_langgraph(mem: QdrantMemoryStore) -> None:
    from langgraph.config import get_store

    class S(TypedDict):
        out: str

    async def node(state: S) -> S:
        store = get_store()
        await store.aput(ALICE, "from-graph", {"text": "written inside a graph"})
        item = await store.aget(ALICE, "from-graph")
        return {"out": item.value["text"]}

    g = StateGraph(S)
    g.add_node("n", node)
    g.add_edge(START, "n")
    g.add_edge("n", END)
    result = await g.compile(store=mem).ainvoke({"out": ""})
    assert result["out"] == "written inside a graph"
