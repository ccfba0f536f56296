"""Topic allow/deny lists: embedding similarity to short topic descriptions, plus keywords.

A ``deny`` topic fails the check when the text is close to it (similarity >= threshold or a keyword hit).
With an ``allow`` list, the text must be close to at least one allowed topic (or hit one of its keywords).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from app.guardrails.validators.base import CheckResult, Finding, TextEmbedder, chunk_text


@dataclass(frozen=True)
class Topic:
    name: str
    description: str
    keywords: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()


@dataclass
class TopicIndex:
    embedder: TextEmbedder
    allow: Sequence[Topic] = ()
    deny: Sequence[Topic] = ()
    _allow_m: list[np.ndarray] = field(default_factory=list, repr=False)
    _deny_m: list[np.ndarray] = field(default_factory=list, repr=False)

    def build(self) -> TopicIndex:
        # each topic = its description and its examples; the best matching row counts
        self._allow_m = [self.embedder.embed_documents([t.description, *t.examples]) for t in self.allow]
        self._deny_m = [self.embedder.embed_documents([t.description, *t.examples]) for t in self.deny]
        return self

    def scores(self, text: str) -> tuple[dict[str, float], dict[str, float]]:
        if len(self._allow_m) != len(self.allow) or len(self._deny_m) != len(self.deny):
            self.build()
        q = self.embedder.embed_documents(chunk_text(text, max_chars=300, max_chunks=8) or [text])
        allow = {t.name: float((q @ m.T).max()) for t, m in zip(self.allow, self._allow_m, strict=True)}
        deny = {t.name: float((q @ m.T).max()) for t, m in zip(self.deny, self._deny_m, strict=True)}
        return allow, deny


def _keyword_hit(text: str, keywords: Sequence[str]) -> str | None:
    for k in keywords:
        if re.search(rf"\b{re.escape(k.lower())}\b", text.lower()):
            return k
    return None


def check_topics(text: str, index: TopicIndex, *, deny_threshold: float = 0.5, allow_threshold: float = 0.3
                 ) -> CheckResult:
    allow_s, deny_s = index.scores(text)
    findings: list[Finding] = []
    for t in index.deny:
        kw = _keyword_hit(text, t.keywords)
        if deny_s[t.name] >= deny_threshold or kw:
            findings.append(Finding(f"denied:{t.name}", score=round(deny_s[t.name], 4),
                                    detail=f"keyword {kw!r}" if kw else "similarity"))
    off_topic = False
    if index.allow:
        ok = any(allow_s[t.name] >= allow_threshold or _keyword_hit(text, t.keywords) for t in index.allow)
        if not ok:
            off_topic = True
            findings.append(Finding("off_topic", score=round(max(allow_s.values()), 4)))
    passed = not findings
    reason = "" if passed else (
        "the request is outside the topics this assistant covers" if off_topic and len(findings) == 1 else
        "the request touches a restricted topic: " + ", ".join(f.kind.split(":", 1)[-1] for f in findings
                                                              if f.kind.startswith("denied:")))
    score = max([deny_s[t.name] for t in index.deny] or [0.0])
    return CheckResult(passed, round(max(0.0, score), 4), reason, tuple(findings),
                       details={"allow": {k: round(v, 4) for k, v in allow_s.items()},
                                "deny": {k: round(v, 4) for k, v in deny_s.items()}})
