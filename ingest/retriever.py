"""Hybrid retrieval with citations."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field

from ingest.embedding import Embedder, SparseEncoder
from ingest.settings import RetrievalDefaults
from ingest.store.base import Filters, HybridQuery, VectorStore


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


_CITATION_KEYS = {"source", "title", "heading_path", "page", "page_end", "char_start", "char_end", "doc_id",
                  "chunk_index", "snapshot_id", "text", "heading", "doc_version", "source_sha256", "chunk_hash",
                  "n_tokens", "doc_kind"}


class Retriever:
    def __init__(self, *, store: VectorStore, embedder: Embedder, sparse: SparseEncoder,
                 defaults: RetrievalDefaults | None = None, collection: str = "default") -> None:
        self.store = store
        self.embedder = embedder
        self.sparse = sparse
        self.defaults = defaults or RetrievalDefaults()
        self.collection = collection

    def retrieve(self, query: str, *, collection: str | None = None, top_k: int | None = None,
                 filters: Filters | None = None, score_threshold: float | None = None, mmr: bool | None = None,
                 mmr_lambda: float | None = None) -> RetrievalResult:
        from app.core.errors import InvalidRequest

        if not query or not query.strip():
            raise InvalidRequest("query is empty", param="query")
        d = self.defaults
        t0 = time.perf_counter()
        col = collection or self.collection
        hq = HybridQuery(
            dense=self.embedder.embed_query(query), sparse=self.sparse.encode_query(query),
            top_k=top_k or d.top_k, prefetch_limit=max(d.prefetch_limit, top_k or d.top_k), rrf_k=d.rrf_k,
            filters=filters, score_threshold=d.score_threshold if score_threshold is None else score_threshold,
            mmr=d.mmr if mmr is None else mmr, mmr_lambda=d.mmr_lambda if mmr_lambda is None else mmr_lambda,
        )
        hits = self.store.query(col, hq)
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
                               took_ms=(time.perf_counter() - t0) * 1000)
