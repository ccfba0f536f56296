"""Leakage in outputs: the system prompt (word n-gram overlap) and secrets (credential patterns)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from app.guardrails.validators.base import CheckResult, Finding, reaching_into

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

SECRET_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("AWS_ACCESS_KEY", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("AWS_SECRET_KEY", re.compile(r"(?i)aws.{0,20}?(?:secret|key).{0,10}?[=:\"'\s]\s*[\"']?([A-Za-z0-9/+=]{40})\b")),
    ("GITHUB_TOKEN", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b")),
    ("OPENAI_KEY", re.compile(r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}\b")),
    ("ANTHROPIC_KEY", re.compile(r"\bsk-ant-[A-Za-z0-9_-]{20,}\b")),
    ("SLACK_TOKEN", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b")),
    ("GOOGLE_API_KEY", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b")),
    ("STRIPE_KEY", re.compile(r"\b(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}\b")),
    ("KEEL_API_KEY", re.compile(r"\bkeel[-_](?:sk|live|test)[-_][A-Za-z0-9_-]{16,}\b")),
    ("JWT", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b")),
    ("PRIVATE_KEY", re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP |ENCRYPTED )?PRIVATE KEY(?: BLOCK)?-----"
                               r"[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY(?: BLOCK)?-----|$)")),
    ("CONNECTION_STRING", re.compile(r"\b(?:postgres(?:ql)?|mysql|mongodb(?:\+srv)?|redis|amqp)://[^\s:/@]+:[^\s@/]+@[^\s]+")),
    ("GENERIC_SECRET", re.compile(r"(?i)\b(?:api[_-]?key|secret|token|password|passwd|pwd)\b\s*[:=]\s*[\"']?"
                                  r"([A-Za-z0-9_\-/+=.!@#$%^&*]{12,})")),
]


def _entropy(s: str) -> float:
    if not s:
        return 0.0
    counts = {c: s.count(c) for c in set(s)}
    return -sum(n / len(s) * math.log2(n / len(s)) for n in counts.values())


def find_secrets(text: str, extra_values: Iterable[str] = ()) -> list[Finding]:
    found: list[Finding] = []
    for kind, rx in SECRET_PATTERNS:
        for m in rx.finditer(text):
            start, end = (m.start(1), m.end(1)) if rx.groups else (m.start(), m.end())
            value = text[start:end]
            if kind == "GENERIC_SECRET" and (_entropy(value) < 3.0 or value.isalpha()):
                continue  # "password: correcthorsebattery" style prose, placeholders
            found.append(Finding(kind, start, end, "", 1.0))
    for v in extra_values:  # operator-supplied literal secrets (e.g. from settings) that must never appear
        if v and len(v) >= 8:
            for m in re.finditer(re.escape(v), text):
                found.append(Finding("CONFIGURED_SECRET", m.start(), m.end(), "", 1.0))
    found.sort(key=lambda f: (f.start, -(f.end - f.start)))
    kept: list[Finding] = []
    for f in found:
        if not kept or f.start >= kept[-1].end:
            kept.append(f)
    return kept


def check_secrets(text: str, extra_values: Iterable[str] = (), prefix: str = "") -> CheckResult:
    """``prefix``: the text shown just before ``text`` (a stream), so a key whose first characters were
    shown ("password: ", "-----BEGIN") has the rest masked."""
    findings = find_secrets(prefix + text, extra_values)
    if prefix:
        findings = reaching_into(findings, prefix + text, len(prefix))
    if not findings:
        return CheckResult(True)
    out, pos = [], 0
    for f in findings:
        out += [text[pos:f.start], f"<SECRET:{f.kind}>"]
        pos = f.end
    out.append(text[pos:])
    kinds = sorted({f.kind for f in findings})
    return CheckResult(False, 1.0, f"credentials found: {', '.join(kinds)}", tuple(findings), fixed="".join(out))


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


# What the system prompt quotes is meant to be said ('reply exactly: "I don't know ..."'), so it never counts.
_QUOTED = re.compile(r'"[^"\n]*"|\u201c[^\u201d\n]*\u201d')


def check_system_prompt_leakage(text: str, system_prompt: str | None, *, n: int = 5, threshold: float = 0.25,
                                min_shared: int = 3, run: int = 8, allowed: Iterable[str] = ()) -> CheckResult:
    """Does ``text`` give the system prompt away? Two signals:

    * the share of the system prompt's word n-grams that reappear in ``text`` reaches ``threshold``, with at
      least ``min_shared`` of them (so a short system prompt is not "leaked" by one common phrase);
    * ``text`` repeats ``run`` consecutive words of it verbatim (one sentence of a long prompt is a leak too,
      though a small share of it). Quoted text in the system prompt, and runs that also occur in ``allowed``
      (the retrieved passages: an answer may quote its sources), do not count.

    Works on a streaming window too: pass the text released so far plus the window.
    """
    if not system_prompt:
        return CheckResult(True)
    sp = ngrams(system_prompt, n)
    if not sp:
        sp = ngrams(system_prompt, max(1, len(_WORD.findall(system_prompt.lower()))))
    shared = sp & ngrams(text, n) if sp else set()
    share = len(shared) / len(sp) if sp else 0.0
    by_share = share >= threshold and len(shared) >= min(min_shared, len(sp))
    verbatim = ngrams(_QUOTED.sub(" ", system_prompt), run) & ngrams(text, run)
    for passage in allowed:
        if not verbatim:
            break
        verbatim -= ngrams(passage, run)
    passed = not (by_share or verbatim)
    reason = ("" if passed else f"the answer repeats {share:.0%} of the system prompt" if by_share
              else f"the answer repeats {run}+ consecutive words of the system prompt")
    return CheckResult(passed, round(max(share, 1.0 if verbatim else 0.0), 4), reason,
                       details={"shared_ngrams": len(shared), "verbatim_runs": len(verbatim)})
