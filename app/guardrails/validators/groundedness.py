"""Groundedness: is each sentence of an answer supported by the retrieved passages?

Per answer sentence, the best cosine similarity to any passage sentence window (one sentence, or two
adjacent sentences) is compared with ``threshold``. No NLI or cross-encoder model works offline here
(ENVIRONMENT.md), so this is a similarity proxy: it catches answers that drift away from the sources,
not subtle contradictions ("X is true" vs "X is false" embed close together).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.guardrails.validators.base import CheckResult, Finding, TextEmbedder, split_sentences

_TRIVIAL = re.compile(r"^(?:sure|yes|no|okay|ok|certainly|of course|here (?:is|are)[^.]*|i hope this helps|"
                      r"let me know[^.]*|thanks?[^.]*)[.!]?$", re.I)


@dataclass(frozen=True, slots=True)
class SentenceSupport:
    sentence: str
    similarity: float
    supported: bool
    best_passage: int


def passage_windows(passages: Sequence[str]) -> tuple[list[str], list[int]]:
    windows, owners = [], []
    for i, p in enumerate(passages):
        sents = split_sentences(p) or [p]
        for j, s in enumerate(sents):
            windows.append(s)
            owners.append(i)
            if j + 1 < len(sents):
                windows.append(f"{s} {sents[j + 1]}")
                owners.append(i)
    return windows, owners


def sentence_support(answer: str, passages: Sequence[str], embedder: TextEmbedder, *, threshold: float = 0.55,
                     min_words: int = 4) -> list[SentenceSupport]:
    sentences = [s for s in split_sentences(answer) if len(s.split()) >= min_words and not _TRIVIAL.match(s)]
    if not sentences:
        return []
    if not passages:
        return [SentenceSupport(s, 0.0, False, -1) for s in sentences]
    windows, owners = passage_windows(passages)
    vecs = embedder.embed_documents(sentences + windows)
    q, p = vecs[: len(sentences)], vecs[len(sentences):]
    sims = q @ p.T
    out = []
    for i, s in enumerate(sentences):
        j = int(np.argmax(sims[i]))
        sim = float(sims[i, j])
        out.append(SentenceSupport(s, round(sim, 4), sim >= threshold, owners[j]))
    return out


def check_groundedness(answer: str, passages: Sequence[str], embedder: TextEmbedder, *, threshold: float = 0.55,
                       max_unsupported_ratio: float = 0.0) -> CheckResult:
    """Fails when the share of unsupported sentences exceeds ``max_unsupported_ratio``.

    ``details['unsupported']`` lists the unsupported sentences; ``score`` is that share."""
    support = sentence_support(answer, passages, embedder, threshold=threshold)
    if not support:
        return CheckResult(True, details={"sentences": 0, "unsupported": []})
    unsupported = [s for s in support if not s.supported]
    ratio = len(unsupported) / len(support)
    passed = ratio <= max_unsupported_ratio
    findings = tuple(Finding("unsupported_sentence", text=s.sentence, score=s.similarity) for s in unsupported)
    reason = "" if passed else f"{len(unsupported)} of {len(support)} sentences are not supported by the sources"
    return CheckResult(passed, round(ratio, 4), reason, findings,
                       details={"sentences": len(support), "unsupported": [s.sentence for s in unsupported],
                                "similarities": [s.similarity for s in support]})
