"""Contract suite every VectorStore implementation must pass (edge engine and qdrant-client: in memory, local
mode, and a Qdrant server where ``KEEL_TEST_QDRANT_URL`` names one, see tests/qdrant.py)."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from app.core.errors import InvalidRequest
from ingest.embedding import Bm25Encoder, HashingEmbedder
from ingest.errors import CollectionNotFound, DimensionMismatch, InvalidFilter
from ingest.store.base import ChunkPoint, HybridQuery, Range, VectorStore
from ingest.store.edge import EdgeStore
from ingest.store.qdrant import QdrantClientStore
from tests.qdrant import QDRANT_URL

EMB = HashingEmbedder(64)
BM25 = Bm25Encoder()


def _make(kind: str, tmp_path: Path, **kw) -> VectorStore:
    if kind == "edge":
        return EdgeStore(tmp_path / "edge", **kw)
    if kind == "qdrant-memory":
        return QdrantClientStore(path=":memory:", **kw)
    if kind == "qdrant-server":
        return QdrantClientStore(url=QDRANT_URL, **kw)
    return QdrantClientStore(path=tmp_path / "qlocal", **kw)


SERVER = ["qdrant-server"] if QDRANT_URL else []
SUITE_COLLECTIONS = {"docs", "kb"}


def _fresh(kind: str, tmp_path: Path) -> VectorStore:
    """A store without the suite's collections: on a server they survive the test before, so they are dropped
    first (only those: anything else on the server is left alone)."""
    s = _make(kind, tmp_path)
    if kind == "qdrant-server":
        s.warm_up()  # an unreachable server fails here, with the store's own error
        for name in set(s.list_collections()) & SUITE_COLLECTIONS:
            s.drop_collection(name)
    return s


@pytest.fixture(params=["edge", "qdrant-memory", "qdrant-path", *SERVER])
def store(request, tmp_path):
    s = _fresh(request.param, tmp_path)
    s.warm_up()
    s.ensure_collection("docs", EMB.dim, EMB.model_id)
    yield s
    s.close()


def points(doc_id: str, version: str, texts: list[str], **meta) -> list[ChunkPoint]:
    dense = EMB.embed_documents(texts)
    sparse = BM25.encode_documents(texts)
    out = []
    for i, t in enumerate(texts):
        payload = {"doc_id": doc_id, "doc_version": version, "source": f"/src/{doc_id}", "title": doc_id,
                   "text": t, "chunk_index": i, "page": i + 1, **meta}
        out.append(ChunkPoint(str(uuid.uuid5(uuid.NAMESPACE_URL, f"{doc_id}|{version}|{i}")), dense[i],
                              sparse[i], payload))
    return out


def q(text: str, **kw) -> HybridQuery:
    return HybridQuery(dense=EMB.embed_query(text), sparse=BM25.encode_query(text), **kw)


def seed(store: VectorStore) -> None:
    store.replace_document("docs", "a", "a1", points("a", "a1", [
        "Qdrant stores vectors with payload filters", "The zebra crossing is striped", "Apples are red fruit"],
        lang="en", tag="db"))
    store.replace_document("docs", "b", "b1", points("b", "b1", [
        "Pandas eat bamboo in the mountains", "Kubernetes schedules containers on nodes"], lang="de", tag="ops"))


def test_collections(store: VectorStore):
    assert store.has_collection("docs")
    assert "docs" in store.list_collections()
    store.ensure_collection("docs", EMB.dim, EMB.model_id)  # idempotent
    with pytest.raises(DimensionMismatch):
        store.ensure_collection("docs", 32, EMB.model_id)
    with pytest.raises(DimensionMismatch):
        store.ensure_collection("docs", EMB.dim, "another-model")
    with pytest.raises(InvalidRequest):
        store.ensure_collection("../evil", 8, "m")
    with pytest.raises(CollectionNotFound):
        store.query("nope", q("x"))
    info = store.collection_info("docs")
    assert info["dim"] == EMB.dim and info["chunks"] == 0


def test_upsert_count_query(store: VectorStore):
    seed(store)
    assert store.count("docs") == 5
    hits = store.query("docs", q("zebra crossing striped", top_k=3))
    assert hits[0].payload["text"] == "The zebra crossing is striped"
    assert len(hits) == 3
    assert all(h.score > 0 for h in hits)
    assert hits == sorted(hits, key=lambda h: -h.score)


def test_sparse_branch_finds_rare_keyword(store: VectorStore):
    seed(store)
    hits = store.query("docs", q("kubernetes", top_k=1))
    assert hits[0].payload["text"].startswith("Kubernetes")


def test_fusion_weights_scale_each_leg(store: VectorStore):
    seed(store)
    base = store.query("docs", q("kubernetes", top_k=5))
    assert [h.id for h in store.query("docs", q("kubernetes", top_k=5, weights=(2.0, 2.0)))] == [h.id for h in base]
    # Qdrant's weighted RRF: a leg adds 1/(k - 1 + rank/w) (rank from 1), so w = 0 drops the leg
    dense_only = store.query("docs", q("kubernetes", top_k=5, weights=(1.0, 0.0), rrf_k=60))
    assert [round(h.score, 6) for h in dense_only] == [round(1 / (59 + r), 6) for r in range(1, 6)]
    heavy = store.query("docs", q("kubernetes", top_k=5, weights=(3.0, 1.0), rrf_k=60))
    assert heavy[0].score == pytest.approx(1 / (59 + 1 / 3) + 1 / 60, rel=1e-5)


def test_filters(store: VectorStore):
    seed(store)
    assert store.count("docs", {"lang": "de"}) == 2
    assert store.count("docs", {"tag": ["db", "ops"]}) == 5
    assert store.count("docs", {"page": Range(gte=2)}) == 3
    assert store.count("docs", {"page": {"lte": 1}}) == 2
    hits = store.query("docs", q("zebra crossing striped", top_k=5, filters={"lang": "de"}))
    assert hits and all(h.payload["lang"] == "de" for h in hits)
    hits = store.query("docs", q("apples", top_k=5, filters={"doc_id": "a", "page": Range(gte=3)}))
    assert [h.payload["text"] for h in hits] == ["Apples are red fruit"]
    for bad in ({"page": {"bogus": 1}}, {"tag": []}, {"tag": [1, "a"]}, {"kind": "control"}, {"x": 1.5}):
        with pytest.raises(InvalidFilter):
            store.query("docs", q("x", filters=bad))


def test_score_threshold_applies_after_fusion(store: VectorStore):
    seed(store)
    all_hits = store.query("docs", q("zebra crossing striped", top_k=5))
    top = all_hits[0].score
    # RRF scores: 1/(k+rank) summed over branches; only a doc first in both branches reaches `top`.
    kept = store.query("docs", q("zebra crossing striped", top_k=5, score_threshold=top))
    assert [h.id for h in kept] == [all_hits[0].id]
    assert store.query("docs", q("zebra", top_k=5, score_threshold=1.0)) == []


def test_mmr_prefers_diversity(store: VectorStore):
    texts = ["solar panels make electricity from sunlight"] * 3 + ["wind turbines make electricity from wind"]
    store.replace_document("docs", "d", "d1", points("d", "d1", texts))
    plain = store.query("docs", q("electricity from sunlight solar", top_k=2))
    assert {h.payload["text"] for h in plain} == {texts[0]}
    diverse = store.query("docs", q("electricity from sunlight solar", top_k=2, mmr=True, mmr_lambda=0.5))
    assert {h.payload["text"] for h in diverse} == {texts[0], texts[3]}


def test_replace_swaps_versions(store: VectorStore):
    seed(store)
    store.replace_document("docs", "a", "a2", points("a", "a2", ["Completely new text about giraffes"]))
    assert store.count("docs") == 3
    assert store.count("docs", {"doc_id": "a"}) == 1
    docs = store.documents("docs")
    assert docs["a"].versions == {"a2": 1} and docs["a"].live == "a2" and docs["a"].clean
    hits = store.query("docs", q("zebra crossing striped", top_k=5, filters={"doc_id": "a"}))
    assert [h.payload["doc_version"] for h in hits] == ["a2"]
    # Replacing with the live version again is a no-op, not a flicker.
    store.replace_document("docs", "a", "a2", points("a", "a2", ["Completely new text about giraffes"]))
    assert store.count("docs", {"doc_id": "a"}) == 1


def test_delete_document(store: VectorStore):
    seed(store)
    store.delete_document("docs", "a")
    store.delete_document("docs", "missing")  # no error
    assert store.count("docs") == 2
    assert set(store.documents("docs")) == {"b"}


def test_partial_version_is_invisible_and_repaired(store: VectorStore):
    """What a crash leaves behind: a hidden, half-written version and a hidden new document."""
    seed(store)
    s = store  # the primitives are part of the shared base, used here to stage a crash
    s._set_hidden("docs", s._hidden_set("docs") | {"a2", "c1"})
    s._upsert("docs", points("a", "a2", ["half written zebra"]))
    s._upsert("docs", points("c", "c1", ["orphan zebra"]))
    assert store.count("docs") == 5
    hits = store.query("docs", q("zebra", top_k=10))
    assert {h.payload["doc_version"] for h in hits} <= {"a1", "b1"}
    docs = store.documents("docs")
    assert docs["a"].live == "a1" and not docs["a"].clean and docs["c"].live is None
    assert store.repair("docs") == 2
    docs = store.documents("docs")
    assert set(docs) == {"a", "b"} and all(d.clean for d in docs.values())
    assert store.collection_info("docs")["hidden_versions"] == 0
    # Re-running the interrupted replace completes it with the same ids.
    store.replace_document("docs", "a", "a2", points("a", "a2", ["half written zebra", "second chunk"]))
    assert store.count("docs", {"doc_id": "a"}) == 2


def test_queries_never_see_both_or_neither(store: VectorStore):
    texts = [f"chunk {i} of the replaced document about otters" for i in range(6)]
    store.replace_document("docs", "r", "v0", points("r", "v0", texts))
    stop = threading.Event()
    bad: list[str] = []
    seen: set[str] = set()

    def reader() -> None:
        while not stop.is_set():
            try:
                hits = store.query("docs", q("otters replaced document", top_k=20, filters={"doc_id": "r"}))
            except Exception as e:
                bad.append(repr(e))
                return
            versions = {h.payload["doc_version"] for h in hits}
            if len(versions) != 1 or len(hits) != 6:
                bad.append(f"{len(hits)} hits, versions {sorted(versions)}")
            seen.update(versions)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for n in range(1, 15):
            store.replace_document("docs", "r", f"v{n}", points("r", f"v{n}", texts))
            time.sleep(0.002)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not bad, bad[:5]
    assert len(seen) > 1
    assert store.count("docs") == 6


def test_dense_vectors_of_a_version_by_embed_hash(store: VectorStore):
    texts = ["first chunk text", "second chunk text", "third, written before embed hashes"]
    pts = points("a", "a1", texts)
    for p, h in zip(pts[:2], ("h1", "h2"), strict=False):
        p.payload["embed_hash"] = h
    store.replace_document("docs", "a", "a1", pts)
    store.replace_document("docs", "b", "b1", points("b", "b1", ["another document"], embed_hash="hb"))
    got = store.dense_vectors("docs", "a", "a1")
    assert set(got) == {"h1", "h2"}  # the chunk without a hash is left out; other documents too
    assert all(abs(float(got[h] @ EMB.embed_documents([t])[0]) - 1.0) < 1e-5
               for h, t in (("h1", texts[0]), ("h2", texts[1])))
    assert store.dense_vectors("docs", "a", "other-version") == {}


def test_control_point_is_not_a_chunk(store: VectorStore):
    assert store.count("docs") == 0
    assert store.documents("docs") == {}
    assert store.query("docs", q("anything")) == []


def test_drop_collection(store: VectorStore):
    seed(store)
    store.drop_collection("docs")
    assert not store.has_collection("docs")
    store.ensure_collection("docs", EMB.dim, EMB.model_id)
    assert store.count("docs") == 0


@pytest.mark.parametrize("kind", ["edge", "qdrant-path", *SERVER])
def test_persists_across_reopen(kind, tmp_path):
    s = _fresh(kind, tmp_path)
    s.ensure_collection("docs", EMB.dim, EMB.model_id)
    seed(s)
    s._set_hidden("docs", s._hidden_set("docs") | {"zz"})
    s.close()
    s2 = _make(kind, tmp_path)
    try:
        assert s2.count("docs") == 5
        assert s2.collection_info("docs")["hidden_versions"] == 1
        # a server may hold collections of others: the suite's own are what it checks there
        assert [c for c in s2.list_collections() if kind != "qdrant-server" or c in SUITE_COLLECTIONS] == ["docs"]
    finally:
        s2.close()


@pytest.mark.parametrize("kind", ["edge", "qdrant-path", *SERVER])
def test_payload_indexes_are_configurable_and_added_to_existing_collections(kind, tmp_path, caplog):
    s = _fresh(kind, tmp_path)
    s.ensure_collection("docs", EMB.dim, EMB.model_id)
    seed(s)
    assert "tag" not in s.collection_info("docs")["payload_indexes"]
    # A query that ranks the two "ops" chunks unambiguously: "bamboo containers" matched one word of each,
    # their fused scores could tie, and the order of tied hits is the engine's (it flipped run to run).
    query = "containers on nodes, or bamboo"
    with caplog.at_level("WARNING", logger="keel.rag"):
        before = [h.payload["text"] for h in s.query("docs", q(query, filters={"tag": "ops"}))]
        s.query("docs", q("zebra", filters={"tag": "db"}))
    assert [r.getMessage() for r in caplog.records].count(
        next(r.getMessage() for r in caplog.records if "'tag'" in r.getMessage())) == 1  # warned once, naming it
    s.close()
    caplog.clear()

    s = _make(kind, tmp_path, keyword_indexes=["tag"])
    s.ensure_collection("docs", EMB.dim, EMB.model_id)  # indexes the existing points in place
    info = s.collection_info("docs")
    assert "tag" in info["payload_indexes"] and "source" in info["payload_indexes"] and info["chunks"] == 5
    with caplog.at_level("WARNING", logger="keel.rag"):
        after = [h.payload["text"] for h in s.query("docs", q(query, filters={"tag": "ops"}))]
    assert after == before and sorted(after) == ["Kubernetes schedules containers on nodes",
                                                 "Pandas eat bamboo in the mountains"]
    assert not [r for r in caplog.records if "payload index" in r.getMessage()]
    if kind == "edge":
        assert "tag" in s._shard("docs").info().payload_schema
    s.close()


def test_edge_close_survives_a_failing_flush(tmp_path, caplog) -> None:
    """Ctrl-C after an ingest once ended in a flush error that skipped every other shard's close: each shard
    is retried, reported with what it means for the data, and closed whatever happened to the others."""
    from ingest.store.edge import EdgeStore

    class Shard:
        def __init__(self, fail: int) -> None:
            self.fail, self.flushes, self.closed = fail, 0, False

        def flush(self) -> None:
            self.flushes += 1
            if self.flushes <= self.fail:
                raise RuntimeError("tracker_journal.dat is shorter than expected")

        def close(self) -> None:
            self.closed = True

    store = EdgeStore(tmp_path)
    flaky, broken, fine = Shard(fail=1), Shard(fail=99), Shard(fail=0)
    store._shards.update({"flaky": flaky, "broken": broken, "fine": fine})
    store.close()
    assert (flaky.flushes, broken.flushes, fine.flushes) == (2, 3, 1)
    assert flaky.closed and broken.closed and fine.closed and not store._shards
    assert "'broken'" in caplog.text and "write-ahead log" in caplog.text and "'flaky'" not in caplog.text


def test_edge_a_second_process_is_refused_without_touching_the_holders_files(tmp_path) -> None:
    """A second process that only tried to open a collection another one held used to rewrite the holder's
    payload-index journals: the holder's next flush (its shutdown) failed. Now it is refused before the
    engine opens anything, and the holder flushes cleanly."""
    import subprocess
    import sys

    from ingest.store.edge import EdgeStore

    holder = EdgeStore(tmp_path)
    holder.ensure_collection("kb", 8, "m")
    probe = ("from ingest.store.edge import EdgeStore\n"
             "from ingest.errors import StoreLocked\n"
             f"s = EdgeStore({str(tmp_path)!r})\n"
             "try:\n    s.warm_up()\nexcept StoreLocked:\n    print('locked')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "locked", out.stderr[-2000:]
    for shard in holder._shards.values():
        shard.flush()  # raised "tracker_journal.dat is shorter than expected" before
    holder.close()
    reopened = EdgeStore(tmp_path)
    reopened.warm_up()  # released at close: this process may open it now
    reopened.close()
