"""Citation attribution as an answer streams, the outcome of a grounded answer, and the withdrawal message."""

from __future__ import annotations

import pytest

from app.core.types import Finished, TextDelta, Usage
from app.services.grounding import (
    Attribution,
    attribute,
    cited_markers,
    outcome_of,
    withdrawal_message,
)
from ingest.embedding import HashingEmbedder
from ingest.retriever import Citation, RetrievedChunk

PASSAGES = [
    "Honey bees make honey from flower nectar. They store it in wax combs inside the hive.",
    "The Eddystone lighthouse stands on rocks south of Plymouth. Its tower was completed in 1882.",
]


async def run(pieces: list[str], passages=PASSAGES, reason: str = "stop") -> tuple[str, Attribution, list]:
    async def model():
        for p in pieces:
            yield TextDelta(p, 0)
        yield Usage(3, len(pieces))
        yield Finished(reason, 0)

    stats = Attribution()
    events = [e async for e in attribute(model(), passages, HashingEmbedder(256), stats=stats)]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    return text, stats, events


def split(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
async def test_uncited_sentences_get_the_supporting_passage_however_the_stream_is_cut(size: int):
    answer = "The Eddystone lighthouse stands on rocks south of Plymouth. Bees store honey in wax combs in the hive."
    text, stats, events = await run(split(answer, size))
    assert text == ("The Eddystone lighthouse stands on rocks south of Plymouth.[2] "
                    "Bees store honey in wax combs in the hive.[1]")
    assert (stats.sentences, stats.attributed, stats.model_cited) == (2, 2, 0)
    assert isinstance(events[-1], Finished) and isinstance(events[-2], TextDelta | Usage)


async def test_the_models_own_markers_are_kept_and_unsupported_or_short_sentences_get_none():
    answer = ("The tower was completed in 1882 [2]. Bees store honey in wax combs. [1] Sure. "
              "Quantum chromodynamics explains gluon confinement e.g. in protons. The end")
    text, stats, _ = await run(split(answer, 4))
    assert text == ("The tower was completed in 1882 [2]. Bees store honey in wax combs. [1] Sure. "
                    "Quantum chromodynamics explains gluon confinement e.g. in protons. The end")
    assert stats.model_cited == 2 and stats.attributed == 0


async def test_a_sentence_cut_by_the_token_limit_gets_no_marker():
    text, stats, _ = await run(["The Eddystone lighthouse stands on rocks south of Plymouth. Its tower was"],
                               reason="length")
    assert text == "The Eddystone lighthouse stands on rocks south of Plymouth.[2] Its tower was"
    assert stats.attributed == 1
    text, _, _ = await run(["The Eddystone lighthouse stands on rocks south of Plymouth"])
    assert text.endswith("Plymouth[2]")  # a finished answer's last sentence may lack its full stop


async def test_no_passages_means_nothing_is_touched():
    text, stats, _ = await run(["The tower was completed in 1882. ", "More."], passages=[])
    assert text == "The tower was completed in 1882. More." and stats.sentences == 0


def test_cited_markers_read_every_form_the_guard_accepts():
    assert cited_markers("A [1]. B [2, 3]. C [4-6]. D [7;8]") == {1, 2, 3, 4, 5, 6, 7, 8}
    assert cited_markers("no markers, [a] or [1-900]") == {1, 900}


def test_outcome():
    assert outcome_of("The tower was completed in 1882.[2]", withdrawn=False, passages=2) == "answered"
    assert outcome_of("I don't know based on the provided documents.", withdrawn=False, passages=2) == (
        "not_in_sources")
    assert outcome_of("anything", withdrawn=False, passages=0) == "not_in_sources"
    assert outcome_of("I don't know based on the provided documents.", withdrawn=True, passages=2) == "withdrawn"
    # a hedge is no abstention: the claim in the same sentence is judged (and never exempt from groundedness)
    assert outcome_of("I cannot answer that, but the capital of France is Berlin.", withdrawn=False,
                      passages=2) == "answered"
    # an abstention with a claim beside it is an answer, judged as one
    assert outcome_of("I don't know. The tower was completed in 1882 by James Douglass.", withdrawn=False,
                      passages=2) == "answered"


def chunk(doc: str, title: str, source: str, path: list[str] | None = None) -> RetrievedChunk:
    return RetrievedChunk(text="t", score=1.0, citation=Citation(
        source=source, title=title, heading_path=path or [title], char_start=0, char_end=1, doc_id=doc,
        chunk_id=f"{doc}-c", chunk_index=0, snapshot_id="s"))


def test_withdrawal_message_names_one_passage_per_document_numbered_as_cited():
    chunks = [chunk("a", "Lighthouses", "lights.md", ["Lighthouses", "Eddystone"]), chunk("a", "Lighthouses", "x"),
              chunk("b", "Bees", "bees.md"), chunk("c", "Tides", "Tides"), chunk("d", "Stars", "stars.md")]
    msg = withdrawal_message("Not supported.", chunks)
    assert msg == ("Not supported. The sources that came closest: [1] Lighthouses > Eddystone (lights.md); "
                   "[3] Bees (bees.md); [4] Tides.")
    assert withdrawal_message("Not supported.", []) == "Not supported."


async def test_code_brackets_and_the_models_own_marker_forms_are_left_as_they_are():
    answer = ("Run `print(\"Bees store honey in wax combs in the hive.\")` to see it. "
              "```\nBees store honey in wax combs in the hive. x = 1\n```\n"
              "The Eddystone lighthouse stands on rocks south of Plymouth.[2] "
              "Bees store honey in wax combs in the hive. [1][2] "
              "The Eddystone lighthouse stands on rocks south of Plymouth. [see below] Done.")
    text, stats, _ = await run(split(answer, 5))
    # nothing inside code (the sentence around the inline code is cited after it); the model's ".[2]" and
    # " [1][2]" kept, one count each; "[see below]" is no marker
    assert text == answer.replace("to see it. ", "to see it.[1] ").replace("Plymouth. [see", "Plymouth.[2] [see")
    assert stats.model_cited == 2 and stats.attributed == 2
