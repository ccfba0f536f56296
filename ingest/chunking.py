"""Structure-aware chunking by tokens of the embedding model's tokenizer.

Order of preference for cut points: heading boundaries (a chunk never spans two
sections unless a section is too small to stand alone), then paragraphs, then
sentences, then, only for a single sentence longer than the budget, a token window.
Each chunk is a contiguous slice ``text[char_start:char_end]`` of its document, so
citations point at exact source characters.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from ingest.documents import Document
from ingest.settings import ChunkerConfig


@runtime_checkable
class Tokenizer(Protocol):
    """Gives each text's token spans as character offsets (no special tokens)."""

    name: str

    def token_spans(self, text: str) -> list[tuple[int, int]]: ...


class HFTokenizer:
    """The embedding model's own fast tokenizer, from its ``tokenizer.json`` (no torch needed)."""

    def __init__(self, model_path: Path) -> None:
        from tokenizers import Tokenizer as _Tok

        self.name = Path(model_path).name
        self._tok = _Tok.from_file(str(Path(model_path) / "tokenizer.json"))
        # The file ships with truncation at 128 for the transformers pipeline; we need all spans.
        self._tok.no_truncation()
        self._tok.no_padding()

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return list(self._tok.encode(text, add_special_tokens=False).offsets)


class WhitespaceTokenizer:
    """Words and punctuation as tokens: for tests and for callers without a model."""

    name = "whitespace"
    _RE = re.compile(r"\w+|[^\w\s]")

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self._RE.finditer(text)]


@dataclass(frozen=True, slots=True)
class Chunk:
    doc_id: str
    index: int
    text: str
    char_start: int
    char_end: int
    heading_path: tuple[str, ...]
    n_tokens: int
    page: int | None = None
    page_end: int | None = None
    embed_text: str = ""

    @property
    def hash(self) -> str:
        h = hashlib.sha256()
        h.update(self.embed_text.encode())
        h.update(f"\x00{self.char_start}:{self.char_end}".encode())
        return h.hexdigest()


@dataclass(slots=True)
class _Unit:
    start: int
    end: int
    tokens: int


@dataclass(slots=True)
class _Section:
    path: tuple[str, ...]
    units: list[_Unit]

    @property
    def tokens(self) -> int:
        return sum(u.tokens for u in self.units)


_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
_FENCE = re.compile(r"^(```|~~~)")
# A sentence ends at . ! ? (optionally closed by a quote/bracket) followed by space and a plausible
# sentence start; a single newline inside a paragraph (list items, wrapped code) is also a boundary.
_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])|\n")


def heading_prefix(title: str, path: Sequence[str]) -> str:
    """'Title > Section > Subsection', as embedded in front of a chunk's text (the path may start with the
    title itself)."""
    crumbs = [title, *path[1:]] if path and path[0] == title else [title, *path]
    return " > ".join(c for c in crumbs if c)


class Chunker:
    def __init__(self, config: ChunkerConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer

    def chunk(self, doc: Document) -> list[Chunk]:
        text = doc.text
        spans = self.tokenizer.token_spans(text)
        starts = [s for s, _ in spans]
        ends = [e for _, e in spans]

        def count(a: int, b: int) -> int:
            return max(0, bisect.bisect_right(ends, b) - bisect.bisect_left(starts, a))

        sections = self._sections(doc, count, starts, ends)
        sections = self._merge_small(sections)
        chunks: list[Chunk] = []
        for sec in sections:
            for a, b in self._pack(sec.units):
                chunks.append(self._make(doc, len(chunks), a, b, sec.path, count(a, b)))
        return chunks

    # -- parsing -----------------------------------------------------------------

    def _sections(self, doc: Document, count, starts: list[int], ends: list[int]) -> list[_Section]:
        text = doc.text
        structured = doc.kind in ("markdown", "html")
        sections: list[_Section] = [_Section((), [])]
        stack: list[tuple[int, str]] = []
        para_start: int | None = None
        in_fence = False
        pos = 0

        def close_para(end: int) -> None:
            nonlocal para_start
            if para_start is not None:
                a, b = _strip(text, para_start, end)
                if a < b:
                    sections[-1].units.extend(self._units(text, a, b, count, starts, ends))
            para_start = None

        for line in text.split("\n"):
            line_start, line_end = pos, pos + len(line)
            pos = line_end + 1
            if structured and _FENCE.match(line.lstrip()):
                if not in_fence:
                    close_para(line_start)
                    para_start = line_start
                in_fence = not in_fence
                continue
            if in_fence:
                continue
            m = _HEADING.match(line) if structured else None
            if m:
                close_para(line_start)
                level, title = len(m.group(1)), m.group(2).strip()
                while stack and stack[-1][0] >= level:
                    stack.pop()
                stack.append((level, title))
                sections.append(_Section(tuple(t for _, t in stack), []))
            elif not line.strip():
                close_para(line_start)
            elif para_start is None:
                para_start = line_start
        close_para(len(text))
        return [s for s in sections if s.units]

    def _units(self, text: str, a: int, b: int, count, starts: list[int], ends: list[int]) -> list[_Unit]:
        """A paragraph as one unit if it fits, else its sentences, else token windows."""
        limit = self.config.max_tokens
        n = count(a, b)
        if n <= limit:
            return [_Unit(a, b, n)]
        units: list[_Unit] = []
        cur = a
        for m in _SENT_END.finditer(text, a, b):
            s, e = _strip(text, cur, m.start())
            if s < e:
                units.extend(self._windows(s, e, count, starts, ends))
            cur = m.end()
        s, e = _strip(text, cur, b)
        if s < e:
            units.extend(self._windows(s, e, count, starts, ends))
        return units

    def _windows(self, a: int, b: int, count, starts: list[int], ends: list[int]) -> list[_Unit]:
        limit = self.config.max_tokens
        n = count(a, b)
        if n <= limit:
            return [_Unit(a, b, n)]
        first = bisect.bisect_left(starts, a)
        last = bisect.bisect_right(ends, b)
        out: list[_Unit] = []
        for i in range(first, last, limit):
            j = min(i + limit, last)
            s = a if i == first else starts[i]
            e = b if j == last else ends[j - 1]
            out.append(_Unit(s, e, j - i))
        return out

    def _merge_small(self, sections: list[_Section]) -> list[_Section]:
        """Fold a tiny section (an intro line under a title) into the next one instead of a stub chunk."""
        out: list[_Section] = []
        carry: _Section | None = None
        for sec in sections:
            if carry is not None:
                if carry.tokens + sec.tokens <= self.config.max_tokens:
                    sec = _Section(_common(carry.path, sec.path), carry.units + sec.units)
                else:
                    out.append(carry)
                carry = None
            if sec.tokens < self.config.min_tokens:
                carry = sec
            else:
                out.append(sec)
        if carry is not None:
            out.append(carry)
        return out

    def _pack(self, units: list[_Unit]) -> list[tuple[int, int]]:
        limit, overlap = self.config.max_tokens, self.config.overlap_tokens
        out: list[tuple[int, int]] = []
        cur: list[_Unit] = []
        tokens = 0
        fresh = 0  # units in `cur` that are not overlap from the previous chunk
        for u in units:
            if cur and tokens + u.tokens > limit and fresh:
                out.append((cur[0].start, cur[-1].end))
                keep: list[_Unit] = []
                kept = 0
                for prev in reversed(cur):
                    if kept + prev.tokens > overlap or kept + prev.tokens + u.tokens > limit:
                        break
                    keep.insert(0, prev)
                    kept += prev.tokens
                cur, tokens, fresh = keep, kept, 0
            cur.append(u)
            tokens += u.tokens
            fresh += 1
        if cur and fresh:
            out.append((cur[0].start, cur[-1].end))
        return out

    def _make(self, doc: Document, index: int, a: int, b: int, path: tuple[str, ...], n: int) -> Chunk:
        body = doc.text[a:b]
        embed = body
        if self.config.prefix_headings:
            prefix = heading_prefix(doc.title, path)
            if prefix:
                embed = f"{prefix}\n\n{body}"
        return Chunk(
            doc_id=doc.doc_id, index=index, text=body, char_start=a, char_end=b, heading_path=path,
            n_tokens=n, page=doc.page_at(a), page_end=doc.page_at(max(a, b - 1)), embed_text=embed,
        )


def _strip(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _common(a: Sequence[str], b: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        out.append(x)
    return tuple(out)
