"""Idempotent, incremental ingest: files -> documents -> chunks -> embeddings -> store, as a snapshot.

Identity: a document's *version* hashes its content with everything that shapes its chunks
(chunker config, embedding model, sparse encoder); a chunk's point id hashes
(doc_id, version, index, chunk hash). Re-running on unchanged input therefore finds every
document already live at its version and writes nothing, and re-running after a crash
re-writes exactly the same point ids instead of duplicating anything.

Crash recovery: the store is the source of truth. A run starts by scanning it; any
document left with hidden versions (the marks of an interrupted replace) is repaired
before new work starts, so a kill -9 at any moment followed by a re-run converges to
the same chunks as one uninterrupted run.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Tracer

from ingest.chunking import Chunk, Chunker, Tokenizer
from ingest.documents import Document, LoadReport, discover, iter_load
from ingest.embedding import Embedder, SparseEncoder
from ingest.manifest import FileEntry, SnapshotStore
from ingest.settings import ChunkerConfig, LoaderConfig
from ingest.store.base import ChunkPoint, VectorStore

log = logging.getLogger("keel.ingest")

Action = Literal["added", "updated", "unchanged", "deleted", "rejected"]


@dataclass
class Progress:
    """Passed to the progress callback after every file and every embedded batch."""

    files_total: int = 0
    files_done: int = 0
    chunks_written: int = 0
    current: str = ""


@dataclass
class IngestResult:
    snapshot_id: str
    collection: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    deleted: list[str] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    repaired: int = 0
    chunks_written: int = 0
    chunks_reused: int = 0  # written with the dense vector of the document's previous version (text unchanged)
    chunks_total: int = 0
    documents_total: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int | float]:
        return {"added": len(self.added), "updated": len(self.updated), "unchanged": self.unchanged,
                "deleted": len(self.deleted), "rejected": len(self.rejections), "repaired": self.repaired,
                "chunks_written": self.chunks_written, "chunks_reused": self.chunks_reused,
                "chunks_total": self.chunks_total,
                "documents_total": self.documents_total, "seconds": round(self.seconds, 3),
                "embed_seconds": round(self.embed_seconds, 3)}


def embed_hash(model_id: str, text: str) -> str:
    """Identifies a dense vector: the model and the exact text it embedded (title and headings included)."""
    return hashlib.sha256(f"{model_id}\x00{text}".encode()).hexdigest()[:32]


def _named(doc: Document, path: str, name: str) -> Document:
    """``doc`` as loaded from ``path``, recorded under ``name`` (``path#record`` becomes ``name#record``)."""
    suffix = doc.doc_id[len(path):] if doc.doc_id.startswith(path) else ""
    return doc.model_copy(update={"doc_id": name + suffix, "source": name})


def point_id(doc_id: str, version: str, chunk: Chunk) -> str:
    digest = hashlib.sha256(f"{doc_id}\x00{version}\x00{chunk.index}\x00{chunk.hash}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


class IngestPipeline:
    def __init__(self, *, store: VectorStore, embedder: Embedder, sparse: SparseEncoder, tokenizer: Tokenizer,
                 chunker: ChunkerConfig, snapshots: SnapshotStore, loader: LoaderConfig | None = None,
                 batch_chunks: int = 512) -> None:
        self.store = store
        self.embedder = embedder
        self.sparse = sparse
        self.chunker_config = chunker
        self.chunker = Chunker(chunker, tokenizer)
        self.snapshots = snapshots
        self.loader = loader or LoaderConfig()
        self.batch_chunks = batch_chunks

    def version_of(self, doc: Document) -> str:
        h = hashlib.sha256()
        for part in (doc.doc_id, doc.content_hash(), self.chunker_config.fingerprint(), self.embedder.model_id,
                     self.sparse.name):
            h.update(part.encode())
            h.update(b"\x00")
        return h.hexdigest()[:32]

    def run(self, paths: Sequence[str | Path], collection: str, *, prune: bool = False,
            progress: Callable[[Progress], None] | None = None,
            names: Mapping[str | Path, str] | None = None, tracer: Tracer | None = None) -> IngestResult:
        """``names`` gives some files a logical name (uploads: the uploaded file's name): their documents,
        citations, rejections and snapshot are recorded under it (``doc_id`` ``name`` or ``name#record``),
        never under the server's path. Other files keep their absolute path as before. ``tracer``: a span for
        finding the files and one per batch written (under the caller's current span: a job's trace)."""
        t0 = time.perf_counter()
        tracer = tracer or trace.NoOpTracer()
        report = LoadReport()
        with tracer.start_as_current_span("keel.ingest.discover") as span:
            files, scopes = discover(paths, report)
            span.set_attributes({"keel.ingest.collection": collection, "keel.ingest.files": len(files),
                                 "keel.ingest.rejected": len(report.rejections)})
        named = {str(Path(k).resolve()): v for k, v in (names or {}).items()}
        self.store.ensure_collection(collection, self.embedder.dim, self.embedder.model_id)
        self.snapshots.mark_interrupted(collection)
        sid = self.snapshots.start(
            collection, embedding_model=self.embedder.model_id, sparse_encoder=self.sparse.name,
            chunker_config=self.chunker_config.model_dump(),
            paths=[named.get(str(Path(p).resolve()), str(p)) for p in paths], prune=prune)
        result = IngestResult(snapshot_id=sid, collection=collection)
        prog = Progress(files_total=len(files))
        try:
            state = self.store.documents(collection)
            if any(not d.clean for d in state.values()):
                result.repaired = self.store.repair(collection)
                state = self.store.documents(collection)
            seen: set[str] = set()
            renamed: set[str] = set()
            pending: list[tuple[Document, str, list[Chunk]]] = []
            n_pending = 0
            for f, docs in iter_load(files, report, self.loader):
                name = named.get(str(f))
                prog.current = name or str(f)
                if name is not None:
                    docs = [_named(doc, str(f), name) for doc in docs]
                    if docs:
                        renamed.add(str(f))
                for doc in docs:
                    seen.add(doc.doc_id)
                    version = self.version_of(doc)
                    prior = state.get(doc.doc_id)
                    if prior is not None and prior.clean and prior.live == version:
                        result.unchanged += 1
                        continue
                    chunks = self.chunker.chunk(doc)
                    pending.append((doc, version, chunks))
                    n_pending += len(chunks)
                    if n_pending >= self.batch_chunks:
                        self._flush(collection, sid, pending, state, result, prog, progress, tracer)
                        pending, n_pending = [], 0
                prog.files_done += 1
                if progress:
                    progress(prog)
            if pending:
                self._flush(collection, sid, pending, state, result, prog, progress, tracer)
            # Uploads were once recorded under their server path: the named version replaces that one.
            for doc_id, d in state.items():
                if d.source in renamed and doc_id not in seen:
                    self.store.delete_document(collection, doc_id)
                    result.deleted.append(doc_id)
            if prune:
                rejected = report.rejected_sources
                for doc_id, d in state.items():
                    if doc_id in seen or d.source in rejected:
                        continue
                    if any(s.contains(d.source) for s in scopes):
                        self.store.delete_document(collection, doc_id)
                        result.deleted.append(doc_id)
            for r in report.rejections:
                r.source = named.get(r.source, r.source)
            result.rejections = [r.model_dump() for r in report.rejections]
            final = self.store.documents(collection)
            entries = [FileEntry(doc_id=d.doc_id, source=d.source, source_sha256=d.source_sha256,
                                 version=d.live or "", chunks=d.versions.get(d.live or "", 0))
                       for d in final.values()]
            result.documents_total = len(entries)
            result.chunks_total = sum(e.chunks for e in entries)
            result.seconds = time.perf_counter() - t0
            self.snapshots.finish(sid, files=entries, counts=result.counts, rejections=result.rejections)
        except BaseException as e:
            result.seconds = time.perf_counter() - t0
            try:
                self.snapshots.finish(sid, files=[], counts=result.counts,
                                      rejections=[r.model_dump() for r in report.rejections],
                                      error=f"{type(e).__name__}: {e}")
            except Exception:  # keep the original error
                log.exception("could not record the failed snapshot %s", sid)
            raise
        return result

    def _flush(self, collection: str, sid: str, pending: list[tuple[Document, str, list[Chunk]]],
               state: dict, result: IngestResult, prog: Progress,
               progress: Callable[[Progress], None] | None, tracer: Tracer) -> None:
        with tracer.start_as_current_span("keel.ingest.batch") as span:
            self._write_batch(collection, sid, pending, state, result, prog, span)
        self.snapshots.beat(sid)
        if progress:
            progress(prog)

    def _write_batch(self, collection: str, sid: str, pending: list[tuple[Document, str, list[Chunk]]],
                     state: dict, result: IngestResult, prog: Progress, span: Any) -> None:
        texts = [c.embed_text for _, _, chunks in pending for c in chunks]
        model = self.embedder.model_id
        hashes = [embed_hash(model, t) for t in texts]
        # A changed document keeps most of its chunks: their vectors come from its live version
        known: dict[str, np.ndarray] = {}
        for doc, _, _ in pending:
            prior = state.get(doc.doc_id)
            if prior is not None and prior.live:
                known.update(self.store.dense_vectors(collection, doc.doc_id, prior.live))
        todo = [i for i, h in enumerate(hashes) if h not in known]
        t = time.perf_counter()
        fresh = self.embedder.embed_documents([texts[i] for i in todo]) if todo else None
        result.embed_seconds += time.perf_counter() - t
        dense: list[np.ndarray] = [known.get(h) for h in hashes]  # type: ignore[misc]
        for j, i in enumerate(todo):
            dense[i] = fresh[j]
        result.chunks_reused += len(texts) - len(todo)
        sparse = self.sparse.encode_documents(texts)
        i = 0
        for doc, version, chunks in pending:
            points = []
            for c in chunks:
                payload = self._payload(doc, version, c, sid)
                payload["embed_hash"] = hashes[i]
                points.append(ChunkPoint(point_id(doc.doc_id, version, c), dense[i], sparse[i], payload))
                i += 1
            self.store.replace_document(collection, doc.doc_id, version, points)
            (result.updated if doc.doc_id in state else result.added).append(doc.doc_id)
            result.chunks_written += len(points)
            prog.chunks_written += len(points)
        span.set_attributes({"keel.ingest.documents": len(pending), "keel.ingest.chunks": len(texts),
                             "keel.ingest.embedded": len(todo), "keel.ingest.reused": len(texts) - len(todo)})

    @staticmethod
    def _payload(doc: Document, version: str, c: Chunk, sid: str) -> dict[str, Any]:
        return {
            **doc.metadata,
            "doc_id": doc.doc_id, "doc_version": version, "source": doc.source, "source_sha256": doc.source_sha256,
            "doc_kind": doc.kind, "title": doc.title, "text": c.text, "heading_path": list(c.heading_path),
            "heading": " > ".join(c.heading_path), "page": c.page, "page_end": c.page_end,
            "char_start": c.char_start, "char_end": c.char_end, "chunk_index": c.index, "chunk_hash": c.hash,
            "n_tokens": c.n_tokens, "snapshot_id": sid,
        }
