"""Long-term memory shared by agents: LangGraph's ``BaseStore`` over Keel's Qdrant ``VectorStore``.

Each memory is one point in its own collection (``agents.memory_collection``), stored through
the ingest ``VectorStore`` protocol as a one-chunk "document" (``doc_id`` = hash of namespace and
key), so the same embedded engine (or Qdrant server) that holds the RAG corpus holds memories.

* Namespaces are tuples, e.g. ``("users", "alice")`` or ``("teams", "ml")``; search takes a prefix.
* ``put`` deduplicates: a new memory whose embedding is within ``dedup_threshold`` cosine of an
  existing memory in the same namespace updates that memory instead of adding a near copy.
* Values carry ``source_run`` (set by the memory tool); items carry ``created_at``/``updated_at``.
* Search scores are cosine similarities (the stored vector is kept in the payload for exact
  rescoring and dedup); value filters (``{"kind": "fact"}``, ``{"n": {"$gt": 2}}``) are applied
  to the candidates in Python.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from langgraph.store.base import (
    BaseStore,
    GetOp,
    Item,
    ListNamespacesOp,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
)

from agents.schemas import parse_namespace
from ingest.embedding import SparseVec
from ingest.store.base import ChunkPoint, HybridQuery, VectorStore

_MAX_SCAN = 10_000


def _ns_key(namespace: tuple[str, ...]) -> str:
    return json.dumps(list(namespace), ensure_ascii=False)


def memory_doc_id(namespace: tuple[str, ...], key: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "keel-memory:" + json.dumps([list(namespace), key])))


def _now() -> datetime:
    return datetime.now(UTC)


def _text_of(value: dict[str, Any], index: list[str] | None) -> str:
    if index:
        parts = []
        for path in index:
            cur: Any = value
            for part in path.split("."):
                cur = cur.get(part) if isinstance(cur, dict) else None
            if cur is not None:
                parts.append(cur if isinstance(cur, str) else json.dumps(cur, ensure_ascii=False))
        if parts:
            return "\n".join(parts)
    if isinstance(value.get("text"), str):
        return value["text"]
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


_OPS = {
    "$eq": lambda a, b: a == b, "$ne": lambda a, b: a != b, "$gt": lambda a, b: a is not None and a > b,
    "$gte": lambda a, b: a is not None and a >= b, "$lt": lambda a, b: a is not None and a < b,
    "$lte": lambda a, b: a is not None and a <= b,
}


def matches_filter(value: dict[str, Any], flt: dict[str, Any] | None) -> bool:
    for key, cond in (flt or {}).items():
        actual = value.get(key)
        if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
            for op, expected in cond.items():
                fn = _OPS.get(op)
                if fn is None:
                    raise ValueError(f"unsupported filter operator {op!r}")
                try:
                    if not fn(actual, expected):
                        return False
                except TypeError:
                    return False
        elif actual != cond:
            return False
    return True


class QdrantMemoryStore(BaseStore):
    supports_ttl = False

    def __init__(self, store: VectorStore, embedder: Any, *, collection: str = "agent-memory",
                 dedup_threshold: float = 0.9, sparse: Any = None) -> None:
        self.store = store
        self.embedder = embedder
        self.sparse = sparse
        self.collection = collection
        self.dedup_threshold = dedup_threshold
        self._lock = threading.RLock()
        self._ready = False

    # -- plumbing ------------------------------------------------------------------------------

    def _exists(self) -> bool:
        if self._ready:
            return True
        if self.store.has_collection(self.collection):
            self._ready = True
        return self._ready

    def _ensure(self) -> None:
        if not self._ready:
            self.store.ensure_collection(self.collection, self.embedder.dim, self.embedder.model_id)
            self._ready = True

    def _probe(self) -> np.ndarray:
        v = np.zeros(self.embedder.dim, dtype=np.float32)
        v[0] = 1.0
        return v

    def _fetch(self, filters: dict[str, Any], *, dense: np.ndarray | None = None, text: str | None = None,
               top_k: int = _MAX_SCAN) -> list[dict[str, Any]]:
        if not self._exists():
            return []
        sparse = self.sparse.encode_query(text) if (self.sparse is not None and text) else None
        q = HybridQuery(dense=dense if dense is not None else self._probe(), sparse=sparse, top_k=top_k,
                        prefetch_limit=top_k, filters=filters or None)
        return [h.payload for h in self.store.query(self.collection, q)]

    @staticmethod
    def _item(p: dict[str, Any], score: float | None = None, cls: type = Item) -> Item:
        kw = {"namespace": tuple(p["ns"]), "key": p["key"], "value": json.loads(p["value_json"]),
              "created_at": p["created_at"], "updated_at": p["updated_at"]}
        return SearchItem(score=score, **kw) if cls is SearchItem else Item(**kw)

    def _get_payload(self, namespace: tuple[str, ...], key: str) -> dict[str, Any] | None:
        hits = self._fetch({"doc_id": memory_doc_id(namespace, key)}, top_k=1)
        return hits[0] if hits else None

    # -- operations ----------------------------------------------------------------------------

    def _get(self, op: GetOp) -> Item | None:
        p = self._get_payload(op.namespace, op.key)
        return self._item(p) if p else None

    def _write(self, namespace: tuple[str, ...], key: str, value: dict[str, Any], text: str, vec: np.ndarray,
               created_at: str | None) -> None:
        self._ensure()
        now = _now().isoformat()
        doc_id = memory_doc_id(namespace, key)
        value_json = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
        version = hashlib.sha256(f"{value_json}|{now}".encode()).hexdigest()[:16]
        sparse = self.sparse.encode_documents([text])[0] if self.sparse is not None else None
        if sparse is None:
            sparse = SparseVec([], [])
        payload = {
            "doc_id": doc_id, "doc_version": version, "kind": "memory", "source": _ns_key(namespace),
            "title": key, "text": text, "ns": list(namespace), "key": key,
            "ns_prefixes": [_ns_key(namespace[:i]) for i in range(1, len(namespace) + 1)],
            "value_json": value_json, "created_at": created_at or now, "updated_at": now,
            "source_run": value.get("source_run") if isinstance(value.get("source_run"), str) else None,
            "vec": [round(float(x), 6) for x in vec],
        }
        point = ChunkPoint(str(uuid.uuid5(uuid.NAMESPACE_URL, f"{doc_id}|{version}")), vec, sparse, payload)
        self.store.replace_document(self.collection, doc_id, version, [point])

    def put_memory(self, namespace: tuple[str, ...], key: str, value: dict[str, Any],
                   index: list[str] | bool | None = None) -> str:
        """Like ``put``, and returns the key actually written (an existing near-duplicate's key)."""
        namespace = tuple(namespace)
        text = _text_of(value, index if isinstance(index, list) else None)
        vec = np.asarray(self.embedder.embed_documents([text])[0], dtype=np.float32)
        with self._lock:
            existing = self._get_payload(namespace, key)
            if existing is None and index is not False:
                dup = self._nearest(namespace, vec, text)
                if dup is not None:
                    existing, key = dup, dup["key"]
                    merged = json.loads(dup["value_json"])
                    runs = list(merged.get("source_runs") or ([merged["source_run"]] if merged.get("source_run")
                                                              else []))
                    if value.get("source_run") and value["source_run"] not in runs:
                        runs.append(value["source_run"])
                    merged.update(value)
                    merged["source_runs"] = runs
                    value = merged
            self._write(namespace, key, value, text, vec, existing["created_at"] if existing else None)
        return key

    def _nearest(self, namespace: tuple[str, ...], vec: np.ndarray, text: str) -> dict[str, Any] | None:
        cands = self._fetch({"source": _ns_key(namespace)}, dense=vec, text=text, top_k=5)
        best, best_sim = None, -1.0
        for p in cands:
            sim = float(np.dot(np.asarray(p.get("vec") or [], dtype=np.float32), vec)) if p.get("vec") else -1.0
            if sim > best_sim:
                best, best_sim = p, sim
        return best if best is not None and best_sim >= self.dedup_threshold else None

    def _put(self, op: PutOp) -> None:
        if op.value is None:
            self.delete_memory(op.namespace, op.key)
            return
        self.put_memory(op.namespace, op.key, dict(op.value), op.index)

    def delete_memory(self, namespace: tuple[str, ...], key: str) -> bool:
        if not self._exists():
            return False
        doc_id = memory_doc_id(tuple(namespace), key)
        with self._lock:
            present = bool(self._fetch({"doc_id": doc_id}, top_k=1))
            if present:
                self.store.delete_document(self.collection, doc_id)
        return present

    def _search(self, op: SearchOp) -> list[SearchItem]:
        filters = {"ns_prefixes": _ns_key(op.namespace_prefix)} if op.namespace_prefix else {}
        want = op.offset + op.limit
        if op.query:
            qvec = np.asarray(self.embedder.embed_query(op.query), dtype=np.float32)
            top_k = _MAX_SCAN if op.filter else min(_MAX_SCAN, max(want * 4, 20))
            cands = self._fetch(filters, dense=qvec, text=op.query, top_k=top_k)
            scored = []
            for p in cands:
                value = json.loads(p["value_json"])
                if not matches_filter(value, op.filter):
                    continue
                sim = float(np.dot(np.asarray(p["vec"], dtype=np.float32), qvec)) if p.get("vec") else 0.0
                scored.append((sim, p))
            scored.sort(key=lambda t: -t[0])
            return [self._item(p, round(s, 4), SearchItem) for s, p in scored[op.offset:want]]
        cands = [p for p in self._fetch(filters) if matches_filter(json.loads(p["value_json"]), op.filter)]
        cands.sort(key=lambda p: p["updated_at"], reverse=True)
        return [self._item(p, None, SearchItem) for p in cands[op.offset:want]]

    def _list_namespaces(self, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        if not self._exists():
            return []
        spaces = {tuple(json.loads(d.source)) for d in self.store.documents(self.collection).values()
                  if d.live and d.source}
        out = set()
        for ns in spaces:
            if op.match_conditions and not all(_ns_match(ns, c.match_type, tuple(c.path))
                                               for c in op.match_conditions):
                continue
            out.add(ns[: op.max_depth] if op.max_depth is not None else ns)
        return sorted(out)[op.offset: op.offset + op.limit]

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        results: list[Result] = []
        for op in ops:
            if isinstance(op, GetOp):
                results.append(self._get(op))
            elif isinstance(op, SearchOp):
                results.append(self._search(op))
            elif isinstance(op, PutOp):
                results.append(self._put(op))
            elif isinstance(op, ListNamespacesOp):
                results.append(self._list_namespaces(op))
            else:
                raise ValueError(f"unknown store operation {op!r}")
        return results

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        return await asyncio.to_thread(self.batch, list(ops))


def _ns_match(ns: tuple[str, ...], kind: str, path: tuple[str, ...]) -> bool:
    if len(path) > len(ns):
        return False
    part = ns[: len(path)] if kind == "prefix" else ns[len(ns) - len(path):]
    return all(p == "*" or p == n for p, n in zip(path, part, strict=True))


__all__ = ["QdrantMemoryStore", "matches_filter", "memory_doc_id", "parse_namespace"]
