"""End to end with the real embedding model and the real engines: ingest a shipped document set, then
check retrieval quality (recall@5 over questions written from those documents) and citations."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from app.core.settings import Settings
from ingest import build_rag
from ingest.embedding import SentenceTransformerEmbedder

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "docs"
RECALL_FLOOR = 0.8


@pytest.fixture(scope="module")
def embedder():
    e = SentenceTransformerEmbedder()
    e.warm_up()
    return e


@pytest.mark.parametrize("kind", ["edge", "qdrant"])
def test_ingest_and_recall_at_5(tmp_path: Path, embedder, kind: str):
    rag = build_rag(Settings(home=tmp_path, rag={"store": kind}), embedder=embedder)
    try:
        result = rag.pipeline.run([DATA / "corpus"], "docs")
        assert result.rejections == [] and len(result.added) == 6 and result.chunks_total >= 6
        again = rag.pipeline.run([DATA / "corpus"], "docs")
        assert again.chunks_written == 0 and again.unchanged == 6

        questions = json.loads((DATA / "questions.json").read_text())
        hits, misses, latencies = 0, [], []
        for item in questions:
            t = time.perf_counter()
            res = rag.retriever.retrieve(item["q"], collection="docs", top_k=5)
            latencies.append(time.perf_counter() - t)
            ok = any(Path(c.citation.source).name == item["source"] and item["phrase"] in c.text
                     for c in res.chunks)
            hits += ok
            if not ok:
                misses.append(item["q"])
            for c in res.chunks:  # every citation points at the exact characters of its source
                if c.citation.source.endswith((".md", ".txt")):
                    assert Path(c.citation.source).read_text()[c.citation.char_start:c.citation.char_end] == c.text
        recall = hits / len(questions)
        print(f"\n[{kind}] recall@5 = {recall:.2f} ({hits}/{len(questions)}), "
              f"p50 query {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms; misses: {misses}")
        assert recall >= RECALL_FLOOR, misses

        html = rag.retriever.retrieve("ETag If-None-Match 304", collection="docs", top_k=1).chunks[0]
        assert html.citation.title == "HTTP caching" and html.citation.heading_path[-1] == "Validation with ETag"
        assert "Privacy policy" not in html.text
    finally:
        rag.close()
