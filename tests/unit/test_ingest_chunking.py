"""Token-budgeted, structure-aware chunking with exact character offsets."""

from __future__ import annotations

import itertools

import pytest

from ingest.chunking import Chunker, HFTokenizer, WhitespaceTokenizer
from ingest.documents import Document
from ingest.embedding import default_model_path
from ingest.settings import ChunkerConfig


def doc(text: str, kind: str = "markdown", title: str = "Guide", page_starts: tuple[int, ...] = ()) -> Document:
    return Document(doc_id="/d", source="/d", source_sha256="0" * 64, kind=kind, title=title, text=text,
                    page_starts=page_starts)


LONG = " ".join(f"Sentence {i} explains the install step in plenty of words." for i in range(60))
MD = f"# Guide\n\nIntro paragraph that is long enough to stand alone as a chunk here.\n\n## Install\n\n{LONG}\n\n" \
     "## Usage\n\n### CLI\n\nRun the tool. It prints a table.\n\n```sh\nkeel ingest docs/\n\nkeel search x\n```\n"


@pytest.fixture(params=["whitespace", "minilm"])
def tokenizer(request):
    return WhitespaceTokenizer() if request.param == "whitespace" else HFTokenizer(default_model_path())


def test_offsets_budget_and_headings(tokenizer):
    cfg = ChunkerConfig(max_tokens=80, overlap_tokens=16, min_tokens=4)
    d = doc(MD)
    chunks = Chunker(cfg, tokenizer).chunk(d)
    for c in chunks:
        assert d.text[c.char_start:c.char_end] == c.text
        assert c.n_tokens <= cfg.max_tokens
        assert len(tokenizer.token_spans(c.text)) <= cfg.max_tokens + 2
        assert not c.text.startswith("#")  # headings go to heading_path, not into the body
    paths = [c.heading_path for c in chunks]
    assert paths[0] == ("Guide",)
    assert ("Guide", "Install") in paths and ("Guide", "Usage", "CLI") in paths
    install = [c for c in chunks if c.heading_path == ("Guide", "Install")]
    assert len(install) > 2
    for c in install:  # sentence boundaries respected: every chunk starts at a sentence
        assert c.text.startswith("Sentence ")
        assert c.text.endswith(".")
    for a, b in itertools.pairwise(install):  # overlap: the next chunk starts before this one ends
        assert b.char_start < a.char_end
    assert [c.index for c in chunks] == list(range(len(chunks)))
    cli = next(c for c in chunks if c.heading_path == ("Guide", "Usage", "CLI"))
    assert "keel ingest docs/\n\nkeel search x" in cli.text  # the code fence is not split at its blank line
    assert cli.embed_text.startswith("Guide > Usage > CLI\n\n")


def test_no_overlap_and_determinism():
    cfg = ChunkerConfig(max_tokens=60, overlap_tokens=0, min_tokens=0)
    ch = Chunker(cfg, WhitespaceTokenizer())
    a, b = ch.chunk(doc(MD)), ch.chunk(doc(MD))
    assert [c.hash for c in a] == [c.hash for c in b]
    install = [c for c in a if c.heading_path == ("Guide", "Install")]
    for x, y in itertools.pairwise(install):
        assert y.char_start >= x.char_end


def test_overlong_sentence_is_cut_by_token_windows():
    text = "word " * 500
    chunks = Chunker(ChunkerConfig(max_tokens=100, overlap_tokens=0), WhitespaceTokenizer()).chunk(
        doc(text, kind="text"))
    assert len(chunks) == 5 and all(c.n_tokens == 100 for c in chunks)
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(text.rstrip())


def test_text_kind_ignores_hash_lines_and_pdf_pages():
    text = "# not a heading in plain text\n\nPage one words.\n\nPage two words here and many more words to fill it up."
    d = doc(text, kind="pdf", page_starts=(0, text.index("Page two")))
    chunks = Chunker(ChunkerConfig(max_tokens=16, overlap_tokens=0, min_tokens=0), WhitespaceTokenizer()).chunk(d)
    assert chunks[0].heading_path == ()
    assert chunks[0].text.startswith("# not a heading")
    assert chunks[-1].page == 2
    whole = Chunker(ChunkerConfig(max_tokens=200, overlap_tokens=0), WhitespaceTokenizer()).chunk(d)
    assert len(whole) == 1 and (whole[0].page, whole[0].page_end) == (1, 2)


def test_small_intro_section_merges_into_next():
    text = "# T\n\nShort.\n\n## A\n\nA body with a few words in it."
    chunks = Chunker(ChunkerConfig(max_tokens=100, overlap_tokens=0, min_tokens=5), WhitespaceTokenizer()).chunk(
        doc(text, title="T"))
    assert len(chunks) == 1 and chunks[0].heading_path == ("T",)
    assert chunks[0].text.startswith("Short.") and chunks[0].text.endswith("in it.")


def test_config_validation_and_fingerprint():
    with pytest.raises(ValueError):
        ChunkerConfig(max_tokens=64, overlap_tokens=40)
    assert ChunkerConfig().fingerprint() == ChunkerConfig().fingerprint()
    assert ChunkerConfig().fingerprint() != ChunkerConfig(max_tokens=150).fingerprint()


def test_html_code_comment_is_not_a_heading():
    from ingest.html import html_to_text

    page = ("<html><body><div class='body'><h1>itertools</h1><p>Recipes follow.</p>"
            "<pre># Amortize a loan\nx = 1\n\n# another comment\ny = 2</pre>"
            "<h2>Itertool functions</h2><p>Functions here.</p></div></body></html>")
    title, text = html_to_text(page)
    chunks = Chunker(ChunkerConfig(max_tokens=200, overlap_tokens=0, min_tokens=0), WhitespaceTokenizer()).chunk(
        doc(text, kind="html", title=title))
    assert {c.heading_path for c in chunks} == {("itertools",), ("itertools", "Itertool functions")}
    assert any("# Amortize a loan" in c.text for c in chunks)


def test_html_heading_text_in_a_toc_backref_link_is_kept():
    from ingest.html import html_to_text

    # docutils' ":backlinks:" output, as in the CPython FAQ pages: the heading text is a link classed "toc-backref"
    page = ("<html><body><div class='body'><h1>Programming FAQ</h1><section id='general'>"
            "<h2><a class='toc-backref' href='#id3'>General Questions</a><a class='headerlink' href='#g'>¶</a></h2>"
            "<p>Yes.</p></section><div class='sphinxsidebar'><h3>Navigation</h3></div></div></body></html>")
    _, text = html_to_text(page)
    assert "## General Questions" in text
    assert "Navigation" not in text and "¶" not in text
