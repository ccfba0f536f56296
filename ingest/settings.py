"""RAG configuration: one ``RagSettings`` node under ``Settings.rag``.

Kept free of heavy imports so that loading settings never imports torch or Qdrant.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from app.core.db import postgres_url
from app.core.settings import CoreConfig

#: ``"document"``: at most one chunk per document (its best), so ``top_k`` counts documents, not chunks.
GroupBy = Literal["document"]


class ChunkerConfig(BaseModel):
    """How documents are cut into chunks. Recorded with every ingest run; changing it re-chunks everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(
        default=200, ge=16, le=8192,
        description="Token budget per chunk, counted with the embedding model's tokenizer. "
        "MiniLM truncates at 256 word pieces; 200 leaves room for the heading prefix.",
    )
    overlap_tokens: int = Field(default=32, ge=0, description="Trailing sentences carried into the next chunk.")
    min_tokens: int = Field(
        default=24, ge=0, description="A section shorter than this is merged into the next chunk of its parent."
    )
    prefix_headings: bool = Field(
        default=True, description="Embed 'title > heading path' in front of the chunk text (text stored raw)."
    )

    @model_validator(mode="after")
    def _check(self) -> ChunkerConfig:
        if self.overlap_tokens >= self.max_tokens // 2:
            raise ValueError("overlap_tokens must be less than half of max_tokens")
        return self

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


class LoaderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_file_bytes: int = Field(default=20_000_000, ge=1, description="Larger files are rejected, not read.")
    max_chars: int = Field(default=5_000_000, ge=1, description="Larger extracted texts are rejected.")
    min_chars: int = Field(default=1, ge=1, description="Documents with less text are rejected as empty.")


class RerankConfig(BaseModel):
    """Second stage over the fused candidates (ingest/rerank.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["none", "late_interaction", "cross_encoder"] = Field(
        default="none", description="late_interaction: MaxSim over the embedding model's token vectors plus the "
        "candidates' own embeddings (no extra model); cross_encoder: a sentence-transformers CrossEncoder folder.")
    model: Path | None = Field(default=None, description="cross_encoder: the model folder (loaded offline).")
    top_n: int = Field(default=20, ge=1, le=200, description="Fused candidates rescored; the cost grows with it.")

    @model_validator(mode="after")
    def _check(self) -> RerankConfig:
        if self.kind == "cross_encoder" and self.model is None:
            raise ValueError("rerank.kind 'cross_encoder' needs rerank.model: a sentence-transformers CrossEncoder "
                             "folder")
        return self


class RetrievalDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(default=5, ge=1, le=100, description="Results: chunks, or documents with group_by.")
    group_by: GroupBy | None = Field(
        default=None, description="'document': one chunk (the best) per document, top_k documents."
    )
    prefetch_limit: int = Field(default=50, ge=1, description="Candidates per dense/sparse branch before RRF.")
    rrf_k: int = Field(default=60, ge=1, description="RRF constant: fused score = sum 1/(k + rank).")
    weights: tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(ge=0)]] = Field(
        default=(0.5, 1.0), description="Qdrant's weighted RRF over the (dense, BM25) legs: a leg adds "
        "1/(k - 1 + rank/w), so a smaller weight makes that leg's top ranks stand out more (0 drops the leg). "
        "Tuned on the CPython FAQ (bench/retrieval_quality.py --tune), not on the sets the tests score.")
    rerank: RerankConfig = Field(default_factory=lambda: RerankConfig())
    score_threshold: float | None = Field(default=None, description="Applied to the fused (RRF) score.")
    mmr: bool = False
    mmr_lambda: float = Field(default=0.7, ge=0.0, le=1.0, description="1 = relevance only, 0 = diversity only.")
    focus_chars: int | None = Field(
        default=800, ge=100, description="A query longer than this (a pasted conversation, a long ticket) is "
        "embedded from its questions, or its last sentences, up to this length: the embedding model reads only "
        "its first ~256 tokens, where a long query's question rarely is; the reranker reads the same. BM25 gets the "
        "whole query. None embeds the query as it is.")

    @model_validator(mode="after")
    def _check_weights(self) -> RetrievalDefaults:
        if not any(self.weights):
            raise ValueError("weights: at least one of the (dense, BM25) weights must be above 0")
        return self


class RagSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: Literal["edge", "qdrant"] = Field(
        default="edge", description="edge: Qdrant engine in-process (qdrant-edge-py); qdrant: qdrant-client."
    )
    path: Path | None = Field(default=None, description="Store folder; None means <home>/qdrant.")
    url: str | None = Field(
        default=None, description="qdrant store: server/cluster URL. Without it the client's local mode "
        "is used at `path` (fine for tests, slow at scale)."
    )
    api_key: str | None = None
    snapshots_url: SecretStr | None = Field(default=None, description=(
        "postgresql:// URL of the ingest snapshots (each run's manifest) instead of <home>/rag.db: every API "
        "process then lists, diffs and continues the same collections' history (with the vectors on a Qdrant "
        "server, `url`). database_url fills it when unset."))
    payload_indexes: list[str] = Field(
        default_factory=list, description="Extra metadata fields (keyword) to index: the fields you filter on. "
        "Keel's own (source, doc_kind, doc_id, ...) are always indexed; filters on other fields scan every chunk."
    )
    collection: str = "default"
    embedding_model: Path | None = Field(
        default=None, description="sentence-transformers folder; None means the packaged all-MiniLM-L6-v2."
    )
    embedding_device: str = "cpu"
    embedding_batch_size: int = Field(default=32, ge=1)
    chunker: ChunkerConfig = Field(default_factory=ChunkerConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    retrieval: RetrievalDefaults = Field(default_factory=RetrievalDefaults)
    collections: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-collection retrieval settings over rag.retrieval, e.g. "
        "{'support': {'rerank': {'kind': 'late_interaction'}, 'weights': [1, 1]}}.")

    @model_validator(mode="after")
    def _check_collections(self) -> RagSettings:
        for name in self.collections:
            try:
                self.retrieval_for(name)
            except ValidationError as e:
                what = "; ".join(f"rag.collections.{name}.{'.'.join(map(str, err['loc']))}: "
                                 f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())
                raise ValueError(what) from None
        return self

    def retrieval_for(self, collection: str) -> RetrievalDefaults:
        """rag.retrieval with the collection's own settings over it (nested rerank settings merge too)."""
        over = self.collections.get(collection)
        if not over:
            return self.retrieval
        merged = self.retrieval.model_dump()
        for key, value in over.items():
            merged[key] = {**merged[key], **value} if isinstance(merged.get(key), dict) and isinstance(
                value, dict) else value
        return RetrievalDefaults.model_validate(merged)

    @field_validator("snapshots_url", mode="before")
    @classmethod
    def _snapshots_url(cls, value: Any) -> SecretStr | None:
        return postgres_url(value, setting="rag.snapshots_url", otherwise="<home>/rag.db")

    def store_path(self, home: Path) -> Path:
        return self.path if self.path is not None else home / "qdrant"

    def db_path(self, home: Path) -> Path:
        return home / "rag.db"


class RagConfig(CoreConfig, Protocol):
    """What the RAG services read from the settings tree."""

    rag: RagSettings
