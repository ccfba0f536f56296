"""Keel ingest and RAG: loaders, chunking, embeddings, Qdrant stores, incremental ingest, retrieval.

Importing this package is cheap; heavy libraries load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingest.factory import RagServices


def build_rag(settings: Any, **kwargs: Any) -> RagServices:
    """The long-lived RAG objects (embedder, store, snapshots, pipeline, retriever) for a process."""
    from ingest.factory import build_rag as _build  # lazy: the package stays cheap; the factory pulls numpy, stores

    return _build(settings, **kwargs)


__all__ = ["build_rag"]
