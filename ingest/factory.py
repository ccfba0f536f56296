"""Build the long-lived RAG objects once (API lifespan or a CLI command)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ingest.chunking import HFTokenizer, Tokenizer, WhitespaceTokenizer
from ingest.embedding import Bm25Encoder, Embedder, SentenceTransformerEmbedder, SparseEncoder
from ingest.manifest import SnapshotStore
from ingest.pipeline import IngestPipeline
from ingest.rerank import Rerankers
from ingest.retriever import Retriever, transformer_of
from ingest.settings import RagSettings
from ingest.store.base import VectorStore

if TYPE_CHECKING:
    from ingest.settings import RagConfig


@dataclass
class RagServices:
    settings: RagSettings
    embedder: Embedder
    sparse: SparseEncoder
    store: VectorStore
    snapshots: SnapshotStore
    pipeline: IngestPipeline
    retriever: Retriever

    def warm_up(self) -> None:
        """Load the model and open the store now (seconds), instead of on the first request."""
        self.embedder.warm_up()
        self.store.warm_up()
        for name in {self.settings.collection, *self.settings.collections}:
            reranker = self.retriever.rerankers.get(self.settings.retrieval_for(name).rerank)
            if reranker is not None:
                reranker.warm_up()

    def close(self) -> None:
        self.store.close()
        self.snapshots.close()

    def list_collections(self) -> list[dict]:
        return [self.store.collection_info(c) for c in self.store.list_collections()]


def build_store(rag: RagSettings, home) -> VectorStore:
    if rag.store == "edge":
        from ingest.store.edge import EdgeStore  # lazy: only the configured store kind (rag.store) loads

        return EdgeStore(rag.store_path(home), keyword_indexes=rag.payload_indexes)
    from ingest.store.qdrant import QdrantClientStore  # lazy: only the configured store kind (rag.store) loads

    if rag.url:
        return QdrantClientStore(url=rag.url, api_key=rag.api_key, keyword_indexes=rag.payload_indexes)
    return QdrantClientStore(path=rag.store_path(home), keyword_indexes=rag.payload_indexes)


def build_rag(settings: RagConfig, *, embedder: Embedder | None = None, store: VectorStore | None = None
              ) -> RagServices:
    """Cheap: nothing is loaded or opened until ``warm_up()`` or first use."""
    rag = settings.rag
    emb = embedder or SentenceTransformerEmbedder(rag.embedding_model, device=rag.embedding_device,
                                                  batch_size=rag.embedding_batch_size)
    tokenizer: Tokenizer
    model_path = getattr(emb, "model_path", None)
    tokenizer = HFTokenizer(model_path) if model_path is not None else WhitespaceTokenizer()
    sparse = Bm25Encoder()
    vs = store or build_store(rag, settings.home)
    snapshots = SnapshotStore(rag.db_path(settings.home), url=rag.snapshots_url)
    pipeline = IngestPipeline(store=vs, embedder=emb, sparse=sparse, tokenizer=tokenizer, chunker=rag.chunker,
                              snapshots=snapshots, loader=rag.loader)
    retriever = Retriever(store=vs, embedder=emb, sparse=sparse, defaults=rag.retrieval,
                          collection=rag.collection, per_collection=rag.retrieval_for,
                          rerankers=Rerankers(lambda: transformer_of(emb), device=rag.embedding_device))
    return RagServices(rag, emb, sparse, vs, snapshots, pipeline, retriever)
