"""Retrieval quality on public question sets: ranking metrics and the FAQ sets they run on.

The sets are the question-and-answer documents two Debian packages ship (real text, written by their
projects, never by Keel): the CPython FAQ (``python3.11-doc``: programming, design, library, extending...)
and the Debian FAQ (``debian-faq``: packages, releases, installation, kernels). Each FAQ entry becomes one
document holding the *answer* under its page and section headings; its question is the query and that
document is the one relevant answer. The question is left out of the document, so a match has to come from
what the answer says, as with a user's question against a knowledge base (FAQ retrieval in the IR
literature). Entries whose heading is not a question stay in the corpus as distractors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from selectolax.lexbor import LexborHTMLParser, LexborNode

PYTHON_FAQ = Path("/usr/share/doc/python3.11/html/faq")
DEBIAN_FAQ = Path("/usr/share/doc/debian/FAQ")

_WS = re.compile(r"\s+")
_NUMBER = re.compile(r"^\d+(\.\d+)*\.\s*")
# an answer shorter than this is a cross-reference ("See ..."), not an answer to rank
_MIN_ANSWER_CHARS = 40


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    page: str
    section: str
    question: str
    answer: str

    def markdown(self) -> str:
        """The document as ingested: page and section headings over the answer (not the question)."""
        head = f"# {self.page}\n\n" + (f"## {self.section}\n\n" if self.section else "")
        return head + self.answer + "\n"


@dataclass(frozen=True, slots=True)
class QuestionSet:
    name: str
    entries: list[Entry]

    @property
    def queries(self) -> list[tuple[str, str]]:
        """(question, id of the entry that answers it)."""
        return [(e.question, e.id) for e in self.entries if e.question.endswith("?")]

    def write(self, folder: Path) -> Path:
        """One markdown file per entry, named by its id: the retrieved chunk's source names the entry."""
        folder.mkdir(parents=True, exist_ok=True)
        for e in self.entries:
            (folder / f"{e.id}.md").write_text(e.markdown(), encoding="utf-8")
        return folder


def _clean(text: str) -> str:
    return _WS.sub(" ", text.replace("¶", "")).strip()


def _block_text(node: LexborNode) -> str:
    return (node.text(separator="") or "").strip("\n") if node.tag == "pre" else _clean(node.text(separator=" "))


def _sphinx_entries(path: Path, prefix: str) -> list[Entry]:
    tree = LexborHTMLParser(path.read_text(encoding="utf-8"))
    h1 = tree.css_first("h1")
    page = _clean(h1.text()) if h1 else path.stem
    out: list[Entry] = []
    category = ""  # the h2 a question sits under ("General Questions"); sections come in document order
    for n, section in enumerate(tree.css("section")):
        heading, level, parts = None, 0, []
        for child in section.iter(include_text=False):
            if child.tag in ("h2", "h3", "h4", "h5") and heading is None:
                heading, level = _clean(child.text()), int(child.tag[1])
            elif child.tag != "section" and (text := _block_text(child)):
                parts.append(text)
        if heading and level == 2:
            category = heading
        if heading and (answer := "\n\n".join(parts)) and len(answer) >= _MIN_ANSWER_CHARS:
            out.append(Entry(f"{prefix}-{path.stem}-{n:03d}", page, category if level > 2 else "", heading, answer))
    return out


def _docbook_entries(path: Path, prefix: str) -> list[Entry]:
    tree = LexborHTMLParser(path.read_text(encoding="utf-8"))
    top = tree.css_first("h1") or tree.css_first("h2")
    page = _clean(top.text()) if top else path.stem
    out: list[Entry] = []
    for n, section in enumerate(tree.css("div.section")):
        heading, parts = None, []
        for child in section.iter(include_text=False):
            cls = child.attributes.get("class") or ""
            if child.tag == "div" and "titlepage" in cls:
                h = child.css_first("h2, h3, h4, h5")
                heading = _NUMBER.sub("", _clean(h.text())) if h else None
            elif not (child.tag == "div" and cls == "section") and (text := _block_text(child)):
                parts.append(text)
        if heading and (answer := "\n\n".join(parts)) and len(answer) >= _MIN_ANSWER_CHARS:
            out.append(Entry(f"{prefix}-{path.name.split('.')[0]}-{n:03d}", page, "", heading, answer))
    return out


def python_faq(root: Path = PYTHON_FAQ) -> QuestionSet:
    files = sorted(p for p in root.glob("*.html") if p.stem != "index")
    if not files:
        raise FileNotFoundError(f"no CPython FAQ pages in {root}: apt-get install python3.11-doc")
    return QuestionSet("python-faq", [e for p in files for e in _sphinx_entries(p, "pyfaq")])


def debian_faq(root: Path = DEBIAN_FAQ) -> QuestionSet:
    files = sorted(p for p in root.glob("*.en.html") if not p.name.startswith(("index", "faqinfo")))
    if not files:
        raise FileNotFoundError(f"no Debian FAQ pages in {root}: apt-get install debian-faq")
    return QuestionSet("debian-faq", [e for p in files for e in _docbook_entries(p, "debfaq")])


# -- ranking metrics (one relevant document per query) -------------------------------------------------


def rank_of(ranked: Sequence[str], gold: str) -> int:
    """1-based position of the relevant document, 0 when it was not retrieved."""
    for i, doc in enumerate(ranked, 1):
        if doc == gold:
            return i
    return 0


def reciprocal_rank(rank: int) -> float:
    return 1.0 / rank if rank else 0.0


def hit_at(rank: int, k: int) -> float:
    """recall@k with one relevant document."""
    return 1.0 if 0 < rank <= k else 0.0


def ndcg_at(rank: int, k: int) -> float:
    """nDCG@k with one relevant document: the ideal DCG is 1."""
    return 1.0 / math.log2(rank + 1) if 0 < rank <= k else 0.0


def summarize(ranks: Sequence[int], k: int = 10) -> dict[str, float]:
    n = len(ranks) or 1
    return {
        "mrr": sum(reciprocal_rank(r) for r in ranks) / n,
        "recall@1": sum(hit_at(r, 1) for r in ranks) / n,
        "recall@5": sum(hit_at(r, 5) for r in ranks) / n,
        f"recall@{k}": sum(hit_at(r, k) for r in ranks) / n,
        f"ndcg@{k}": sum(ndcg_at(r, k) for r in ranks) / n,
    }
