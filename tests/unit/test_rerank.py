"""Second-stage reranking, per-collection retrieval settings, the retrieval breakdown, and the ranking metrics
and public FAQ sets of bench/retrieval_quality.py."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from app.settings import Settings
from evals.retrieval import Entry, QuestionSet, _docbook_entries, _sphinx_entries, ndcg_at, rank_of, summarize
from ingest import build_rag
from ingest.embedding import HashingEmbedder, SentenceTransformerEmbedder
from ingest.errors import EmbeddingModelError
from ingest.rerank import CrossEncoderReranker, LateInteractionReranker, Rerankers, maxsim
from ingest.settings import RagSettings, RerankConfig

DOCS = {
    "lighthouse.md": "# Lighthouses\n\nThe Eddystone lighthouse stands on rocks south of Plymouth.\n",
    "bees.md": "# Bees\n\nHoney bees make honey from flower nectar and store it in wax combs.\n",
    "tides.md": "# Tides\n\nThe tide at Plymouth rises twice a day; the lighthouse keepers logged it.\n",
}


class Reverse:
    """Scores passages in reverse of the order it gets them: the reranked order must follow the scores."""

    name = "reverse"
    seen: list[list[str]]

    def __init__(self) -> None:
        self.seen = []

    def warm_up(self) -> None:
        return None

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        self.seen.append(list(passages))
        return np.arange(len(passages), dtype=np.float32)


class FixedRerankers(Rerankers):
    def __init__(self, reranker) -> None:
        super().__init__(lambda: None)
        self.reranker = reranker

    def get(self, config: RerankConfig):
        return self.reranker if config.kind != "none" else None


def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir(parents=True)
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


def test_maxsim_is_the_mean_of_each_query_tokens_best_match():
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    p = np.array([[1.0, 0.0], [0.6, 0.8]])
    assert maxsim(q, p) == pytest.approx((1.0 + 0.8) / 2)
    assert maxsim(q, np.zeros((0, 2))) == 0.0


def test_settings_merge_a_collections_retrieval_over_the_defaults():
    rag = RagSettings(retrieval={"top_k": 7}, collections={"faq": {"rerank": {"kind": "late_interaction"},
                                                                   "weights": [1, 1]}})
    faq = rag.retrieval_for("faq")
    assert (faq.top_k, faq.weights, faq.rerank.kind, faq.rerank.top_n) == (7, (1.0, 1.0), "late_interaction", 20)
    assert rag.retrieval_for("other") == rag.retrieval
    with pytest.raises(ValidationError, match=r"rag.collections.faq.rerank: .*needs rerank.model"):
        RagSettings(collections={"faq": {"rerank": {"kind": "cross_encoder"}}})
    with pytest.raises(ValidationError, match="top_n"):
        RagSettings(collections={"faq": {"rerank": {"kind": "late_interaction", "top_n": 0}}})
    with pytest.raises(ValidationError, match=r"rag.collections.faq.top_k: .*; rag.collections.faq.weights.1: "):
        RagSettings(collections={"faq": {"weights": [1, -1], "top_k": 0}})
    with pytest.raises(ValidationError, match="at least one"):
        RagSettings(retrieval={"weights": [0, 0]})


def test_retriever_reranks_only_the_configured_collection_and_reports_where_time_went(tmp_path: Path):
    settings = Settings(home=tmp_path, rag={"collections": {"faq": {"rerank": {"kind": "late_interaction",
                                                                              "top_n": 3}}}})
    rag = build_rag(settings, embedder=HashingEmbedder())
    reverse = Reverse()
    rag.retriever.rerankers = FixedRerankers(reverse)
    for col in ("faq", "plain"):
        rag.pipeline.run([corpus(tmp_path / col)], col)
    plain = rag.retriever.retrieve("lighthouse Plymouth", collection="plain", top_k=3)
    assert plain.reranker is None and not reverse.seen
    faq = rag.retriever.retrieve("lighthouse Plymouth", collection="faq", top_k=2)
    assert faq.reranker == "reverse"
    # the reranker read all top_n candidates with their headings, and its order won
    assert len(reverse.seen[0]) == 3 and all("\n\n" in p for p in reverse.seen[0])
    assert len(faq.chunks) == 2 and faq.chunks[0].score == 2.0
    assert faq.took_ms >= faq.embed_ms + faq.search_ms + faq.rerank_ms - 1e-6 >= 0
    # same documents in both collections: the reranked order is the fused one reversed
    assert [c.citation.title for c in faq.chunks] == [c.citation.title for c in plain.chunks][::-1][:2]
    assert len({c.citation.title for c in plain.chunks}) == 3
    rag.close()


def test_late_interaction_needs_a_transformer_embedder(tmp_path: Path):
    rag = build_rag(Settings(home=tmp_path, rag={"retrieval": {"rerank": {"kind": "late_interaction"}}}),
                    embedder=HashingEmbedder())
    rag.pipeline.run([corpus(tmp_path)], "default")
    with pytest.raises(EmbeddingModelError, match=r"rerank\.kind"):
        rag.retriever.retrieve("bees")
    rag.close()


@pytest.fixture(scope="module")
def minilm():
    e = SentenceTransformerEmbedder()
    e.warm_up()
    return e


def test_late_interaction_ranks_the_answer_first_and_caches_passages(minilm):
    r = LateInteractionReranker(minilm.sentence_transformer, cache_size=8)
    passages = ["Honey bees store nectar in wax combs.", "The lighthouse stands on rocks near Plymouth.",
                "Tides rise twice a day."]
    scores = r.score("Where is the lighthouse?", passages)
    assert scores.shape == (3,) and int(np.argmax(scores)) == 1
    again = r.score("Where is the lighthouse?", passages)
    np.testing.assert_allclose(scores, again, rtol=1e-6)
    assert len(r._cache) == 4  # the query and three passages, each computed once
    assert r.score("q", []).shape == (0,)


def test_cross_encoder_loads_a_folder_offline_and_scores_pairs(tmp_path: Path, minilm):
    # A CrossEncoder built from the shipped MiniLM weights (its head untrained): proves the offline load and
    # the scoring path, not ranking quality; a real cross-encoder folder goes through the same code.
    from sentence_transformers import CrossEncoder

    folder = tmp_path / "ce"
    CrossEncoder(str(minilm.model_path / "."), num_labels=1, local_files_only=True).save(str(folder))
    r = CrossEncoderReranker(folder)
    scores = r.score("Where is the lighthouse?", ["bees", "lighthouse near Plymouth"])
    assert scores.shape == (2,) and np.all(np.isfinite(scores))
    with pytest.raises(EmbeddingModelError, match="not a cross-encoder"):
        CrossEncoderReranker(tmp_path / "missing").score("q", ["p"])
    assert Rerankers(lambda: None).get(RerankConfig(kind="cross_encoder", model=folder)).name == "cross_encoder:ce"


def test_ranking_metrics():
    assert rank_of(["a", "b", "c"], "b") == 2 and rank_of(["a"], "z") == 0
    assert ndcg_at(1, 10) == 1.0 and ndcg_at(3, 10) == pytest.approx(0.5) and ndcg_at(11, 10) == 0.0
    s = summarize([1, 2, 0, 6], k=10)
    assert s["mrr"] == pytest.approx((1 + 0.5 + 0 + 1 / 6) / 4)
    assert (s["recall@1"], s["recall@5"], s["recall@10"]) == (0.25, 0.5, 0.75)


SPHINX = """<html><body><h1>Programming FAQ</h1>
<section id="general"><h2><a class="toc-backref">General Questions</a>¶</h2>
<section id="q1"><h3><a class="toc-backref">Is there a debugger?</a></h3><p>Yes. The pdb module is a simple
but adequate console-mode debugger.</p><pre>import pdb</pre></section>
<section id="q2"><h3>How do I see?</h3><p>See above.</p></section></section></body></html>"""

DOCBOOK = """<html><body><div class="chapter"><div class="titlepage"><h1>Chapter 8. Tools</h1></div>
<div class="section"><div class="titlepage"><h2 class="title">8.1. What programs manage packages?</h2></div>
<p>There are multiple tools that manage Debian packages, from dpkg to apt.</p>
<div class="section"><div class="titlepage"><h3 class="title">8.1.1. dpkg</h3></div>
<p>This is the main package management program, invoked with many options.</p></div></div></div></body></html>"""


def test_faq_entries_keep_the_answer_and_leave_the_question_out(tmp_path: Path):
    (tmp_path / "programming.html").write_text(SPHINX)
    (tmp_path / "pkgtools.en.html").write_text(DOCBOOK)
    py = _sphinx_entries(tmp_path / "programming.html", "py")
    assert [(e.question, e.section) for e in py] == [("Is there a debugger?", "General Questions")]  # short skipped
    assert "pdb module" in py[0].answer and "import pdb" in py[0].answer
    deb = _docbook_entries(tmp_path / "pkgtools.en.html", "deb")
    assert [e.question for e in deb] == ["What programs manage packages?", "dpkg"]
    assert "main package management" not in deb[0].answer  # a subsection is its own entry
    qs = QuestionSet("t", [*py, *deb])
    assert qs.queries == [("Is there a debugger?", py[0].id), ("What programs manage packages?", deb[0].id)]
    written = qs.write(tmp_path / "out")
    doc = (written / f"{py[0].id}.md").read_text()
    assert doc.startswith("# Programming FAQ\n\n## General Questions\n\n") and "debugger?" not in doc
    assert Entry("x", "P", "", "Q?", "A" * 50).markdown() == "# P\n\n" + "A" * 50 + "\n"


def test_a_long_query_is_embedded_from_its_questions_and_searched_whole_by_bm25(tmp_path: Path):
    from ingest.retriever import focus

    pasted = "My service logs this line again and again. " * 40
    query = f"{pasted}Is the lighthouse near Plymouth? And who built it? Thanks a lot."
    assert focus(query, 800) == "Is the lighthouse near Plymouth? And who built it?"
    assert focus("Where is it?", 800) == "Where is it?" and focus(query, None) == query
    no_question = "Some context here. " * 30 + "First point. Second point."
    tail = focus(no_question, 100)
    assert tail.endswith("Some context here. First point. Second point.") and len(tail) <= 100

    class Spy(HashingEmbedder):
        def __init__(self) -> None:
            super().__init__()
            self.queries: list[str] = []

        def embed_query(self, text: str) -> np.ndarray:
            self.queries.append(text)
            return super().embed_query(text)

    spy = Spy()
    rag = build_rag(Settings(home=tmp_path), embedder=spy)
    rag.pipeline.run([corpus(tmp_path)], "default")
    got = rag.retriever.retrieve(query, top_k=1)
    assert spy.queries == ["Is the lighthouse near Plymouth? And who built it?"]
    assert got.query == query and got.chunks[0].citation.title == "Lighthouses"
    rag.close()
