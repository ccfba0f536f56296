"""RAG errors: subclasses of Keel's hierarchy so the API maps them without knowing about ingest."""

from __future__ import annotations

from app.core.errors import BackendUnavailable, Conflict, InvalidRequest, KeelError, NotFound


class IngestError(KeelError):
    code = "ingest_error"


class CollectionNotFound(NotFound):
    code = "collection_not_found"


class SnapshotNotFound(NotFound):
    code = "snapshot_not_found"


class InvalidFilter(InvalidRequest):
    code = "invalid_filter"


class StoreLocked(Conflict):
    """Another process holds the embedded store (the engine allows one writer per folder)."""

    code = "store_locked"


class StoreUnavailable(BackendUnavailable):
    code = "vector_store_unavailable"


class EmbeddingModelError(IngestError):
    code = "embedding_model_error"


class DimensionMismatch(Conflict):
    """The collection was built with another embedding model (different vector size)."""

    code = "embedding_dimension_mismatch"
