"""The ``VectorStore`` protocol and the engine-independent half of its Qdrant implementations.

Atomic document replacement ("a query never sees both versions or neither")
----------------------------------------------------------------------------
Every chunk carries ``doc_id`` and ``doc_version`` (a hash of the document's content,
the chunker config and the model). Each collection holds one *control point* (no
vectors) whose payload lists the *hidden* versions; every query and count adds
``must_not: doc_version in hidden``. Replacing document D from v1 to v2:

1. hide v2 (control write, under the store's write lock so queries that read the old
   hidden set finish first), then upsert v2's chunks - invisible while partial;
2. flip: one control write that unhides v2 and hides v1. A single point write is
   atomic in Qdrant, so readers see v1 before it and v2 after it, never both/neither;
3. delete v1's chunks under the store's write lock, which waits for in-flight queries
   that read the hidden set before the flip (they still need v1), then unhide v1.

A crash at any step leaves only hidden partial versions or hidden stale versions,
which the next run repairs (re-upserting the same deterministic ids) or deletes.
Within one process the read/write lock closes the race between reading the hidden
set and running the query. Across processes (several API replicas on one Qdrant
server) replicas re-read the control point per query; a query racing step 3 can
then miss D for that one request - the remaining window is the query's own duration.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from app.core.errors import InvalidRequest
from ingest.embedding import SparseVec
from ingest.errors import CollectionNotFound, DimensionMismatch, InvalidFilter

log = logging.getLogger("keel.rag")

CONTROL_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "keel:control"))
DENSE, SPARSE = "dense", "sparse"
KEYWORD_INDEXES = ("doc_id", "doc_version", "source", "kind", "doc_kind", "snapshot_id")
INTEGER_INDEXES = ("page",)
_COLLECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Scalar = str | int | float | bool


@dataclass(frozen=True, slots=True)
class Range:
    gte: float | None = None
    gt: float | None = None
    lte: float | None = None
    lt: float | None = None


FilterValue = Scalar | Sequence[Scalar] | Range
Filters = Mapping[str, FilterValue]


@dataclass(frozen=True, slots=True)
class Cond:
    """One engine-neutral condition; each engine translates these."""

    key: str
    op: Literal["eq", "any", "range"]
    value: Any


@dataclass(frozen=True, slots=True)
class ChunkPoint:
    id: str
    dense: np.ndarray
    sparse: SparseVec
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    payload: dict[str, Any]
    dense: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class HybridQuery:
    dense: np.ndarray
    sparse: SparseVec | None = None
    top_k: int = 5
    prefetch_limit: int = 50
    rrf_k: int = 60
    #: RRF weights of the (dense, sparse) legs, Qdrant's weighted RRF: each leg adds 1/(rrf_k - 1 + rank/w),
    #: rank from 1; a weight of 0 drops the leg
    weights: tuple[float, float] = (1.0, 1.0)
    filters: Filters | None = None
    score_threshold: float | None = None
    mmr: bool = False
    mmr_lambda: float = 0.7


@dataclass(slots=True)
class DocState:
    """What a collection holds for one document (from a scan of its points)."""

    doc_id: str
    versions: dict[str, int] = field(default_factory=dict)  # version -> chunk count
    live: str | None = None
    source: str = ""
    source_sha256: str = ""
    title: str = ""

    @property
    def clean(self) -> bool:
        """Exactly one version, and it is visible: nothing to repair."""
        return self.live is not None and len(self.versions) == 1


@runtime_checkable
class VectorStore(Protocol):
    """A multi-collection hybrid (dense + sparse) chunk store."""

    name: str

    def warm_up(self) -> None: ...

    def close(self) -> None: ...

    def list_collections(self) -> list[str]: ...

    def has_collection(self, collection: str) -> bool: ...

    def ensure_collection(self, collection: str, dim: int, model_id: str) -> None: ...

    def drop_collection(self, collection: str) -> None: ...

    def collection_info(self, collection: str) -> dict[str, Any]: ...

    def replace_document(self, collection: str, doc_id: str, version: str, points: Sequence[ChunkPoint]
                         ) -> None: ...

    def delete_document(self, collection: str, doc_id: str) -> None: ...

    def query(self, collection: str, query: HybridQuery) -> list[Hit]: ...

    def count(self, collection: str, filters: Filters | None = None) -> int: ...

    def documents(self, collection: str) -> dict[str, DocState]: ...

    def dense_vectors(self, collection: str, doc_id: str, version: str) -> dict[str, np.ndarray]:
        """The dense vectors of ``doc_id``'s chunks at ``version``, keyed by the ``embed_hash`` of the text
        that was embedded, so a changed document re-embeds only its changed chunks."""

    def repair(self, collection: str) -> int: ...


class RWLock:
    """Many readers or one writer; writers wait for readers already inside."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def check_collection_name(name: str) -> str:
    if not _COLLECTION_RE.match(name):
        raise InvalidRequest(
            f"invalid collection name {name!r}: use 1-64 letters, digits, '_', '-', '.'", param="collection"
        )
    return name


def parse_filters(filters: Filters | None) -> list[Cond]:
    """``{"lang": "en", "tag": ["a", "b"], "page": Range(gte=2)}`` -> conditions (all must hold)."""
    if not filters:
        return []
    out: list[Cond] = []
    for key, value in filters.items():
        if not isinstance(key, str) or not key or key == "kind":
            raise InvalidFilter(f"invalid filter field {key!r}", param="filter")
        if isinstance(value, Range):
            out.append(Cond(key, "range", value))
        elif isinstance(value, Mapping):
            unknown = set(value) - {"gte", "gt", "lte", "lt"}
            if unknown or not value:
                raise InvalidFilter(f"filter {key!r}: a range takes gte/gt/lte/lt, got {sorted(value)}",
                                    param="filter")
            try:
                out.append(Cond(key, "range", Range(**{k: float(v) for k, v in value.items()})))
            except (TypeError, ValueError):
                raise InvalidFilter(f"filter {key!r}: range bounds must be numbers", param="filter") from None
        elif isinstance(value, list | tuple):
            if not value or (not all(isinstance(v, str) for v in value) and not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            )):
                raise InvalidFilter(f"filter {key!r}: a list must be non-empty, all strings or all integers",
                                    param="filter")
            out.append(Cond(key, "any", list(value)))
        elif isinstance(value, str | int | bool):
            out.append(Cond(key, "eq", value))
        else:
            raise InvalidFilter(f"filter {key!r}: unsupported value {value!r}", param="filter")
    return out


def mmr_select(hits: list[Hit], query: np.ndarray, k: int, lam: float) -> list[Hit]:
    """Greedy maximal marginal relevance over candidates' dense vectors (cosine; vectors are normalised)."""
    cands = [h for h in hits if h.dense is not None]
    if not cands:
        return hits[:k]
    mat = np.stack([np.asarray(h.dense, dtype=np.float32) for h in cands])
    rel = mat @ np.asarray(query, dtype=np.float32)
    chosen: list[int] = []
    best_sim = np.full(len(cands), -np.inf, dtype=np.float32)
    while len(chosen) < min(k, len(cands)):
        div = np.where(np.isfinite(best_sim), best_sim, 0.0)
        score = lam * rel - (1.0 - lam) * div
        score[chosen] = -np.inf
        i = int(np.argmax(score))
        chosen.append(i)
        best_sim = np.maximum(best_sim, mat @ mat[i])
    return [cands[i] for i in chosen]


class QdrantLikeStore(ABC):
    """Hidden-version bookkeeping, locking, MMR and thresholds over an engine's primitives."""

    name = "abstract"
    #: True when other processes may write the same collections (a server): re-read control per query.
    shared = False

    def __init__(self, *, keyword_indexes: Sequence[str] = ()) -> None:
        self._rw = RWLock()
        self._writer = threading.Lock()
        self._hidden: dict[str, set[str]] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        #: Payload fields with a keyword index: Keel's own plus the metadata fields users filter on.
        #: A filter on a field without an index makes the engine read every point's payload (measured
        #: at 100k chunks: ~150-200 ms instead of a few ms), so the retriever warns about those.
        self.keyword_indexes = tuple(dict.fromkeys((*KEYWORD_INDEXES, *keyword_indexes)))
        self._warned_unindexed: set[tuple[str, str]] = set()

    # -- engine primitives -------------------------------------------------------

    @abstractmethod
    def _exists(self, c: str) -> bool: ...

    @abstractmethod
    def _create(self, c: str, dim: int) -> None:
        """Create the collection with its dense/sparse vectors (payload indexes come from _index)."""

    @abstractmethod
    def _index(self, c: str, field: str, kind: Literal["keyword", "integer"]) -> None:
        """Create a payload index (idempotent)."""

    @abstractmethod
    def _drop(self, c: str) -> None: ...

    @abstractmethod
    def _list(self) -> list[str]: ...

    @abstractmethod
    def _upsert(self, c: str, points: Sequence[ChunkPoint]) -> None: ...

    @abstractmethod
    def _delete(self, c: str, must: list[Cond], must_not: list[Cond]) -> None: ...

    @abstractmethod
    def _get_control(self, c: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def _put_control(self, c: str, payload: dict[str, Any]) -> None: ...

    @abstractmethod
    def _hybrid(self, c: str, q: HybridQuery, must: list[Cond], must_not: list[Cond], limit: int,
                with_vectors: bool) -> list[Hit]: ...

    @abstractmethod
    def _count(self, c: str, must: list[Cond], must_not: list[Cond]) -> int: ...

    @abstractmethod
    def _scroll(self, c: str, must: list[Cond], fields: list[str], dense: bool = False
                ) -> Iterator[dict[str, Any]]:
        """Payload ``fields`` of the points matching ``must`` (never the control point); with ``dense``, each
        dict also carries the point's dense vector under ``"_dense"``."""

    def warm_up(self) -> None:
        return None

    def close(self) -> None:
        return None

    # -- collections ---------------------------------------------------------------

    def list_collections(self) -> list[str]:
        return sorted(self._list())

    def has_collection(self, collection: str) -> bool:
        return self._exists(check_collection_name(collection))

    def ensure_collection(self, collection: str, dim: int, model_id: str) -> None:
        c = check_collection_name(collection)
        with self._writer:
            if not self._exists(c):
                self._create(c, dim)
                for f in INTEGER_INDEXES:
                    self._index(c, f, "integer")
                self._put_control(c, {"kind": "control", "hidden": [], "dim": dim, "model_id": model_id,
                                      "keyword_indexes": []})
            meta = self._control(c, fresh=True)
            have = meta.get("keyword_indexes")
            # Collections made before indexes were recorded got exactly Keel's own set.
            missing = [f for f in self.keyword_indexes if f not in (KEYWORD_INDEXES if have is None else have)]
            if missing or have is None:
                for f in missing:
                    self._index(c, f, "keyword")  # an existing collection indexes its points in place
                meta = {**meta, "keyword_indexes": sorted({*(have or KEYWORD_INDEXES), *missing})}
                self._put_control(c, meta)
                self._meta[c] = meta
            if meta.get("dim") not in (None, dim) or meta.get("model_id") not in (None, model_id):
                raise DimensionMismatch(
                    f"collection {c!r} was built with {meta.get('model_id')} ({meta.get('dim')} dims), not "
                    f"{model_id} ({dim} dims): use another collection or drop this one", param="collection")

    def drop_collection(self, collection: str) -> None:
        c = check_collection_name(collection)
        with self._writer, self._rw.write():
            if self._exists(c):
                self._drop(c)
            self._hidden.pop(c, None)
            self._meta.pop(c, None)

    def collection_info(self, collection: str) -> dict[str, Any]:
        c = self._require(collection)
        meta = self._control(c, fresh=True)
        return {"name": c, "store": self.name, "dim": meta.get("dim"), "model_id": meta.get("model_id"),
                "chunks": self.count(c), "hidden_versions": len(meta.get("hidden", [])),
                "payload_indexes": meta.get("keyword_indexes") or list(KEYWORD_INDEXES)}

    def _require(self, collection: str) -> str:
        c = check_collection_name(collection)
        if not self._exists(c):
            raise CollectionNotFound(f"collection {c!r} does not exist (ingest something into it first)",
                                     param="collection")
        return c

    def _control(self, c: str, fresh: bool = False) -> dict[str, Any]:
        if fresh or self.shared or c not in self._meta:
            payload = self._get_control(c) or {"kind": "control", "hidden": []}
            self._meta[c] = payload
            self._hidden[c] = set(payload.get("hidden", []))
        return self._meta[c]

    def _hidden_set(self, c: str) -> set[str]:
        self._control(c)
        return self._hidden[c]

    def _set_hidden(self, c: str, hidden: set[str]) -> None:
        meta = dict(self._control(c, fresh=True))
        meta["hidden"] = sorted(hidden)
        self._put_control(c, meta)
        self._meta[c] = meta
        self._hidden[c] = set(hidden)

    def _visibility(self, c: str) -> list[Cond]:
        hidden = self._hidden_set(c)
        out = [Cond("kind", "eq", "control")]
        if hidden:
            out.append(Cond("doc_version", "any", sorted(hidden)))
        return out

    # -- writes --------------------------------------------------------------------

    def _versions_of(self, c: str, doc_id: str) -> set[str]:
        return {p["doc_version"] for p in self._scroll(c, [Cond("doc_id", "eq", doc_id)], ["doc_version"])
                if "doc_version" in p}

    def replace_document(self, collection: str, doc_id: str, version: str, points: Sequence[ChunkPoint]
                         ) -> None:
        c = self._require(collection)
        for p in points:
            if p.payload.get("doc_id") != doc_id or p.payload.get("doc_version") != version:
                raise InvalidRequest("every point must carry the document's doc_id and doc_version")
        with self._writer:
            present = self._versions_of(c, doc_id)
            hidden = set(self._hidden_set(c))
            already_live = version in present and version not in hidden
            if not already_live:
                # Under the write lock: a query that read the hidden set before this change must finish
                # before the new version's points land, or it would see them next to the old version.
                with self._rw.write():
                    self._set_hidden(c, hidden | {version})
            if points:
                self._upsert(c, points)
            old = present - {version}
            # The flip: one control-point write makes `version` visible and every other version hidden.
            self._set_hidden(c, (self._hidden_set(c) - {version}) | old)
            if old:
                self._retire(c, doc_id, keep=version, versions=old)

    def delete_document(self, collection: str, doc_id: str) -> None:
        c = self._require(collection)
        with self._writer:
            present = self._versions_of(c, doc_id)
            if not present:
                return
            self._set_hidden(c, self._hidden_set(c) | present)
            self._retire(c, doc_id, keep=None, versions=present)

    def _retire(self, c: str, doc_id: str, keep: str | None, versions: set[str]) -> None:
        must_not = [Cond("doc_version", "eq", keep)] if keep else []
        with self._rw.write():  # waits for queries that read the hidden set before the flip
            self._delete(c, [Cond("doc_id", "eq", doc_id)], must_not)
        self._set_hidden(c, self._hidden_set(c) - versions)

    def repair(self, collection: str) -> int:
        """Delete crash leftovers: documents with no visible version, stale versions, dead hidden entries."""
        c = self._require(collection)
        fixed = 0
        docs = self.documents(c)
        with self._writer:
            live_versions: set[str] = set()
            for d in docs.values():
                live_versions.update(d.versions)
                if d.live is None:
                    self._set_hidden(c, self._hidden_set(c) | set(d.versions))
                    self._retire(c, d.doc_id, keep=None, versions=set(d.versions))
                    fixed += 1
                elif len(d.versions) > 1:
                    stale = set(d.versions) - {d.live}
                    self._set_hidden(c, self._hidden_set(c) | stale)
                    self._retire(c, d.doc_id, keep=d.live, versions=stale)
                    fixed += 1
            dead = self._hidden_set(c) - live_versions
            if dead:
                self._set_hidden(c, self._hidden_set(c) - dead)
        return fixed

    # -- reads ---------------------------------------------------------------------

    def query(self, collection: str, query: HybridQuery) -> list[Hit]:
        c = self._require(collection)
        must = parse_filters(query.filters)
        self._warn_unindexed(c, must)
        limit = max(query.top_k * 4, query.prefetch_limit) if query.mmr else query.top_k
        if query.score_threshold is not None:
            limit = max(limit, query.prefetch_limit)
        with self._rw.read():
            hits = self._hybrid(c, query, must, self._visibility(c), limit, with_vectors=query.mmr)
        if query.score_threshold is not None:
            hits = [h for h in hits if h.score >= query.score_threshold]
        if query.mmr:
            hits = mmr_select(hits, query.dense, query.top_k, query.mmr_lambda)
            hits = [Hit(h.id, h.score, h.payload) for h in hits]
        return hits[: query.top_k]

    def _warn_unindexed(self, c: str, must: list[Cond]) -> None:
        indexed = set(self._control(c).get("keyword_indexes") or KEYWORD_INDEXES) | set(INTEGER_INDEXES)
        for cond in must:
            if cond.key not in indexed and (c, cond.key) not in self._warned_unindexed:
                self._warned_unindexed.add((c, cond.key))
                log.warning("collection %r: filter on %r, which has no payload index, scans every chunk; add it "
                            "to rag.payload_indexes for fast filtered queries", c, cond.key)

    def count(self, collection: str, filters: Filters | None = None) -> int:
        c = self._require(collection)
        with self._rw.read():
            return self._count(c, parse_filters(filters), self._visibility(c))

    def dense_vectors(self, collection: str, doc_id: str, version: str) -> dict[str, np.ndarray]:
        c = self._require(collection)
        out: dict[str, np.ndarray] = {}
        for p in self._scroll(c, [Cond("doc_id", "eq", doc_id), Cond("doc_version", "eq", version)],
                              ["embed_hash"], dense=True):
            h, v = p.get("embed_hash"), p.get("_dense")
            if h and v is not None:  # chunks written before embed_hash was recorded are simply re-embedded
                out[h] = np.asarray(v, dtype=np.float32)
        return out

    def documents(self, collection: str) -> dict[str, DocState]:
        c = self._require(collection)
        hidden = set(self._control(c, fresh=True).get("hidden", []))
        docs: dict[str, DocState] = {}
        for p in self._scroll(c, [], ["doc_id", "doc_version", "source", "source_sha256", "title"]):
            doc_id = p.get("doc_id")
            if doc_id is None:
                continue
            d = docs.get(doc_id)
            if d is None:
                d = docs[doc_id] = DocState(doc_id=doc_id)
            v = p["doc_version"]
            d.versions[v] = d.versions.get(v, 0) + 1
            if v not in hidden:
                d.live = v
                d.source, d.source_sha256, d.title = p.get("source", ""), p.get("source_sha256", ""), p.get(
                    "title", "")
        return docs
