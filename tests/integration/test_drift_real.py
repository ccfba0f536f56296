"""Drift detection on real MiniLM embeddings of real questions (the packaged all-MiniLM-L6-v2, offline).

Two windows of traffic whose only difference is what users ask: questions about the shipped corpus
(tests/data/docs: SQLite WAL, Python venv, HTTP caching, git rebase, search ranking, TLS 1.3) against questions
about Python's standard library (the tests/data/pydocs document set). The input checks must flag the second;
two disjoint samples of the corpus questions must not be flagged. The other drift features (answer sizes,
tokens, retrieval scores, refusals) are drawn from one distribution in every window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from ingest.embedding import SentenceTransformerEmbedder
from lifecycle.lineage import Features, LineageStore
from lifecycle.monitor.drift import DriftMonitor, ReferenceSpec, Window, suite_loader
from lifecycle.monitor.settings import MonitorSettings
from lifecycle.monitor.store import DriftStore

pytestmark = pytest.mark.integration

QUESTIONS = yaml.safe_load((Path(__file__).resolve().parents[1] / "data" / "drift" / "questions.yaml").read_text())
N = 60  # questions per window
REF, SAME, OTHER = Window(1_000, 2_000), Window(2_000, 3_000), Window(3_000, 4_000)


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    e = SentenceTransformerEmbedder()
    e.warm_up()
    return e


@pytest.fixture(scope="module")
def windows(embedder):
    """Reference and "same" windows: a seeded split of the corpus questions; "other": stdlib questions."""
    rng = np.random.default_rng(0)
    corpus = [QUESTIONS["corpus"][i] for i in rng.permutation(len(QUESTIONS["corpus"]))]
    pydocs = [QUESTIONS["pydocs"][i] for i in rng.permutation(len(QUESTIONS["pydocs"]))[:N]]
    return {"reference": corpus[:N], "same": corpus[N:2 * N], "other": pydocs}


def rows(questions: list[str], window: Window, vectors: np.ndarray, *, seed: int) -> list[Features]:
    rng = np.random.default_rng(seed)
    out = []
    for i, (q, v) in enumerate(zip(questions, vectors, strict=True)):
        grounded = bool(rng.random() < 0.8)
        out.append(Features(
            id=f"{seed}-{i}", at=window.since + i * window.seconds / len(questions), owner="k", model="m",
            release=None, variant=None, question_chars=len(q), input_chars=len(q) + 120,
            answer_chars=int(rng.normal(420, 90)), prompt_tokens=int(rng.integers(300, 600)),
            completion_tokens=int(rng.normal(95, 20)), top_score=float(rng.uniform(0.014, 0.033)) if grounded else None,
            grounded=grounded, refused=bool(rng.random() < 0.05), validators="", outcome="ok",
            embedding=np.asarray(v, dtype=np.float32).astype(np.float16).tobytes()))
    return out


@pytest.fixture(scope="module")
def monitor(tmp_path_factory, embedder, windows) -> DriftMonitor:
    home = tmp_path_factory.mktemp("drift-real")
    store = LineageStore(home / "lineage.db")
    for seed, (name, window) in enumerate((("reference", REF), ("same", SAME), ("other", OTHER))):
        store.write([], rows(windows[name], window, embedder.embed_documents(windows[name]), seed=seed))
    # An eval suite whose cases are the reference window's questions.
    suites = home / "suites"
    suites.mkdir()
    (suites / "corpus-questions.yaml").write_text(yaml.safe_dump({
        "name": "corpus-questions", "target": {"model": "rag:docs"},
        "dataset": {"cases": [{"id": f"q{i}", "input": q} for i, q in enumerate(windows["reference"])]},
        "metrics": [{"name": "rouge_l", "threshold": 0.2}]}))
    mon = DriftMonitor(MonitorSettings(min_rows=40, report_points=100), store, DriftStore(home / "monitor.db"),
                       home=home, embed=embedder.embed_documents, suite_inputs=suite_loader(suites))
    yield mon
    mon.close()
    store.close()


def checks(result) -> dict:
    return {c.name: c for c in result.checks}


def test_questions_about_another_document_set_are_input_drift(monitor: DriftMonitor) -> None:
    result = monitor.check((OTHER.since, OTHER.until), ReferenceSpec(since=REF.since, until=REF.until))
    c = checks(result)
    assert result.verdict == "drift", [(x.name, x.statistic, x.threshold) for x in result.checks]
    assert c["input_embedding"].drifted and c["input_embedding"].statistic > 0.8, c["input_embedding"]
    assert c["topic_mix"].drifted, c["topic_mix"]
    # Answers, tokens, retrieval scores and refusals were drawn from one distribution: not what drifted.
    assert not any(c[n].drifted for n in ("answer_length", "completion_tokens", "refusal"))


def test_two_samples_of_the_same_questions_are_not_drift(monitor: DriftMonitor) -> None:
    result = monitor.check((SAME.since, SAME.until))  # against the window before: the reference window
    c = checks(result)
    assert result.reference["since"] == REF.since and result.current["rows"] == result.reference["rows"] == N
    assert result.verdict == "no_drift", [(x.name, x.statistic, x.threshold) for x in result.checks]
    assert not c["input_embedding"].drifted and not c["topic_mix"].drifted


def test_an_eval_suite_of_the_corpus_questions_as_the_reference(monitor: DriftMonitor) -> None:
    suite = ReferenceSpec(kind="suite", suite="corpus-questions")
    same = monitor.check((SAME.since, SAME.until), suite)
    assert same.reference["rows"] == N and not checks(same)["input_embedding"].drifted, checks(same)
    other = monitor.check((OTHER.since, OTHER.until), suite)
    assert other.verdict == "drift" and checks(other)["input_embedding"].drifted
    assert Path(other.report).is_file()
