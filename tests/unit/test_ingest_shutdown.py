"""Stopping the server during an ingest job: the pipeline thread stops at a batch boundary and is waited for
before the stores close (cancelling the task alone left the thread writing into a closing store); the job goes
back to the durable queue and the next start finishes it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from app.jobs import JobRunner, JobSettings, SqliteJobQueue
from app.services.ingest_jobs import IngestJobs
from app.settings import Settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder


class GatedEmbedder(HashingEmbedder):
    """Embeds one batch, then waits until the test lets it go on: the job is mid-ingest for certain."""

    def __init__(self) -> None:
        super().__init__(64)
        self.batches = 0
        self.first_batch_done = threading.Event()
        self.go_on = threading.Event()

    def embed_documents(self, texts):
        self.batches += 1
        if self.batches == 2:
            self.first_batch_done.set()
            self.go_on.wait(10)
        return super().embed_documents(texts)


def write_docs(folder: Path, n: int) -> None:
    folder.mkdir()
    for i in range(n):
        body = " ".join(f"Document {i} sentence {j} is about topic {i % 5}." for j in range(20))
        (folder / f"doc{i:02d}.md").write_text(f"# Doc {i}\n\n{body}\n")


async def test_shutdown_mid_ingest_stops_at_a_batch_boundary_and_the_next_start_resumes(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, rag={"chunker": {"max_tokens": 40, "overlap_tokens": 8}})
    embedder = GatedEmbedder()
    rag = build_rag(settings, embedder=embedder)
    rag.pipeline.batch_chunks = 4
    write_docs(tmp_path / "docs", 12)
    runner = JobRunner.from_settings(JobSettings(), tmp_path)
    jobs = IngestJobs(rag, tmp_path / "uploads", runner)
    job = await jobs.submit("kb", [str(tmp_path / "docs")])
    queued = await jobs.submit("kb", [str(tmp_path / "docs")])
    assert await asyncio.to_thread(embedder.first_batch_done.wait, 10)

    closing = asyncio.create_task(runner.aclose())
    await asyncio.sleep(0.1)
    embedder.go_on.set()
    await asyncio.wait_for(closing, 30)

    # Both jobs are back in the queue: the running one stopped at a batch boundary (not counted as an attempt),
    # the other never started.
    queue = SqliteJobQueue(tmp_path / "jobs.db")
    stopped, waiting = queue.get(job.id), queue.get(queued.id)
    queue.close()
    assert (stopped.state, stopped.attempts, stopped.claimed_by) == ("queued", 0, None), stopped
    assert stopped.progress["chunks_written"] > 0
    assert (waiting.state, waiting.attempts) == ("queued", 0)
    interrupted = rag.snapshots.list("kb", 1)[0]
    assert interrupted.status == "failed" and "shut down" in (interrupted.error or "")
    # the store is closed only now, after the thread stopped; whatever it kept is whole documents
    docs = rag.store.documents("kb")
    assert docs and all(d.clean and d.live for d in docs.values())
    written = {doc_id: d.versions[d.live] for doc_id, d in docs.items()}
    assert len(written) < 12
    rag.close()

    # The next start resumes the same job: every document, each with all its chunks, none written twice.
    again = build_rag(settings, embedder=HashingEmbedder(64))
    runner = JobRunner.from_settings(JobSettings(), tmp_path)
    jobs = IngestJobs(again, tmp_path / "uploads", runner)
    await runner.start()
    try:
        done = await jobs.wait(job.id, 30)
        assert done.state == "succeeded" and done.attempts == 1, done
        assert done.counts["documents_total"] == 12 and done.counts["unchanged"] == len(written), done.counts
        second = await jobs.wait(queued.id, 30)
        assert second.state == "succeeded" and second.counts["unchanged"] == 12
    finally:
        await runner.aclose()
        again.close()
