"""Groundedness: is each sentence of an answer supported by the retrieved passages?

Per answer sentence, the best cosine similarity to any passage sentence window (one sentence, or two
adjacent sentences) is compared with ``threshold``. No NLI or cross-encoder model works offline here
(ENVIRONMENT.md), so this is a similarity proxy: it catches answers that drift away from the sources,
not subtle contradictions ("X is true" vs "X is false" embed close together).

Two lexical checks correct the proxy where it is known to be wrong:

* a short sentence that restates a fact in the sources' own words ("The constant k is 60.") embeds far
  from the long passage sentence it comes from; when at least ``lexical_threshold`` of its content words
  (at least two, or only numbers) occur in the passages it counts as supported. Measured on the golden
  RAG answers of SmolLM2: 4 of 6 withdrawals were such correct answers.
* a number (digits or a number word) or a name the passages never mention is unsupported whatever the
  similarity: "k is 42" embeds as close to "k = 60" as "k is 60" does, and "Keel stores templates in
  MongoDB" as close to "Keel stores templates in SQLite" as the truth. A name is a word with a capital
  letter that does not start the sentence, or with one after its first letter (``gRPC``, ``MongoDB``).

Contradictions in common words ("checked once an hour" against "every 0.5 s") still pass: the labelled
set in infra/guardrails/data/validator_sets.yaml measures how many (tests/unit/test_guardrails_rates.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.guardrails.validators.base import CheckResult, Finding, TextEmbedder, split_sentences

_TRIVIAL = re.compile(r"^(?:sure|yes|no|okay|ok|certainly|of course|here (?:is|are)[^.]*|i hope this helps|"
                      r"let me know[^.]*|thanks?[^.]*)[.!]?$", re.I)
# "I don't know based on the provided documents." (the RAG prompt's abstention) claims nothing to support
_NOT = r"(?:do\s+not|don[\'\u2019]t|cannot|can[\'\u2019]t|could\s+not|couldn[\'\u2019]t)"
# The whole sentence must be the abstention: "I don't know, but aspirin cures cancer." claims something.
_ABSTAIN = re.compile(
    r"^\s*(?:sorry,?\s*|unfortunately,?\s*)?(?:"
    rf"i\s+{_NOT}\s+(?:know|find|tell|answer|say)(?:\s+(?:that|this|it|the\s+answer))?|"
    rf"(?:the\s+)?(?:provided\s+)?(?:sources|passages|documents|context)\s+{_NOT}\s+(?:say|contain|answer|mention)"
    r"(?:\s+(?:that|this|it|the\s+answer))?)"
    r"(?:\s+(?:based\s+on|from|in)\s+the\s+(?:provided\s+|given\s+)?(?:documents|sources|passages|information|context))?"
    r"\s*[.!]?\s*$", re.I)
# "The answer is: X." / "Answer: X" only frame the claim X
# "[2]", "[1, 3]": citation markers point at passages; they are not claims (nor numbers to check)
_CITE = re.compile(r"\[\s*\d+(?:\s*[,;-]\s*\d+)*\s*\]")
_FRAME = re.compile(r"^(?:the\s+)?(?:short\s+)?answer(?:\s+is)?\s*[:,-]?\s*", re.I)
_TOKEN = re.compile(r"[a-z0-9]+(?:[.,][0-9]+)*", re.I)
_NUMBER = re.compile(r"^[0-9]+(?:[.,][0-9]+)*$")
_NUMBER_WORDS_TEXT = """
two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen
nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million billion
"""
_NUMBER_WORDS = frozenset(_NUMBER_WORDS_TEXT.split())
_STOP_TEXT = """
a an the and or but if of to in on at by for with from as is are was were be been being this that these those it
its they them their there here what which who whom whose when where why how not no yes do does did done can could
should would may might will shall about into over under than then also such only very more most some any each other
so too just you your we our i me my he she his her has have had having one ones use used using get gets set
"""
_STOP = frozenset(_STOP_TEXT.split())


def content_words(text: str) -> list[str]:
    return [t for t in (m.group(0).lower() for m in _TOKEN.finditer(text)) if t not in _STOP]


def names(sentence: str) -> list[str]:
    """Words written like names: a capital after the first word, or after a word's first letter (``gRPC``)."""
    out = []
    for i, m in enumerate(_TOKEN.finditer(sentence)):
        w = m.group(0)
        if any(c.isupper() for c in w[1:]) or (i > 0 and w[:1].isupper()):
            out.append(w.lower())
    return out


def _lexical(sentence: str, vocab: set[str], known_names: frozenset[str] = frozenset()) -> tuple[float, bool, bool]:
    """(share of content words in the passages, every number and name present in them (or, for a name, in
    ``known_names``), enough evidence to decide lexically)."""
    words = content_words(sentence)
    if not words:
        return 0.0, True, False
    numbers = [w for w in words if _NUMBER.match(w) or w in _NUMBER_WORDS]
    # numbers and names: an answer's specifics must come from the sources (names also from the question)
    specifics_ok = all(n in vocab for n in numbers) and all(
        n in vocab or n in _STOP or n in known_names for n in names(sentence))
    share = sum(w in vocab for w in words) / len(words)
    return share, specifics_ok, len(words) >= 2 or (bool(numbers) and len(numbers) == len(words))


@dataclass(frozen=True, slots=True)
class SentenceSupport:
    sentence: str
    similarity: float
    supported: bool
    best_passage: int
    lexical: float = 0.0


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


class SupportIndex:
    """The passages' sentence windows, embedded once, to judge any number of answer sentences against: the
    output guard judges a whole answer; citation attribution judges each sentence as it ends."""

    def __init__(self, passages: Sequence[str], embedder: TextEmbedder, *, question: str | None = None) -> None:
        self.passages = list(passages)
        self.embedder = embedder
        self.windows, self.owners = passage_windows(self.passages)
        self._vecs = embedder.embed_documents(self.windows) if self.windows else None
        self.vocab = {t for passage in self.passages for t in content_words(passage)}
        self.known = frozenset(names(question)) if question else frozenset()

    def support(self, sentences: Sequence[str], *, threshold: float = 0.55, lexical_threshold: float = 0.75
                ) -> list[SentenceSupport]:
        if not sentences:
            return []
        if self._vecs is None:
            return [SentenceSupport(s, 0.0, False, -1) for s in sentences]
        claims = [_FRAME.sub("", _CITE.sub("", s)).strip() or s for s in sentences]
        sims = self.embedder.embed_documents(claims) @ self._vecs.T
        out = []
        for i, s in enumerate(sentences):
            j = int(np.argmax(sims[i]))
            sim = float(sims[i, j])
            share, specifics_ok, decisive = _lexical(claims[i], self.vocab, self.known)
            supported = specifics_ok and (sim >= threshold or (decisive and share >= lexical_threshold))
            out.append(SentenceSupport(s, round(sim, 4), supported, self.owners[j], round(share, 3)))
        return out


def abstains(text: str) -> bool:
    """Whether a sentence of the text says only that the sources do not answer ("I don't know based on the
    provided documents.")."""
    return any(_ABSTAIN.match(s) for s in split_sentences(text))


def is_claim(sentence: str, min_words: int = 4) -> bool:
    """A sentence that states something the sources must support: long enough, not a pleasantry, and not the
    answer's own statement that the sources do not answer the question."""
    return len(sentence.split()) >= min_words and not _TRIVIAL.match(sentence) and not _ABSTAIN.match(sentence)


def sentence_support(answer: str, passages: Sequence[str], embedder: TextEmbedder, *, threshold: float = 0.55,
                     min_words: int = 4, lexical_threshold: float = 0.75, question: str | None = None
                     ) -> list[SentenceSupport]:
    """``question``: names it uses count as known (numbers do not: "is k 42?" must not ground "k is 42")."""
    sentences = [s for s in split_sentences(answer) if is_claim(s, min_words)]
    if not sentences:
        return []
    return SupportIndex(passages, embedder, question=question).support(
        sentences, threshold=threshold, lexical_threshold=lexical_threshold)


def check_groundedness(answer: str, passages: Sequence[str], embedder: TextEmbedder, *, threshold: float = 0.55,
                       max_unsupported_ratio: float = 0.0, lexical_threshold: float = 0.75,
                       question: str | None = None) -> CheckResult:
    """Fails when the share of unsupported sentences exceeds ``max_unsupported_ratio``.

    ``details['unsupported']`` lists the unsupported sentences; ``score`` is that share."""
    support = sentence_support(answer, passages, embedder, threshold=threshold, lexical_threshold=lexical_threshold,
                               question=question)
    if not support:
        return CheckResult(True, details={"sentences": 0, "unsupported": []})
    unsupported = [s for s in support if not s.supported]
    ratio = len(unsupported) / len(support)
    passed = ratio <= max_unsupported_ratio
    findings = tuple(Finding("unsupported_sentence", text=s.sentence, score=s.similarity) for s in unsupported)
    reason = "" if passed else f"{len(unsupported)} of {len(support)} sentences are not supported by the sources"
    return CheckResult(passed, round(ratio, 4), reason, findings,
                       details={"sentences": len(support), "unsupported": [s.sentence for s in unsupported],
                                "similarities": [s.similarity for s in support],
                                "lexical": [s.lexical for s in support]})
