"""Ingest runs as background jobs, one at a time (the embedded store has a single writer)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from app.core.errors import InvalidRequest, KeelError, NotFound, ShuttingDown
from ingest.store.base import check_collection_name

if TYPE_CHECKING:
    from ingest.factory import RagServices
    from ingest.pipeline import Progress

log = logging.getLogger("keel.ingest")

JobState = Literal["queued", "running", "succeeded", "failed"]
_KEEP_JOBS = 500


@dataclass
class IngestJob:
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
    #: Uploads: saved path -> the uploaded file's name. Clients see the name only, here and in documents
    #: and citations: the server's folders are not theirs to know.
    names: dict[str, str] = field(default_factory=dict)

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
    """Jobs live in memory; what they wrote is recorded durably as snapshots by the pipeline, and a
    re-run after a crash resumes idempotently (unchanged documents are skipped)."""

    def __init__(self, rag: RagServices, uploads_dir: Path) -> None:
        self.rag = rag
        self.uploads_dir = uploads_dir
        self._jobs: dict[str, IngestJob] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        # Part files of uploads cut short by a crash (a live request's are written to as it streams).
        for part in (uploads_dir / ".incoming").glob("*.part"):
            with contextlib.suppress(OSError):
                if time.time() - part.stat().st_mtime > 3600:
                    part.unlink()
        # Set at shutdown: a running pipeline stops at its next batch boundary (a point where every document
        # is either in its old or its new version), before the stores close under it.
        self._stopping = threading.Event()

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

    def submit(self, collection: str, paths: list[str], prune: bool = False,
               names: dict[str, str] | None = None) -> IngestJob:
        """``names``: logical names of uploaded files (their saved path -> the name they were uploaded as)."""
        if not paths:
            raise InvalidRequest("nothing to ingest: give files or paths", param="paths")
        job = IngestJob(id=uuid.uuid4().hex[:12], collection=collection, paths=paths, prune=prune,
                        names=names or {})
        self._jobs[job.id] = job
        while len(self._jobs) > _KEEP_JOBS:
            self._jobs.pop(next(iter(self._jobs)))
        task = asyncio.create_task(self._run(job), name=f"ingest-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def get(self, job_id: str) -> IngestJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no ingest job {job_id!r} (jobs are kept in memory since the last restart)",
                           param="job_id")
        return job

    def list(self) -> list[IngestJob]:
        return sorted(self._jobs.values(), key=lambda j: j.created_at, reverse=True)

    async def wait(self, job_id: str, timeout: float | None = None) -> IngestJob:
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(job_id)
        while job.state in ("queued", "running"):
            if deadline is not None and time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        return job

    async def aclose(self, timeout_s: float = 60.0) -> None:
        """Stop running jobs at a safe point and wait for their threads: cancelling the task alone would
        leave the pipeline thread writing into a store that is being closed (a failed flush at Ctrl-C)."""
        self._stopping.set()
        tasks = list(self._tasks)
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout_s)
        for task in late:
            log.error("ingest job %s did not stop within %.0f s; closing the store under it", task.get_name(),
                      timeout_s)
            task.cancel()

    async def _run(self, job: IngestJob) -> None:
        async with self._lock:
            if self._stopping.is_set():
                job.state, job.finished_at = "failed", time.time()
                job.error = {"code": ShuttingDown.code, "message": "the server shut down before this job started"}
                return
            job.state, job.started_at = "running", time.time()

            def progress(p: Progress) -> None:
                job.files_total, job.files_done, job.chunks_written = p.files_total, p.files_done, p.chunks_written
                if self._stopping.is_set():
                    raise ShuttingDown("the server shut down during this ingest; what was written is kept and "
                                       "complete per document: submit the same files again to finish")

            try:
                result = await asyncio.to_thread(
                    self.rag.pipeline.run, job.paths, job.collection, prune=job.prune, progress=progress,
                    names=job.names,
                )
                job.snapshot_id, job.counts, job.rejections = result.snapshot_id, result.counts, result.rejections
                job.state = "succeeded"
            except KeelError as exc:
                job.state, job.error = "failed", {"code": exc.code, "message": exc.message}
            except Exception as exc:  # reported on the job; the server keeps serving
                log.exception("ingest job %s failed", job.id)
                job.state, job.error = "failed", {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
            finally:
                job.finished_at = time.time()

