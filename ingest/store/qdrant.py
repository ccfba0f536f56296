"""``qdrant-client`` store: a Qdrant server or cluster by URL, or the client's local mode by path.

Local mode (``path=`` or ``":memory:"``) is pure Python and ignores payload indexes: it exists
here so the server code path is exercised in tests without a server binary.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from ingest.errors import StoreLocked, StoreUnavailable
from ingest.store.base import (
    CONTROL_ID,
    DENSE,
    SPARSE,
    ChunkPoint,
    Cond,
    Hit,
    HybridQuery,
    QdrantLikeStore,
)

_SCROLL_PAGE = 1024
F = TypeVar("F", bound=Callable[..., Any])


def _locked(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: QdrantClientStore, *args: Any, **kwargs: Any) -> Any:
        with self._local_lock:
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class QdrantClientStore(QdrantLikeStore):
    name = "qdrant"

    def __init__(self, *, url: str | None = None, path: Path | str | None = None, api_key: str | None = None,
                 timeout_s: float = 10.0, keyword_indexes: Sequence[str] = ()) -> None:
        super().__init__(keyword_indexes=keyword_indexes)
        if (url is None) == (path is None):
            raise ValueError("give exactly one of url (server) or path (local mode, or ':memory:')")
        self.url, self.path, self.api_key, self.timeout_s = url, path, api_key, timeout_s
        # Other processes can write a server's collections; re-read the hidden set on every query.
        self.shared = url is not None
        self._client: Any = None
        # Local mode is plain Python over numpy arrays and breaks under concurrent read + write
        # (seen: broadcast errors between its payload mask and deleted mask), so serialise it.
        self._local_lock: Any = threading.RLock() if url is None else contextlib.nullcontext()

    @property
    def client(self):
        if self._client is None:
            from qdrant_client import QdrantClient

            try:
                if self.url is not None:
                    self._client = QdrantClient(url=self.url, api_key=self.api_key, timeout=int(self.timeout_s))
                elif str(self.path) == ":memory:":
                    self._client = QdrantClient(location=":memory:")
                else:
                    Path(self.path).mkdir(parents=True, exist_ok=True)
                    self._client = QdrantClient(path=str(self.path))
            except RuntimeError as e:
                raise StoreLocked(f"the local Qdrant folder {self.path} is open elsewhere: {e}") from e
        return self._client

    def warm_up(self) -> None:
        try:
            self.client.get_collections()
        except Exception as e:
            raise StoreUnavailable(f"cannot reach Qdrant at {self.url or self.path}: {e}") from e

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def m(self):
        from qdrant_client import models

        return models

    # -- primitives ----------------------------------------------------------------

    @_locked
    def _exists(self, c: str) -> bool:
        return bool(self.client.collection_exists(c))

    @_locked
    def _list(self) -> list[str]:
        return [c.name for c in self.client.get_collections().collections]

    @_locked
    def _create(self, c: str, dim: int) -> None:
        m = self.m
        self.client.create_collection(
            c,
            vectors_config={DENSE: m.VectorParams(size=dim, distance=m.Distance.COSINE)},
            sparse_vectors_config={SPARSE: m.SparseVectorParams(modifier=m.Modifier.IDF)},
        )

    @_locked
    def _index(self, c: str, field: str, kind: Literal["keyword", "integer"]) -> None:
        if self.url is None:  # local mode warns and ignores payload indexes
            return
        schema = self.m.PayloadSchemaType.KEYWORD if kind == "keyword" else self.m.PayloadSchemaType.INTEGER
        self.client.create_payload_index(c, field, schema, wait=True)

    @_locked
    def _drop(self, c: str) -> None:
        self.client.delete_collection(c)

    @_locked
    def _upsert(self, c: str, points: Sequence[ChunkPoint]) -> None:
        m = self.m
        batch = [
            m.PointStruct(id=p.id, vector={
                DENSE: [float(x) for x in p.dense],
                SPARSE: m.SparseVector(indices=p.sparse.indices, values=p.sparse.values),
            }, payload=p.payload)
            for p in points
        ]
        for i in range(0, len(batch), 256):
            self.client.upsert(c, batch[i:i + 256], wait=True)

    @_locked
    def _delete(self, c: str, must: list[Cond], must_not: list[Cond]) -> None:
        selector = self.m.FilterSelector(filter=self._filter(must, must_not))
        self.client.delete(c, points_selector=selector, wait=True)

    @_locked
    def _get_control(self, c: str) -> dict[str, Any] | None:
        recs = self.client.retrieve(c, [CONTROL_ID], with_payload=True, with_vectors=False)
        return dict(recs[0].payload or {}) if recs else None

    @_locked
    def _put_control(self, c: str, payload: dict[str, Any]) -> None:
        self.client.upsert(c, [self.m.PointStruct(id=CONTROL_ID, vector={}, payload=payload)], wait=True)

    @_locked
    def _hybrid(self, c: str, query: HybridQuery, must: list[Cond], must_not: list[Cond], limit: int,
                with_vectors: bool) -> list[Hit]:
        m = self.m
        flt = self._filter(must, must_not)
        prefetch = [m.Prefetch(query=[float(x) for x in query.dense], using=DENSE, limit=query.prefetch_limit,
                               filter=flt)]
        weights = [query.weights[0]]
        if query.sparse is not None and query.sparse.indices:
            sv = m.SparseVector(indices=query.sparse.indices, values=query.sparse.values)
            prefetch.append(m.Prefetch(query=sv, using=SPARSE, limit=query.prefetch_limit, filter=flt))
            weights.append(query.weights[1])
        res = self.client.query_points(c, prefetch=prefetch,
                                       query=m.RrfQuery(rrf=m.Rrf(k=query.rrf_k, weights=weights)),
                                       query_filter=flt, limit=limit, with_payload=True,
                                       with_vectors=[DENSE] if with_vectors else False)
        out = []
        for p in res.points:
            vec = p.vector.get(DENSE) if with_vectors and isinstance(p.vector, dict) else None
            out.append(Hit(str(p.id), float(p.score), dict(p.payload or {}), vec))
        return out

    @_locked
    def _count(self, c: str, must: list[Cond], must_not: list[Cond]) -> int:
        return int(self.client.count(c, count_filter=self._filter(must, must_not), exact=True).count)

    def _scroll(self, c: str, must: list[Cond], fields: list[str], dense: bool = False
                ) -> Iterator[dict[str, Any]]:
        offset = None
        flt = self._filter(must, [Cond("kind", "eq", "control")])
        while True:
            with self._local_lock:
                recs, offset = self.client.scroll(c, scroll_filter=flt, limit=_SCROLL_PAGE, offset=offset,
                                                  with_payload=fields, with_vectors=[DENSE] if dense else False)
            for r in recs:
                payload = dict(r.payload or {})
                if dense and r.vector:
                    payload["_dense"] = r.vector.get(DENSE) if isinstance(r.vector, dict) else r.vector
                yield payload
            if offset is None:
                return

    def _filter(self, must: list[Cond], must_not: list[Cond]):
        m = self.m
        if not must and not must_not:
            return None
        return m.Filter(must=[self._cond(x) for x in must] or None,
                        must_not=[self._cond(x) for x in must_not] or None)

    def _cond(self, cond: Cond):
        m = self.m
        if cond.op == "eq":
            return m.FieldCondition(key=cond.key, match=m.MatchValue(value=cond.value))
        if cond.op == "any":
            return m.FieldCondition(key=cond.key, match=m.MatchAny(any=cond.value))
        r = cond.value
        return m.FieldCondition(key=cond.key, range=m.Range(gte=r.gte, gt=r.gt, lte=r.lte, lt=r.lt))
