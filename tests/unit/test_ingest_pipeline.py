"""Incremental ingest, snapshots and retrieval over both stores, with a model-free embedder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.settings import Settings
from ingest import build_rag
from ingest.embedding import Bm25Encoder, HashingEmbedder
from ingest.factory import RagServices
from ingest.pipeline import embed_hash
from ingest.retriever import Retriever
from ingest.settings import ChunkerConfig
from ingest.store.base import Hit, HybridQuery

PARA = "Zebras graze on the savanna grass. They live in herds and migrate with the rains. "


def write_corpus(root: Path) -> None:
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "zebra.md").write_text("# Zebras\n\n## Diet\n\n" + PARA * 6 + "\n\n## Stripes\n\nStripes confuse flies.\n")
    (root / "otter.txt").write_text("Otters hold hands while sleeping so they do not drift apart.\n")
    (root / "sub" / "qdrant.md").write_text("# Qdrant\n\nQdrant fuses dense and sparse results with RRF.\n")


@pytest.fixture(params=["edge", "qdrant"])
def rag(request, tmp_path) -> RagServices:
    settings = Settings(home=tmp_path / "home", rag={"store": request.param,
                                                     "chunker": {"max_tokens": 40, "overlap_tokens": 8}})
    services = build_rag(settings, embedder=HashingEmbedder(64))
    services.warm_up()
    yield services
    services.close()


def test_incremental_runs(rag: RagServices, tmp_path: Path):
    docs = tmp_path / "docs"
    write_corpus(docs)
    first = rag.pipeline.run([docs], "kb")
    assert len(first.added) == 3 and first.chunks_written == first.chunks_total > 3
    assert rag.store.count("kb") == first.chunks_total

    second = rag.pipeline.run([docs], "kb")
    assert second.unchanged == 3 and second.chunks_written == 0 and not second.added and not second.updated
    assert rag.snapshots.diff(first.snapshot_id, second.snapshot_id).unchanged == 3

    (docs / "otter.txt").write_text("Sea otters use rocks as tools to open shellfish.\n")
    third = rag.pipeline.run([docs], "kb")
    assert [Path(d).name for d in third.updated] == ["otter.txt"] and third.unchanged == 2
    d = rag.snapshots.diff(second.snapshot_id, third.snapshot_id)
    assert [Path(x).name for x in d.changed] == ["otter.txt"] and d.added == d.removed == []
    hits = rag.retriever.retrieve("otters sleeping holding hands", collection="kb", top_k=10)
    assert all("sleeping" not in c.text for c in hits.chunks)
    assert any("shellfish" in c.text for c in hits.chunks)
    assert rag.store.count("kb") == third.chunks_total

    (docs / "sub" / "qdrant.md").unlink()
    kept = rag.pipeline.run([docs], "kb")
    assert kept.deleted == [] and kept.documents_total == 3  # without --prune nothing is removed
    pruned = rag.pipeline.run([docs], "kb", prune=True)
    assert [Path(x).name for x in pruned.deleted] == ["qdrant.md"] and pruned.documents_total == 2
    assert [Path(x).name for x in rag.snapshots.diff(kept.snapshot_id, pruned.snapshot_id).removed] == ["qdrant.md"]
    assert rag.store.count("kb", {"doc_id": str((docs / "sub" / "qdrant.md").resolve())}) == 0

    snaps = rag.snapshots.list("kb")
    assert next(s.id for s in snaps) == pruned.snapshot_id and len(snaps) == 5
    assert all(s.status == "completed" and s.chunker_config["max_tokens"] == 40 for s in snaps)
    full = rag.snapshots.get(pruned.snapshot_id)
    assert {Path(f.source).name for f in full.files} == {"zebra.md", "otter.txt"}
    assert all(len(f.source_sha256) == 64 and f.chunks > 0 for f in full.files)
    assert full.embedding_model == "hashing-64"


def test_prune_scope_and_rejected_files_keep_chunks(rag: RagServices, tmp_path: Path):
    docs = tmp_path / "docs"
    write_corpus(docs)
    rag.pipeline.run([docs], "kb")
    # Pruning with a narrower scope only touches documents inside it.
    (docs / "otter.txt").unlink()
    res = rag.pipeline.run([docs / "sub"], "kb", prune=True)
    assert res.deleted == [] and res.documents_total == 3
    # A file that turns bad is reported and keeps its previous chunks, even under --prune.
    (docs / "zebra.md").write_text("   \n")
    res = rag.pipeline.run([docs], "kb", prune=True)
    assert [r["code"] for r in res.rejections] == ["empty"]
    assert [Path(x).name for x in res.deleted] == ["otter.txt"]
    assert rag.store.count("kb", {"doc_id": str((docs / "zebra.md").resolve())}) > 0


class CountingEmbedder(HashingEmbedder):
    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.embedded: list[str] = []

    def embed_documents(self, texts):
        self.embedded += list(texts)
        return super().embed_documents(texts)


def test_a_changed_document_reembeds_only_its_changed_chunks(tmp_path: Path):
    for store in ("edge", "qdrant"):
        embedder = CountingEmbedder(64)
        rag = build_rag(Settings(home=tmp_path / store, rag={"store": store, "chunker": {
            "max_tokens": 40, "overlap_tokens": 0}}), embedder=embedder)
        rag.warm_up()
        try:
            docs = tmp_path / f"docs-{store}"
            docs.mkdir()
            sections = [f"## Part {i}\n\nSection {i} is about topic number {i} and nothing else at all."
                        for i in range(8)]
            (docs / "long.md").write_text("# Long\n\n" + "\n\n".join(sections) + "\n")
            first = rag.pipeline.run([docs], "kb")
            assert first.chunks_reused == 0 and len(embedder.embedded) == first.chunks_written >= 4
            texts = list(embedder.embedded)
            embedder.embedded.clear()
            sections[3] = "## Part 3\n\nSection 3 was rewritten: it now covers an entirely different subject."
            (docs / "long.md").write_text("# Long\n\n" + "\n\n".join(sections) + "\n")
            second = rag.pipeline.run([docs], "kb")
            assert len(second.updated) == 1 and second.chunks_written == second.chunks_total
            assert len(embedder.embedded) == 1 and "rewritten" in embedder.embedded[0]  # its one chunk, only
            assert second.chunks_reused == second.chunks_written - 1 >= 3
            changed = list(embedder.embedded)
            hits = rag.retriever.retrieve("entirely different subject", collection="kb", top_k=3)
            assert "rewritten" in hits.chunks[0].text
            # the live version's vectors are exactly those a full re-embed of its texts would give
            doc_id = str((docs / "long.md").resolve())
            vectors = rag.store.dense_vectors("kb", doc_id, rag.store.documents("kb")[doc_id].live)
            live = [t for t in texts if "Section 3 is about" not in t] + changed
            expected = {embed_hash(embedder.model_id, t): v
                        for t, v in zip(live, HashingEmbedder(64).embed_documents(live), strict=True)}
            assert vectors.keys() == expected.keys()
            assert all(np.allclose(vectors[h], expected[h], atol=1e-6) for h in expected)
        finally:
            rag.close()


def test_chunker_change_reembeds_everything(rag: RagServices, tmp_path: Path):
    docs = tmp_path / "docs"
    write_corpus(docs)
    rag.pipeline.run([docs], "kb")
    rag.pipeline.chunker.config = rag.pipeline.chunker_config = ChunkerConfig(max_tokens=64, overlap_tokens=0)
    res = rag.pipeline.run([docs], "kb")
    assert len(res.updated) == 3 and res.unchanged == 0


def test_citations(rag: RagServices, tmp_path: Path):
    docs = tmp_path / "docs"
    write_corpus(docs)
    run = rag.pipeline.run([docs], "kb")
    res = rag.retriever.retrieve("stripes confuse flies", collection="kb", top_k=3)
    top = res.chunks[0]
    c = top.citation
    assert top.text == "Stripes confuse flies."
    assert c.heading_path == ["Zebras", "Stripes"] and c.title == "Zebras"
    source_text = Path(c.source).read_text()
    assert source_text[c.char_start:c.char_end] == top.text  # offsets point at the exact passage
    assert c.snapshot_id == run.snapshot_id and c.chunk_id and top.score > 0
    assert c.label() == "Zebras > Stripes"
    filtered = rag.retriever.retrieve("zebra", collection="kb", filters={"doc_kind": "text"})
    assert {Path(x.citation.source).name for x in filtered.chunks} == {"otter.txt"}


def test_deterministic_point_ids(tmp_path: Path):
    docs = tmp_path / "docs"
    write_corpus(docs)
    ids = []
    for n in range(2):
        s = build_rag(Settings(home=tmp_path / f"h{n}"), embedder=HashingEmbedder(32))
        s.pipeline.run([docs], "kb")
        res = s.retriever.retrieve("zebras savanna", collection="kb", top_k=20)
        ids.append(sorted(c.citation.chunk_id for c in res.chunks))
        s.close()
    assert ids[0] == ids[1] and ids[0]


@pytest.mark.parametrize("store", ["edge", "qdrant"])
def test_group_by_document_on_both_engines(store: str, tmp_path: Path):
    """``top_k`` counts chunks; ``group_by="document"`` counts documents: one chunk per document, and still
    ``top_k`` of them when a long document fills the first candidates."""
    rag = build_rag(Settings(home=tmp_path / "home", rag={
        "store": store, "chunker": {"max_tokens": 40, "overlap_tokens": 0}}), embedder=HashingEmbedder(64))
    rag.warm_up()
    try:
        docs = tmp_path / "docs"
        docs.mkdir()
        (docs / "zebras.md").write_text("# Zebras\n\n" + "\n\n".join(
            f"## Herd {i}\n\nZebra herd {i} grazes savanna grass; zebras migrate with the rains." for i in range(30)))
        (docs / "lions.txt").write_text("Lions hunt zebras on the savanna grass when the rains come.\n")
        (docs / "giraffes.txt").write_text("Giraffes browse acacia trees on the savanna.\n")
        (docs / "hippos.txt").write_text("Hippos spend the day in rivers and lakes.\n")
        rag.pipeline.run([docs], "kb")
        query = "zebras savanna grass migrate rains"
        chunks = rag.retriever.retrieve(query, collection="kb", top_k=4).chunks
        assert {Path(c.citation.source).name for c in chunks} == {"zebras.md"}  # the issue: one document, 4 times

        grouped = rag.retriever.retrieve(query, collection="kb", top_k=4, group_by="document").chunks
        assert [Path(c.citation.source).name for c in grouped][:2] == ["zebras.md", "lions.txt"]
        assert len({c.citation.doc_id for c in grouped}) == len(grouped) == 4
        assert [c.score for c in grouped] == sorted((c.score for c in grouped), reverse=True)
        assert len(rag.retriever.retrieve(query, collection="kb", top_k=10, group_by="document").chunks) == 4
    finally:
        rag.close()


class RankedStore:
    """A store that returns a fixed fused ranking: what ``group_by`` does to it is exact."""

    def __init__(self, docs: list[str]) -> None:
        self.hits = [Hit(f"c{i}", 1.0 - i / 1000, {"doc_id": d, "text": f"chunk {i} of {d}"})
                     for i, d in enumerate(docs)]
        self.asked: list[int] = []

    def query(self, collection: str, q: HybridQuery) -> list[Hit]:
        self.asked.append(q.top_k)
        assert q.prefetch_limit >= q.top_k
        return self.hits[: q.top_k]


def test_group_by_document_keeps_each_documents_best_chunk_and_over_fetches():
    # 50 chunks of A first, then B, A, C, B, D: top 3 documents are A, B, C with chunks c0, c50, c52.
    store = RankedStore(["A"] * 50 + ["B", "A", "C", "B", "D"])
    r = Retriever(store=store, embedder=HashingEmbedder(16), sparse=Bm25Encoder())
    res = r.retrieve("q", top_k=3, group_by="document")
    assert [(c.citation.doc_id, c.citation.chunk_id) for c in res.chunks] == [("A", "c0"), ("B", "c50"),
                                                                           ("C", "c52")]
    # starts from the candidates each leg fetches anyway (prefetch_limit 50), not from 4x top_k: a small k
    # needed more rounds than a large one; again 4x while one document fills the candidates
    assert store.asked == [50, 200]
    store.asked.clear()
    assert len(r.retrieve("q", top_k=10, group_by="document").chunks) == 4  # only 4 documents exist
    assert store.asked == [50, 200]  # stops once the candidates run out
    store.asked.clear()
    r.retrieve("q", top_k=20, group_by="document")
    assert store.asked[0] == 80  # 4x top_k once that is more than prefetch_limit
    store.asked.clear()
    assert [c.citation.chunk_id for c in r.retrieve("q", top_k=3).chunks] == ["c0", "c1", "c2"]
    assert store.asked == [3]  # without group_by: chunks, as before


def test_named_files_are_recorded_under_their_name_and_replace_their_server_path_version(
        rag: RagServices, tmp_path: Path):
    uploads = tmp_path / "uploads" / "kb"
    uploads.mkdir(parents=True)
    (uploads / "faq.jsonl").write_text('{"id": "q1", "text": "Otters hold hands."}\n{"text": "Zebras graze."}\n')
    (uploads / "otter.txt").write_text("Otters sleep afloat.\n")
    path = str((uploads / "faq.jsonl").resolve())
    old = rag.pipeline.run([uploads / "faq.jsonl"], "kb")  # before uploads had names: the server path
    assert sorted(old.added) == [f"{path}#2", f"{path}#q1"]

    names = {uploads / "faq.jsonl": "faq.jsonl", str(uploads / "otter.txt"): "otter.txt"}
    res = rag.pipeline.run([uploads / "faq.jsonl", uploads / "otter.txt"], "kb", names=names)
    assert sorted(res.added) == ["faq.jsonl#2", "faq.jsonl#q1", "otter.txt"]
    assert sorted(res.deleted) == sorted(old.added) and res.documents_total == 3  # replaced, not duplicated
    assert {d.source for d in rag.store.documents("kb").values()} == {"faq.jsonl", "otter.txt"}
    snap = rag.snapshots.get(res.snapshot_id)
    assert str(tmp_path) not in snap.model_dump_json()
    again = rag.pipeline.run([uploads / "faq.jsonl", uploads / "otter.txt"], "kb", names=names)
    assert again.unchanged == 3 and not again.added and not again.deleted

    (uploads / "otter.txt").write_text("   ")  # a bad upload is reported by its name, and keeps its chunks
    bad = rag.pipeline.run([uploads / "otter.txt"], "kb", names=names)
    assert [(r["source"], r["code"]) for r in bad.rejections] == [("otter.txt", "empty")]
    assert bad.documents_total == 3 and not bad.deleted
