"""Embedded default: the Rust Qdrant engine in-process (``qdrant-edge-py``), one shard per collection.

Layout: ``<root>/<collection>/`` is an EdgeShard folder. The engine takes an exclusive
lock on it, so one process owns a store folder at a time (a second gets ``StoreLocked``).
Updates go through the shard's write-ahead log, so a killed process loses nothing it
had acknowledged.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

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
_FLUSH_TRIES = 3
log = logging.getLogger("keel.ingest")


class EdgeStore(QdrantLikeStore):
    name = "edge"

    def __init__(self, root: Path, *, keyword_indexes: Sequence[str] = ()) -> None:
        super().__init__(keyword_indexes=keyword_indexes)
        self.root = Path(root)
        self._shards: dict[str, Any] = {}
        self._claims: dict[str, int] = {}  # collection -> fd holding its advisory lock
        self._open_lock = threading.Lock()
        self._q: Any = None

    @property
    def q(self):
        if self._q is None:
            import qdrant_edge

            self._q = qdrant_edge
        return self._q

    def warm_up(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for c in self._list():
            self._shard(c)

    def close(self) -> None:
        """Flush and close every shard, each even when another failed. A flush that keeps failing loses no
        acknowledged update (they are in the shard's write-ahead log, replayed when it opens next), so it is
        reported with that meaning rather than raised."""
        with self._open_lock:
            for name, shard in self._shards.items():
                for attempt in range(_FLUSH_TRIES):
                    try:
                        shard.flush()
                        break
                    except Exception as e:
                        if attempt + 1 < _FLUSH_TRIES:
                            time.sleep(0.2 * (attempt + 1))
                            continue
                        log.error("collection %r: flushing to its segment files failed %d times (%s); every "
                                  "acknowledged update is still in its write-ahead log and is replayed when the "
                                  "store opens next. If chunks are missing then, re-run the ingest (unchanged "
                                  "files are skipped)", name, _FLUSH_TRIES, e)
                try:
                    shard.close()
                except Exception as e:
                    log.error("collection %r: closing the shard failed (%s); its lock is released when this "
                              "process exits", name, e)
            self._shards.clear()
            for c in list(self._claims):
                self._release(c)

    def _dir(self, c: str) -> Path:
        return self.root / c

    def _claim(self, c: str) -> None:
        """Take this process's lock on a collection before the engine touches its folder. The engine's own
        lock is not enough: a second process that merely tries ``EdgeShard.load`` on a folder another one
        holds rewrites the holder's payload-index journals, whose next flush then fails ("tracker_journal.dat
        is shorter than expected") — what a `keel ingest` beside a running server did at its Ctrl-C."""
        if c in self._claims:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f".{c}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(f"the store folder {self._dir(c)} is open in another process (the embedded engine "
                              "allows one); stop it, or point rag.path elsewhere") from None
        self._claims[c] = fd

    def _release(self, c: str) -> None:
        fd = self._claims.pop(c, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def _shard(self, c: str):
        shard = self._shards.get(c)
        if shard is not None:
            return shard
        with self._open_lock:
            if c not in self._shards:
                self._claim(c)
                try:
                    self._shards[c] = self.q.EdgeShard.load(str(self._dir(c)))
                except Exception as e:
                    self._release(c)
                    if "WouldBlock" in str(e) or "lock" in str(e).lower():
                        raise StoreLocked(
                            f"the store folder {self._dir(c)} is open in another process (the embedded engine "
                            "allows one); stop it, or point rag.path elsewhere") from e
                    raise StoreUnavailable(f"cannot open collection {c!r} at {self._dir(c)}: {e}") from e
            return self._shards[c]

    # -- primitives ----------------------------------------------------------------

    def _exists(self, c: str) -> bool:
        return c in self._shards or (self._dir(c).is_dir() and any(self._dir(c).iterdir()))

    def _list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.is_dir() and any(p.iterdir())]

    def _create(self, c: str, dim: int) -> None:
        q = self.q
        config = q.EdgeConfig(
            vectors={DENSE: q.EdgeVectorParams(size=dim, distance=q.Distance.Cosine)},
            sparse_vectors={SPARSE: q.EdgeSparseVectorParams(modifier=q.Modifier.Idf)},
        )
        with self._open_lock:
            self._claim(c)
            try:
                self._dir(c).mkdir(parents=True, exist_ok=True)
                self._shards[c] = q.EdgeShard.create(str(self._dir(c)), config)
            except BaseException:
                self._release(c)
                raise

    def _index(self, c: str, field: str, kind: Literal["keyword", "integer"]) -> None:
        q = self.q
        schema = q.PayloadSchemaType.Keyword if kind == "keyword" else q.PayloadSchemaType.Integer
        self._shard(c).update(q.UpdateOperation.create_field_index(field, schema))

    def _drop(self, c: str) -> None:
        with self._open_lock:
            self._claim(c)  # never delete a folder another process holds
            shard = self._shards.pop(c, None)
            if shard is not None:
                shard.close()
            shutil.rmtree(self._dir(c), ignore_errors=True)
            self._release(c)

    def _upsert(self, c: str, points: Sequence[ChunkPoint]) -> None:
        q = self.q
        shard = self._shard(c)
        batch = [
            q.Point(id=uuid.UUID(p.id), vector={
                DENSE: [float(x) for x in p.dense],
                SPARSE: q.SparseVector(indices=p.sparse.indices, values=p.sparse.values),
            }, payload=p.payload)
            for p in points
        ]
        for i in range(0, len(batch), 512):
            shard.update(q.UpdateOperation.upsert_points(batch[i:i + 512]))

    def _delete(self, c: str, must: list[Cond], must_not: list[Cond]) -> None:
        self._shard(c).update(self.q.UpdateOperation.delete_points_by_filter(self._filter(must, must_not)))

    def _get_control(self, c: str) -> dict[str, Any] | None:
        recs = self._shard(c).retrieve([uuid.UUID(CONTROL_ID)], True, False)
        return dict(recs[0].payload or {}) if recs else None

    def _put_control(self, c: str, payload: dict[str, Any]) -> None:
        q = self.q
        self._shard(c).update(q.UpdateOperation.upsert_points([q.Point(id=uuid.UUID(CONTROL_ID), vector={},
                                                                       payload=payload)]))

    def _hybrid(self, c: str, query: HybridQuery, must: list[Cond], must_not: list[Cond], limit: int,
                with_vectors: bool) -> list[Hit]:
        q = self.q
        flt = self._filter(must, must_not)
        dense = [float(x) for x in query.dense]
        prefetches = [q.Prefetch(limit=query.prefetch_limit, query=q.Query.Nearest(dense, using=DENSE),
                                 filter=flt)]
        weights = [query.weights[0]]
        if query.sparse is not None and query.sparse.indices:
            weights.append(query.weights[1])
            sv = q.SparseVector(indices=query.sparse.indices, values=query.sparse.values)
            prefetches.append(q.Prefetch(limit=query.prefetch_limit, query=q.Query.Nearest(sv, using=SPARSE),
                                         filter=flt))
        req = q.QueryRequest(limit=limit, prefetches=prefetches, query=q.Fusion.Rrf(k=query.rrf_k, weights=weights),
                             filter=flt, with_payload=True, with_vector=[DENSE] if with_vectors else False)
        out = []
        for p in self._shard(c).query(req):
            vec = None
            if with_vectors and p.vector:
                vec = p.vector.get(DENSE) if isinstance(p.vector, dict) else p.vector
            out.append(Hit(str(p.id), float(p.score), dict(p.payload or {}), vec))
        return out

    def _count(self, c: str, must: list[Cond], must_not: list[Cond]) -> int:
        return int(self._shard(c).count(self.q.CountRequest(exact=True, filter=self._filter(must, must_not))))

    def _scroll(self, c: str, must: list[Cond], fields: list[str], dense: bool = False
                ) -> Iterator[dict[str, Any]]:
        q = self.q
        shard = self._shard(c)
        offset = None
        flt = self._filter(must, [Cond("kind", "eq", "control")])
        while True:
            recs, offset = shard.scroll(q.ScrollRequest(offset=offset, limit=_SCROLL_PAGE, filter=flt,
                                                        with_payload=q.PayloadSelector.Include(fields),
                                                        with_vector=[DENSE] if dense else False))
            for r in recs:
                payload = dict(r.payload or {})
                if dense and r.vector:
                    payload["_dense"] = r.vector.get(DENSE) if isinstance(r.vector, dict) else r.vector
                yield payload
            if offset is None:
                return

    def _filter(self, must: list[Cond], must_not: list[Cond]):
        q = self.q
        if not must and not must_not:
            return None
        return q.Filter(must=[self._cond(x) for x in must] or None,
                        must_not=[self._cond(x) for x in must_not] or None)

    def _cond(self, cond: Cond):
        q = self.q
        if cond.op == "eq":
            return q.FieldCondition(key=cond.key, match=q.MatchValue(cond.value))
        if cond.op == "any":
            return q.FieldCondition(key=cond.key, match=q.MatchAny(cond.value))
        r = cond.value
        return q.FieldCondition(key=cond.key, range=q.RangeFloat(gte=r.gte, gt=r.gt, lte=r.lte, lt=r.lt))
