"""Stopping the server during an ingest job: the pipeline thread stops at a batch boundary and is waited for
before the stores close (cancelling the task alone left the thread writing into a closing store)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

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


async def test_shutdown_mid_ingest_stops_at_a_batch_boundary_and_keeps_whole_documents(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, rag={"chunker": {"max_tokens": 40, "overlap_tokens": 8}})
    embedder = GatedEmbedder()
    rag = build_rag(settings, embedder=embedder)
    rag.pipeline.batch_chunks = 4
    write_docs(tmp_path / "docs", 12)
    jobs = IngestJobs(rag, tmp_path / "uploads")
    job = jobs.submit("kb", [str(tmp_path / "docs")])
    queued = jobs.submit("kb", [str(tmp_path / "docs")])
    assert await asyncio.to_thread(embedder.first_batch_done.wait, 10)

    closing = asyncio.create_task(jobs.aclose())
    await asyncio.sleep(0.1)
    embedder.go_on.set()
    await asyncio.wait_for(closing, 30)

    assert job.state == "failed" and job.error["code"] == "server_shutting_down", job
    assert "submit the same files again" in job.error["message"]
    assert queued.state == "failed" and queued.error["code"] == "server_shutting_down"
    assert job.chunks_written > 0
    # the store is closed only now, after the thread stopped; whatever it kept is whole documents
    docs = rag.store.documents("kb")
    assert docs and all(d.clean and d.live for d in docs.values())
    written = {doc_id: d.versions[d.live] for doc_id, d in docs.items()}
    rag.close()

    # a re-run finishes the job: every document, each with all its chunks
    again = build_rag(settings, embedder=HashingEmbedder(64))
    result = again.pipeline.run([tmp_path / "docs"], "kb")
    assert result.documents_total == 12 and result.unchanged == len(written)
    again.close()
