"""Vector stores: the ``VectorStore`` protocol and its Qdrant implementations."""

from ingest.store.base import ChunkPoint, DocState, Hit, HybridQuery, Range, VectorStore

__all__ = ["ChunkPoint", "DocState", "Hit", "HybridQuery", "Range", "VectorStore"]
