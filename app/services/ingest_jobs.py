"""Ingest runs as durable jobs (kind ``ingest``) on the job queue (:mod:`app.jobs`), one at a time (the embedded
store has a single writer).

A job queued or running when the process stops runs again after the next start: the pipeline is incremental
(unchanged documents are skipped), so a second run of an interrupted job is its resume. Uploaded files are saved
under ``<home>/uploads/<collection>/`` before their job is queued and stay there (a resumed job reads them again;
re-uploading a file replaces its chunks)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from app.core.errors import InvalidRequest
from app.jobs import Job, JobContext, JobRunner, JobState
from ingest.store.base import check_collection_name

if TYPE_CHECKING:
    from ingest.factory import RagServices
    from ingest.pipeline import Progress

log = logging.getLogger("keel.ingest")

KIND = "ingest"
_KEEP_JOBS = 500


@dataclass
class IngestJob:
    """An ingest job as the API shows it (read from the queue: payload, progress and result)."""

    id: str
    collection: str
    paths: list[str]
    prune: bool
    state: JobState = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    files_total: int = 0
    files_done: int = 0
    chunks_written: int = 0
    snapshot_id: str | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, str] | None = None
    attempts: int = 0
    cancel_requested: bool = False
    #: Uploads: saved path -> the uploaded file's name. Clients see the name only, here and in documents
    #: and citations: the server's folders are not theirs to know.
    names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_job(cls, job: Job) -> IngestJob:
        p, progress, result = job.payload, job.progress or {}, job.result or {}
        return cls(id=job.id, collection=p["collection"], paths=list(p["paths"]), prune=bool(p.get("prune")),
                   state=job.state, created_at=job.created_at, started_at=job.started_at,
                   finished_at=job.finished_at, files_total=int(progress.get("files_total", 0)),
                   files_done=int(progress.get("files_done", 0)),
                   chunks_written=int(progress.get("chunks_written", 0)), snapshot_id=result.get("snapshot_id"),
                   counts=dict(result.get("counts") or {}), rejections=list(result.get("rejections") or []),
                   error=job.error, attempts=job.attempts, cancel_requested=job.cancel_requested,
                   names=dict(p.get("names") or {}))

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        names = out.pop("names")
        out["paths"] = [names.get(p, p) for p in self.paths]
        return out


def upload_name(filename: str) -> str:
    name = Path(filename or "").name
    if not name or name.startswith("."):
        raise InvalidRequest(f"unusable file name {filename!r}", param="files")
    return name


class UploadBatch:
    """The files of one upload request, written to part files as they arrive (never held in memory) and
    moved into the collection's folder only once the whole request is in: a refused, broken or abandoned
    upload leaves nothing behind, and a running job never reads half a file."""

    def __init__(self, incoming: Path) -> None:
        self.incoming = incoming
        self.files: list[tuple[str, Path]] = []  # (uploaded name, part file)
        self._fh: BinaryIO | None = None

    def open(self, filename: str) -> None:
        name = upload_name(filename)
        self.close_file()
        self.incoming.mkdir(parents=True, exist_ok=True)
        part = self.incoming / f"{uuid.uuid4().hex}.part"
        self._fh = part.open("wb")
        self.files.append((name, part))

    def write(self, data: bytes) -> None:
        assert self._fh is not None, "open() a file first"
        self._fh.write(data)

    def close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def commit(self, folder: Path) -> dict[str, str]:
        self.close_file()
        saved: dict[str, str] = {}
        for name, part in self.files:
            target = folder / name
            part.replace(target)  # atomic, same file system: uploads/.incoming -> uploads/<collection>
            saved[str(target)] = name
        self.files = []
        return saved

    def discard(self) -> None:
        self.close_file()
        for _, part in self.files:
            part.unlink(missing_ok=True)
        self.files = []


class IngestJobs:
    """Ingest jobs on the job runner: submit, read, wait for and cancel them; the handler runs the pipeline.

    ``owner`` (an API key id) is recorded on every job; reads and cancels given an ``owner`` see that owner's
    jobs only (None: every job, for admins)."""

    def __init__(self, rag: RagServices, uploads_dir: Path, jobs: JobRunner) -> None:
        self.rag = rag
        self.uploads_dir = uploads_dir
        self.jobs = jobs
        # One slot: the embedded vector store has one writer. Not interruptible: the pipeline runs in a thread
        # and stops at its next batch boundary (every document whole), where its progress callback checks.
        jobs.register(KIND, self._run, slots=1)
        # Part files of uploads cut short by a crash (a live request's are written to as it streams).
        for part in (uploads_dir / ".incoming").glob("*.part"):
            with contextlib.suppress(OSError):
                if time.time() - part.stat().st_mtime > 3600:
                    part.unlink()

    def upload_dir(self, collection: str) -> Path:
        # One folder per collection: re-uploading a file replaces its chunks instead of duplicating them.
        return self.uploads_dir / check_collection_name(collection)

    def new_upload(self) -> UploadBatch:
        return UploadBatch(self.uploads_dir / ".incoming")

    def commit_upload(self, batch: UploadBatch, collection: str) -> dict[str, str]:
        """Move a fully received upload into the collection's folder; its saved paths -> uploaded names."""
        folder = self.upload_dir(collection)
        folder.mkdir(parents=True, exist_ok=True)
        return batch.commit(folder)

    async def submit(self, collection: str, paths: list[str], prune: bool = False,
                     names: Mapping[str, str] | None = None, *, owner: str = "",
                     idempotency_key: str | None = None) -> IngestJob:
        """``names``: logical names of uploaded files (their saved path -> the name they were uploaded as)."""
        if not paths:
            raise InvalidRequest("nothing to ingest: give files or paths", param="paths")
        check_collection_name(collection)
        payload = {"collection": collection, "paths": [str(p) for p in paths], "prune": bool(prune),
                   "names": dict(names or {})}
        job = await self.jobs.submit(KIND, payload, owner=owner, idempotency_key=idempotency_key)
        return IngestJob.from_job(job)

    async def get(self, job_id: str, *, owner: str | None = None) -> IngestJob:
        return IngestJob.from_job(await self.jobs.get(job_id, owner=owner, kinds=[KIND]))

    async def list(self, *, owner: str | None = None, limit: int = _KEEP_JOBS) -> list[IngestJob]:
        return [IngestJob.from_job(j) for j in await self.jobs.list(kinds=[KIND], owner=owner, limit=limit)]

    async def wait(self, job_id: str, timeout: float, *, owner: str | None = None) -> IngestJob:
        return IngestJob.from_job(await self.jobs.wait(job_id, timeout, owner=owner, kinds=[KIND]))

    async def cancel(self, job_id: str, *, owner: str | None = None, actor: str = "",
                     request_id: str | None = None) -> IngestJob:
        """A queued job is cancelled at once; a running one stops after its current batch (what it wrote is
        kept, every document whole). Audited: ``actor`` (trail ``jobs``)."""
        return IngestJob.from_job(await self.jobs.cancel(job_id, owner=owner, kinds=[KIND], actor=actor,
                                                         request_id=request_id))

    async def _run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        p = job.payload

        def progress(pr: Progress) -> None:
            ctx.set_progress({"files_total": pr.files_total, "files_done": pr.files_done,
                              "chunks_written": pr.chunks_written})
            ctx.check()  # at a batch boundary: a cancel or the shutdown stops the run here

        ctx.check()
        result = await asyncio.to_thread(self.rag.pipeline.run, p["paths"], p["collection"], prune=bool(p.get("prune")),
                                         progress=progress, names=p.get("names") or {}, tracer=self.jobs.tracer)
        return {"snapshot_id": result.snapshot_id, "counts": result.counts, "rejections": result.rejections}
