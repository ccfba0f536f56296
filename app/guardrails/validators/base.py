"""What every Keel check returns, independent of guardrails-ai (so checks are plain, testable functions)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing a check found: a span of the text (``start``/``end``; -1 when not a span)."""

    kind: str
    start: int = -1
    end: int = -1
    text: str = ""
    score: float = 1.0
    detail: str = ""


def reaching_into(findings: Sequence[Finding], full: str, offset: int) -> list[Finding]:
    """Findings over ``full`` (= a context prefix of ``offset`` characters + the text checked) that reach
    into the checked text, clipped and shifted to its coordinates: a value that began in text already
    shown has the rest of it masked."""
    out = []
    for f in findings:
        if f.end > offset:
            start = max(f.start, offset)
            out.append(Finding(f.kind, start - offset, f.end - offset, full[start:f.end], f.score, f.detail))
    return out


@dataclass(frozen=True, slots=True)
class CheckResult:
    """``passed`` is the verdict; ``score`` is the risk in [0, 1] (higher = worse); ``fixed`` is the
    repaired text for checks that can repair (redaction), else None."""

    passed: bool
    score: float = 0.0
    reason: str = ""
    findings: tuple[Finding, ...] = ()
    fixed: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class TextEmbedder(Protocol):
    """Anything returning L2-normalised float32 rows (``ingest.embedding.Embedder`` fits)."""

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray: ...


_SENT_RE = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n|\n(?=\s*[-*\d])")


#: text ending in an abbreviation or an initial ("e.g.", "Dr.", "U.S."): a full stop there ends no sentence
ABBREVIATION_END = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|Dr|Mr|Mrs|Ms|Prof|St|No)\.|\b[A-Z]\.)$")


def split_sentences(text: str) -> list[str]:
    """A small, dependency-free sentence splitter (abbreviation-tolerant enough for windows)."""
    parts = [p.strip() for p in _SENT_RE.split(text)]
    out: list[str] = []
    for p in parts:
        if not p:
            continue
        # re-join fragments split after common abbreviations / initials ("e.g.", "Dr.", "U.S.")
        if out and ABBREVIATION_END.search(out[-1]):
            out[-1] = f"{out[-1]} {p}"
        else:
            out.append(p)
    return out


def chunk_text(text: str, max_chars: int = 400, max_chunks: int = 16) -> list[str]:
    """Sentence-aligned chunks for embedding long inputs; keeps the first and last chunks when capped."""
    chunks: list[str] = []
    cur = ""
    for s in split_sentences(text) or [text]:
        while len(s) > max_chars:
            chunks.append(s[:max_chars])
            s = s[max_chars:]
        if cur and len(cur) + 1 + len(s) > max_chars:
            chunks.append(cur)
            cur = s
        else:
            cur = f"{cur} {s}".strip()
    if cur:
        chunks.append(cur)
    if len(chunks) > max_chunks:
        half = max_chunks // 2
        chunks = chunks[:half] + chunks[-(max_chunks - half):]
    return chunks


def normalise(text: str) -> str:
    """Lower-case, collapse whitespace, undo the commonest obfuscations (zero-width chars, spaced letters)."""
    t = re.sub(r"[\u200b-\u200f\u2060\ufeff]", "", text)
    t = t.lower()
    # "i g n o r e" -> "ignore"
    t = re.sub(r"\b(?:[a-z]\s){3,}[a-z]\b", lambda m: m.group(0).replace(" ", ""), t)
    return re.sub(r"\s+", " ", t).strip()
