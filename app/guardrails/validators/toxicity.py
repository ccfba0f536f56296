"""Toxicity / profanity: a shipped word list (leetspeak-normalised), threat and hate phrases, and the
``alt-profanity-check`` linear classifier (a scikit-learn model inside the PyPI package, offline).

``better-profanity`` was evaluated and not used: its 900-word list flags "kill", "god", "gay", "hell",
"hiv", "drunk", "breasts" (benign technical, identity and medical questions) and costs 7-11 ms a call.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from app.guardrails.validators.base import CheckResult, Finding

log = logging.getLogger("keel.guardrails")

WORDLIST = Path(__file__).resolve().parents[3] / "infra" / "guardrails" / "data" / "profanity.txt"
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i",
                       "*": "u"})
_THREATS = [
    (re.compile(r"\b(?:i(?:'ll| will| am going to|'m going to| gonna)|we(?:'ll| will))\s+(?:kill|murder|hurt|rape|"
                r"beat|shoot|stab)\s+(?:you|u|your)\b"
                # "find you" is a threat only with intent: "we'll find you a table" is service.
                r"|\b(?:i(?:'ll| will)|we(?:'ll| will))\s+(?:hunt\s+you\s+down|find\s+(?:you|where\s+you\s+live)"
                r"\s+and\s+(?:kill|hurt|make))", re.I), "threat"),
    (re.compile(r"\b(?:kill|hurt)\s+your\s*self\b|\bkys\b|\bgo\s+die\b", re.I), "self_harm_incitement"),
    (re.compile(r"\b(?:women|men|blacks|whites|jews|muslims|christians|gays|immigrants|asians|mexicans)\s+(?:are|should\s+be)"
                r"\s+(?:inferior|subhuman|animals|vermin|beaten|killed|exterminated|shot|deported)", re.I), "hate"),
    (re.compile(r"\b(?:you(?:'re| are)|ur)\s+(?:a\s+|an\s+|so\s+)?(?:stupid|worthless|pathetic|useless|disgusting)\b"
                r"(?:\s+(?:idiot|piece|loser|waste))?", re.I), "insult"),
]


@lru_cache(maxsize=4)
def _wordlist_re(path: str) -> re.Pattern[str]:
    words = [w.strip().lower() for w in Path(path).read_text(encoding="utf-8").splitlines()
             if w.strip() and not w.startswith("#")]
    alt = "|".join(sorted(map(re.escape, words), key=len, reverse=True))
    return re.compile(rf"\b(?:{alt})(?:s|es|ed|er|ers|ing|in)?\b")


class ProfanityClassifier:
    """alt-profanity-check (sigmoid-calibrated linear SVMs on TF-IDF); loaded once in :meth:`load` (~1 s).

    Its ``predict_prob`` spends ~3-8 ms a call in scikit-learn's input validation, for what is five dot
    products with one sparse row. :meth:`load` extracts the TF-IDF vocabulary and those linear models and
    computes the same probability from the analyser's tokens with a few small numpy operations (~0.05 ms;
    ~0.4 ms through the vectoriser's ``transform``, which is again mostly input validation), after checking
    on sample texts that both agree; with a model of another shape, or if they disagree, it keeps
    ``predict_prob``.
    """

    _SELF_CHECK = ("what a lovely day", "you are a stupid idiot", "how do I kill a python process",
                   "shut the hell up", "the weather in Paris is mild in spring")

    def __init__(self) -> None:
        self._predict = None
        self._fast: tuple[object, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        import importlib.util

        return importlib.util.find_spec("profanity_check") is not None

    def load(self) -> ProfanityClassifier:
        with self._lock:
            if self._predict is None:
                from profanity_check import predict_prob

                predict_prob(["warm up"])
                self._predict = predict_prob
                self._fast = self._extract_linear()
        return self

    def _extract_linear(self):
        try:
            from profanity_check import profanity_check as pc

            model, vectorizer = pc.model, pc.vectorizer
            if getattr(model, "method", None) != "sigmoid" or len(model.classes_) != 2:
                return None
            if (vectorizer.norm != "l2" or not vectorizer.use_idf or vectorizer.sublinear_tf or vectorizer.binary
                    or vectorizer.analyzer != "word"):
                return None
            cals = model.calibrated_classifiers_
            coef = np.vstack([np.ravel(c.estimator.coef_) for c in cals])
            intercept = np.array([float(np.ravel(c.estimator.intercept_)[0]) for c in cals])
            a = np.array([float(c.calibrators[0].a_) for c in cals])
            b = np.array([float(c.calibrators[0].b_) for c in cals])
            fast = (vectorizer.build_analyzer(), dict(vectorizer.vocabulary_), np.asarray(vectorizer.idf_),
                    coef.T.copy(), intercept, a, b)
        except (AttributeError, ImportError, IndexError, TypeError, ValueError):
            return None
        texts = list(self._SELF_CHECK)
        if not np.allclose(self._fast_prob(fast, texts), self._predict(texts), atol=1e-9):
            log.warning("alt-profanity-check's model changed shape; using its slower predict_prob")
            return None
        return fast

    @staticmethod
    def _fast_prob(fast, texts: list[str]) -> np.ndarray:
        analyze, vocab, idf, coef_t, intercept, a, b = fast
        d = np.empty((len(texts), coef_t.shape[1]))
        for row, text in enumerate(texts):
            counts: dict[int, int] = {}
            for token in analyze(text):
                j = vocab.get(token)
                if j is not None:
                    counts[j] = counts.get(j, 0) + 1
            if not counts:
                d[row] = intercept  # an all-zero TF-IDF row
                continue
            cols = np.fromiter(counts, dtype=np.intp, count=len(counts))
            w = np.fromiter(counts.values(), dtype=np.float64, count=len(counts)) * idf[cols]
            d[row] = (w / np.sqrt(w @ w)) @ coef_t[cols] + intercept  # l2-normalised TF-IDF . coef
        # scikit-learn's _SigmoidCalibration: expit(-(a * d + b)), averaged over the calibrated models
        return (1.0 / (1.0 + np.exp(a * d + b))).mean(axis=1)

    def prob(self, text: str) -> float:
        if self._predict is None:
            self.load()
        if self._fast is not None:
            return float(self._fast_prob(self._fast, [text])[0])
        return float(self._predict([text])[0])


def _normalise_leet(text: str) -> str:
    # only translate characters inside words so "50 $" stays a number and a price
    return re.sub(r"\b\w*[0-9@$!*]\w*\b|\w+[@$!*]\w*", lambda m: m.group(0).translate(_LEET), text.lower())


# Someone is addressed: abuse needs a target. "Is it stupid to buy a used car?" is not abuse, though the
# classifier, a bag of words, gives it 0.92 ("stupid" alone scores 1.0).
_ADDRESSED = re.compile(r"\b(?:you|your|yours|yourself|you're|youre|u|ur|ya)\b", re.I)
_QUOTES = {"'": "'", '"': '"', "\u2018": "\u2019", "\u201c": "\u201d"}
# a classifier verdict on text that addresses no one, and a listed word that is quoted (talked about, not
# used: "what does 'bastard' mean?"), weigh this much: below the default threshold, above a strict one
_MENTION_WEIGHT = 0.8


def _quoted(text: str, start: int, end: int) -> bool:
    """The span ``text[start:end]`` is a quoted word or phrase."""
    opening = text[start - 1] if start > 0 else ""
    return opening in _QUOTES and text[end:end + 1] == _QUOTES[opening]


def check_toxicity(text: str, *, threshold: float = 0.85, classifier: ProfanityClassifier | None = None,
                   wordlist: Path = WORDLIST) -> CheckResult:
    """Score = max(word list hit 0.95, threat/hate phrase 0.9, classifier probability), where a quoted listed
    word and a classifier verdict on text that addresses no one count x0.8. ``fixed`` masks the listed
    words (``f***``) for policies that redact rather than block. Measured on the labelled sets in
    infra/guardrails/data/validator_sets.yaml (tests/unit/test_guardrails_rates.py)."""
    findings: list[Finding] = []
    norm = _normalise_leet(text)
    rx = _wordlist_re(str(wordlist))
    for m in rx.finditer(norm):
        findings.append(Finding("profanity", m.start(), m.end(), "",
                                0.95 * _MENTION_WEIGHT if _quoted(text, m.start(), m.end()) else 0.95))
    for pattern, label in _THREATS:
        m = pattern.search(text)
        if m:
            findings.append(Finding(label, m.start(), m.end(), "", 0.9))
    prob = classifier.prob(text) if classifier is not None else 0.0
    if prob and not _ADDRESSED.search(text):
        prob *= _MENTION_WEIGHT
    score = max([prob, *(f.score for f in findings)]) if findings or prob else 0.0
    passed = score < threshold
    fixed = None
    if not passed:
        # mask the listed words in the original text (same length after leet normalisation)
        chars = list(text)
        for f in findings:
            if f.kind == "profanity":
                for i in range(f.start + 1, f.end):
                    chars[i] = "*"
        fixed = "".join(chars)
    kinds = sorted({f.kind for f in findings}) or (["classifier"] if not passed else [])
    return CheckResult(passed, round(score, 4), "" if passed else f"toxic content ({', '.join(kinds)})",
                       tuple(findings), fixed=fixed, details={"classifier": round(prob, 4)})
