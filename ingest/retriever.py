"""Hybrid retrieval with citations."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from app.core.errors import InvalidRequest
from ingest.chunking import heading_prefix
from ingest.embedding import Embedder, SparseEncoder
from ingest.errors import EmbeddingModelError
from ingest.rerank import Rerankers
from ingest.settings import GroupBy, RetrievalDefaults
from ingest.store.base import Filters, Hit, HybridQuery, VectorStore

# group_by="document" over-fetches fused candidates and keeps each document's best chunk. When one long
# document fills the candidates, it asks again for 4x as many, up to this many chunks.
_GROUP_OVERFETCH = 4
_GROUP_MAX_FETCH = 2000


class Citation(BaseModel):
    """Where a passage comes from, precisely enough to open the source at it."""

    source: str
    title: str
    heading_path: list[str] = Field(default_factory=list)
    page: int | None = None
    page_end: int | None = None
    char_start: int
    char_end: int
    doc_id: str
    chunk_id: str
    chunk_index: int
    snapshot_id: str

    def label(self) -> str:
        """Human-readable 'Title > Section > Subsection, p. 3'."""
        path = self.heading_path[1:] if self.heading_path[:1] == [self.title] else self.heading_path
        page = f", p. {self.page}" if self.page else ""
        return " > ".join([self.title, *path]) + page


class RetrievedChunk(BaseModel):
    text: str
    score: float
    citation: Citation
    metadata: dict[str, Any] = Field(default_factory=dict)


class RetrievalResult(BaseModel):
    query: str
    collection: str
    chunks: list[RetrievedChunk]
    took_ms: float
    #: where the time went: embedding the query (a cached question costs ~0), the store's search, the reranker
    embed_ms: float = 0.0
    search_ms: float = 0.0
    rerank_ms: float = 0.0
    reranker: str | None = None


_CITATION_KEYS = {"source", "title", "heading_path", "page", "page_end", "char_start", "char_end", "doc_id",
                  "chunk_index", "snapshot_id", "text", "heading", "doc_version", "source_sha256", "chunk_hash",
                  "n_tokens", "doc_kind"}


class Retriever:
    def __init__(self, *, store: VectorStore, embedder: Embedder, sparse: SparseEncoder,
                 defaults: RetrievalDefaults | None = None, collection: str = "default",
                 per_collection: Callable[[str], RetrievalDefaults] | None = None,
                 rerankers: Rerankers | None = None) -> None:
        self.store = store
        self.embedder = embedder
        self.sparse = sparse
        self.defaults = defaults or RetrievalDefaults()
        self.collection = collection
        self._per_collection = per_collection
        self.rerankers = rerankers or Rerankers(lambda: transformer_of(embedder))

    def defaults_for(self, collection: str) -> RetrievalDefaults:
        return self._per_collection(collection) if self._per_collection else self.defaults

    def retrieve(self, query: str, *, collection: str | None = None, top_k: int | None = None,
                 filters: Filters | None = None, score_threshold: float | None = None, mmr: bool | None = None,
                 mmr_lambda: float | None = None, group_by: GroupBy | None = None) -> RetrievalResult:
        """``top_k`` chunks, best first; with ``group_by="document"``, the best chunk of each of the
        ``top_k`` best documents (fewer only when fewer documents match)."""
        if not query or not query.strip():
            raise InvalidRequest("query is empty", param="query")
        t0 = time.perf_counter()
        col = collection or self.collection
        d = self.defaults_for(col)
        k = top_k or d.top_k
        group_by = group_by or d.group_by
        reranker = self.rerankers.get(d.rerank)
        focused = focus(query, d.focus_chars)
        dense, sparse = self.embedder.embed_query(focused), self.sparse.encode_query(query)
        t_embed = time.perf_counter()
        want = max(k, d.rerank.top_n) if reranker else k
        # group_by starts from the candidates each leg fetches anyway (prefetch_limit): asking for fewer saves
        # nothing in the store and made a small k need more rounds than a large one
        fetch = max(want * _GROUP_OVERFETCH, d.prefetch_limit) if group_by else want
        while True:
            hq = HybridQuery(
                dense=dense, sparse=sparse, top_k=fetch, prefetch_limit=max(d.prefetch_limit, fetch), rrf_k=d.rrf_k,
                weights=d.weights, filters=filters,
                score_threshold=d.score_threshold if score_threshold is None else score_threshold,
                mmr=d.mmr if mmr is None else mmr, mmr_lambda=d.mmr_lambda if mmr_lambda is None else mmr_lambda,
            )
            found = self.store.query(col, hq)
            if not group_by:
                hits = found
                break
            hits = _best_per_document(found)[:want]
            # Fewer chunks than asked for means the candidates are exhausted: no more documents to find.
            if len(hits) == want or len(found) < fetch or fetch >= _GROUP_MAX_FETCH:
                break
            fetch = min(fetch * _GROUP_OVERFETCH, _GROUP_MAX_FETCH)
        t_search = time.perf_counter()
        if reranker is not None and len(hits) > 1:
            scores = reranker.score(focused, [_rerank_text(h.payload) for h in hits])
            order = sorted(range(len(hits)), key=lambda i: -float(scores[i]))
            hits = [Hit(hits[i].id, float(scores[i]), hits[i].payload) for i in order]
        hits = hits[:k]
        t_rerank = time.perf_counter()
        chunks = []
        for h in hits:
            p = h.payload
            chunks.append(RetrievedChunk(
                text=p.get("text", ""), score=h.score,
                citation=Citation(
                    source=p.get("source", ""), title=p.get("title", ""), heading_path=p.get("heading_path") or [],
                    page=p.get("page"), page_end=p.get("page_end"), char_start=p.get("char_start", 0),
                    char_end=p.get("char_end", 0), doc_id=p.get("doc_id", ""), chunk_id=h.id,
                    chunk_index=p.get("chunk_index", 0), snapshot_id=p.get("snapshot_id", "")),
                metadata={k: v for k, v in p.items() if k not in _CITATION_KEYS},
            ))
        return RetrievalResult(query=query, collection=col, chunks=chunks,
                               took_ms=(time.perf_counter() - t0) * 1000, embed_ms=(t_embed - t0) * 1000,
                               search_ms=(t_search - t_embed) * 1000, rerank_ms=(t_rerank - t_search) * 1000,
                               reranker=reranker.name if reranker else None)


_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


def focus(query: str, limit: int | None) -> str:
    """What the dense leg embeds of a query longer than ``limit`` characters: its questions (the last ones
    first, since a long message usually ends with what it asks), else its last sentences, within ``limit``."""
    if limit is None or len(query) <= limit:
        return query
    sentences = [s.strip() for s in _SENTENCE.split(query) if s.strip()]
    asked = [s for s in sentences if s.endswith("?")] or sentences
    picked: list[str] = []
    size = 0
    for s in reversed(asked):
        if picked and size + len(s) + 1 > limit:
            break
        picked.insert(0, s)
        size += len(s) + 1
    return " ".join(picked)[-limit:]


def _rerank_text(payload: dict[str, Any]) -> str:
    """What the reranker reads: 'title > section path' then the text, as the chunk's embedding did."""
    prefix = heading_prefix(payload.get("title", ""), payload.get("heading_path") or [])
    text = payload.get("text", "")
    return f"{prefix}\n\n{text}" if prefix else text


def transformer_of(embedder: Embedder):
    get = getattr(embedder, "sentence_transformer", None)
    if get is None:
        raise EmbeddingModelError(f"rerank 'late_interaction' needs a transformer embedding model; "
                                  f"{embedder.model_id} has none: set the collection's rerank.kind to 'none'")
    return get()


def _best_per_document(hits: list[Hit]) -> list[Hit]:
    """Hits come best first: keep the first of each document (Qdrant's query_points_groups with
    group_size=1, done here over the fused candidates so that every store engine has it)."""
    seen: set[str] = set()
    out = []
    for h in hits:
        doc = h.payload.get("doc_id", h.id)
        if doc not in seen:
            seen.add(doc)
            out.append(h)
    return out
