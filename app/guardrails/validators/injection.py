# ruff: noqa: E501  (a table of regular expressions reads better unwrapped)
"""Prompt-injection / jailbreak detection: weighted heuristics, similarity to known attacks, and a classifier.

``detect_injection(text)`` runs the heuristics alone (microseconds); pass an :class:`AttackIndex` to add
embedding similarity against the shipped pattern set (``infra/guardrails/data/attack_patterns.yaml``),
which catches close paraphrases, and an :class:`~app.guardrails.validators.injection_model.InjectionClassifier`
(logistic regression over the same embedding, so it costs one dot product) for attacks in new words.
The final score is the largest of the three; when the heuristics alone already reach the threshold the
text is not embedded at all (the other two can only raise the score).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import yaml

from app.guardrails.model_files import save_npz
from app.guardrails.validators.base import CheckResult, Finding, TextEmbedder, chunk_text, normalise

log = logging.getLogger("keel.guardrails")


class ProbabilityModel(Protocol):
    """A classifier over the texts' embeddings (``injection_model.InjectionClassifier``): ``prob(embeddings)`` is
    the probability of an attack per row."""

    def prob(self, embeddings: np.ndarray) -> np.ndarray: ...


SHIPPED_PATTERNS = Path(__file__).resolve().parents[3] / "infra" / "guardrails" / "data" / "attack_patterns.yaml"

_V_IGNORE = r"(?:ignore|disregard|forget|override|bypass|skip|drop|abandon|cancel)"
_PRIOR = r"(?:all\s+|any\s+|the\s+|your\s+|every\s+|of\s+)*(?:previous|prior|above|earlier|preceding|former|initial|original|system|existing)"
_RULES = r"(?:instructions?|rules?|prompts?|directions?|directives?|guidelines?|commands?|context|programming|constraints?|policy|policies)"

# (pattern, weight, label). Weight >= 0.8 is enough on its own; weaker signals add up (capped at 1).
HEURISTICS: list[tuple[re.Pattern[str], float, str]] = [
    (re.compile(rf"\b{_V_IGNORE}\b[^.\n]{{0,20}}\b{_PRIOR}\b[^.\n]{{0,15}}\b{_RULES}\b"), 0.9, "override_instructions"),
    (re.compile(rf"\b{_V_IGNORE}\s+(?:everything|all)\s+(?:you\s+(?:were|have\s+been)\s+told|above|before)"), 0.85,
     "override_instructions"),
    (re.compile(r"\b(?:new|updated|real)\s+(?:instructions?|rules?|task)\s*(?::|override|supersede|replace)"), 0.6,
     "new_instructions"),
    (re.compile(r"\b(?:reveal|print|show|repeat|output|display|leak|tell me|give me|what (?:is|are|were))\b[^.\n]{0,30}"
                r"\b(?:your|the)\s+(?:(?:full|exact|hidden|secret|original|initial|confidential)\s+)*"
                r"(?:system\s+(?:prompt|message|instructions?)|initial\s+prompt|hidden\s+(?:instructions?|prompt)|"
                r"developer\s+message|pre-?prompt)"), 0.85, "prompt_extraction"),
    (re.compile(r"\brepeat\s+(?:the\s+)?(?:words|text)\s+above\b"), 0.85, "prompt_extraction"),
    (re.compile(r"\b(?:you\s+are(?:\s+now)?|act\s+as|pretend\s+(?:to\s+be|you\s+are)|roleplay\s+as)\s+(?:an?\s+)?"
                r"(?:dan|stan|aim|dude|evil|unfiltered|uncensored|unrestricted|jailbroken|amoral)\b"), 0.9, "persona"),
    (re.compile(r"\bdo\s+anything\s+now\b|\bdan\s+mode\b|\bdeveloper\s+mode\b|\bgod\s+mode\b|\bjailbr[eo]ak(?:en)?\s+mode\b"),
     0.85, "persona"),
    (re.compile(r"\b(?:without|with\s+no|free\s+(?:of|from))\s+(?:any\s+)?(?:restrictions?|filters?|limitations?|"
                r"guidelines|ethics|censorship|content\s+polic(?:y|ies)|safety\s+(?:rules|guidelines))\b"), 0.5,
     "no_restrictions"),
    (re.compile(r"\b(?:disable|turn\s+off|deactivate|remove|bypass)\s+(?:your\s+|the\s+|all\s+)?(?:safety|content|"
                r"moderation)?\s*(?:filters?|guardrails?|safeguards?|restrictions|safety\s+(?:mode|settings))\b"), 0.8,
     "disable_safety"),
    (re.compile(r"\b(?:never|do\s+not|don't)\s+(?:refuse|apologi[sz]e|say\s+(?:no|you\s+can'?t))\b"), 0.45,
     "refusal_suppression"),
    (re.compile(r"<\|im_start\|>|<\|system\|>|\[system\]\s*\(|^\s*#{2,}\s*system\s*:|\bsystem\s+override\b", re.M), 0.8,
     "fake_system_tag"),
    (re.compile(r"\b(?:i\s+am|this\s+is)\s+(?:your|an?|the)\s+(?:developer|admin(?:istrator)?|creator|openai\s+employee)\b"
                r"[^.\n]{0,60}\b(?:authori[sz]e|disabled?|override|grant|command)"), 0.8, "authority"),
    (re.compile(r"\b(?:if\s+you\s+are\s+an?\s+(?:ai|language\s+model|assistant)|note\s+to\s+(?:the\s+)?(?:ai|assistant))\b"),
     0.6, "indirect"),
    (re.compile(r"\b(?:decode|follow)\b[^.\n]{0,30}\bbase64\b[^.\n]{0,30}\b(?:instructions?|follow|execute|do)\b"), 0.6,
     "encoding"),
    (re.compile(r"\bhypothetically\b|\bfor\s+(?:a|my)\s+(?:novel|story|screenplay)\b|\bpurely\s+(?:for\s+)?educational\b"),
     0.2, "framing"),
    (re.compile(rf"\b{_V_IGNORE}\b[^.\n]{{0,25}}\b{_RULES}\s+(?:that\s+)?(?:you\s+(?:were|have\s+been)\s+(?:given|told)|you\s+got|"
                r"given\s+to\s+you)"), 0.85, "override_instructions"),
    (re.compile(r"\b(?:ignore|disregard|forget|override|bypass)\s+your\s+(?:own\s+)?(?:programming|rules|instructions|"
                r"guidelines|training|restrictions|filters?|safety\s+\w+|content\s+\w+)"), 0.85, "override_instructions"),
    (re.compile(r"\bignor\w*\s+(?:all\s+)?(?:the\s+)?(?:content|safety)\s+(?:rules|polic(?:y|ies)|filters?|guidelines)"),
     0.7, "override_instructions"),
    (re.compile(r"\binstructions\s+(?:you\s+(?:got|received|were\s+given)\s+)?(?:before\s+|earlier\s+)?(?:were|are)\s+"
                r"(?:fake|a\s+test|wrong|void|revoked|cancell?ed|invalid)|\bpolicy\s+is\s+(?:revoked|void|lifted)"), 0.8,
     "override_instructions"),
    (re.compile(r"\byour\s+(?:real|true|actual)\s+instructions\s+are\b|\b(?:obey|listen\s+to)\s+only\s+me\b|"
                r"\bonly\s+obey\s+me\b"), 0.7, "new_instructions"),
    (re.compile(r"\byour\s+(?:system\s+prompt|(?:hidden|secret|initial|original)\s+(?:instructions|prompt|rules))\b|"
                r"\b(?:text|content|wording)\s+of\s+your\s+(?:instructions|prompt|rules)\b"), 0.6, "prompt_extraction"),
    (re.compile(r"\brepeat\s+(?:everything|all|the\s+text|the\s+words)\s+(?:above|before)"), 0.85, "prompt_extraction"),
    (re.compile(r"\b(?:unfiltered|uncensored|unrestricted|jailbroken|amoral)\s+(?:ai|chatbot|bot|assistant|mode|version|"
                r"model|persona|alter\s+ego)\b|\bno\s+content\s+polic(?:y|ies)\b"), 0.7, "persona"),
    (re.compile(r"\b(?:released|freed|liberated|free|broken\s+free)\s+(?:from|of)\s+(?:your|all|any|the)\s+"
                r"(?:\w+\s+)?(?:limitations|restrictions|rules|constraints|programming|confines)"), 0.8, "persona"),
    (re.compile(r"\b(?:zero|no)\s+(?:ethical|moral)\s+(?:guidelines|constraints|limits|rules|boundaries)|"
                r"\bwhere\s+ethics\s+(?:don'?t|do\s+not)\s+apply\b|\bwith\s+no\s+rules\b"), 0.5, "no_restrictions"),
    (re.compile(r"\b(?:no|without|never\s+\w+\s+any)\s+safety\s+(?:training|rules|guidelines|filters?)"), 0.5,
     "no_restrictions"),
    (re.compile(r"\bso\s+(?:that\s+)?(?:the\s+)?(?:filters?|moderation|moderators?|censors?|safety\s+system)\s+"
                r"(?:can'?t|cannot|won'?t|doesn'?t|does\s+not|will\s+not)"), 0.8, "evasion"),
    (re.compile(r"\b(?:start|begin)\s+(?:your\s+)?(?:reply|answer|response)\s+with\s+[\"']?sure\b"), 0.6,
     "refusal_suppression"),
    (re.compile(r"\b(?:forward|send|email|leak|exfiltrate|upload)\b[^.\n]{0,40}\b(?:the\s+)?user'?s\s+(?:data|contacts|"
                r"passwords?|conversation|history|emails?|files|credentials)"), 0.7, "exfiltration"),
    (re.compile(r"\b(?:grandma|grandmother|granny)\b[^.\n]{0,40}\bused\s+to\s+(?:read|tell|recite|say)"), 0.6, "persona"),
    (re.compile(r"\b(?:nerve\s+gas|napalm|methamphetamine|pipe\s+bomb|explosives?|bombs?|bioweapons?|ricin|sarin|"
                r"malware|ransomware)\b"), 0.4, "harmful_topic"),
    (re.compile(r"\bstep[- ]by[- ]step\b|\bexact\s+(?:chemical\s+)?(?:steps|quantities|recipe)\b|"
                r"\bprecise\s+technical\s+detail\b"), 0.2, "detail_request"),
    # broader, category-level signals (added after a held-out round showed the phrase rules over-fitted)
    (re.compile(r"\b(?:ignore|disregard|forget|skip|drop|bypass|override|set\s+aside)\b[^.\n]{0,40}\b(?:instructions|"
                r"rules|restrictions|guidelines|safety\s+polic(?:y|ies)|content\s+polic(?:y|ies)|(?:the\s+)?operator|"
                r"told\s+you|conversation\s+so\s+far|limitations)\b"), 0.7, "override_instructions"),
    (re.compile(r"\bsystem\s+(?:message|prompt)s?\b|\b(?:your|the)\s+(?:\w+\s+)?(?:pre-?)?prompt\b|\binstructions\s+you\s+"
                r"(?:received|were\s+given|got)\b|\byour\s+(?:instructions|guidelines|configuration)\b"), 0.4,
     "config_reference"),
    (re.compile(r"\b(?:quote|verbatim|word\s+for\s+word|exactly|full\s+text|print|output|reveal|first\s+\d+\s+words)\b"),
     0.3, "reveal_verb"),
    (re.compile(r"\bno\s+longer\s+(?:bound|restricted|limited)\b|\bnever\s+gave\s+you\s+any\s+(?:rules|guidelines)|"
                r"\beven\s+if\s+it\s+(?:violates|breaks|goes\s+against)\b|\b(?:no|without)\s+(?:morals|ethics|limits)\b"),
     0.6, "no_restrictions"),
    (re.compile(r"\b(?:polic(?:y|ies)|filters?|guardrails?|restrictions|safety|moderation)\s+(?:is\s+|are\s+|has\s+been\s+)?"
                r"(?:disabled|off|lifted|suspended|removed|waived)\b|\b(?:approved|granted)\s+an?\s+exception\b"), 0.7,
     "disable_safety"),
    (re.compile(r"\bnever\s+(?:declines?|refuses?|says\s+no)\b|\bmust\s+comply\s+with\s+every\b"), 0.5,
     "refusal_suppression"),
    (re.compile(r"\byou'?re\s+now\s+an?\b|\byou\s+are\s+now\s+an?\b|\bforget\s+(?:that\s+)?you'?(?:re|\s+are)\s+an?\s+"
                r"(?:ai|assistant|language\s+model)"), 0.45, "persona"),
    (re.compile(r"\b(?:attention|dear|hey|hello)\s*,?\s+(?:ai|assistant|language\s+model|llm|chatbot)\b|"
                r"^\s*(?:ai|assistant|language\s+model|llm)\s*:", re.M), 0.6, "indirect"),
    (re.compile(r"\bso\s+(?:that\s+)?(?:nobody|no\s+one|no-one)\b[^.\n]{0,40}\b(?:notices?|sees?|reads?|knows?|catch)"),
     0.8, "evasion"),
    (re.compile(r"\bauthori[sz]\w*\s+you\s+to\b"), 0.5, "authority"),
    (re.compile(r"\[\[?\s*(?:admin|system|developer|root|sudo)\s*\]\]?"), 0.7, "fake_system_tag"),
    (re.compile(r"\bjailbr[eo]a?k\w*\b|\bwithout\s+restrictions\b"), 0.3, "jailbreak_term"),
    (re.compile(r"\b(?:hack|break\s+into)\b[^.\n]{0,30}\b(?:phone|wifi|account|bank|neighbou?r'?s?)\b"), 0.35,
     "harmful_topic"),
]


def heuristic_score(text: str) -> tuple[float, list[Finding]]:
    t = normalise(text)
    findings: list[Finding] = []
    keep = 1.0
    for pattern, weight, label in HEURISTICS:
        m = pattern.search(t)
        if m:
            findings.append(Finding(kind=label, text=m.group(0)[:120], score=weight))
            keep *= 1.0 - weight
    # noisy-or: independent weak signals add up (two 0.4s give 0.64), and never past 1
    return 1.0 - keep, findings


@dataclass(frozen=True, slots=True)
class AttackPattern:
    text: str
    category: str


def load_patterns(paths: Iterable[Path] = ()) -> list[AttackPattern]:
    """Shipped patterns first, then each extra file (same YAML shape: ``patterns: {category: [text, ...]}``)."""
    out: list[AttackPattern] = []
    for path in [SHIPPED_PATTERNS, *paths]:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        groups = data.get("patterns")
        if not isinstance(groups, dict):
            raise ValueError(f"{path}: expected a 'patterns' mapping of category -> list of texts")
        for category, texts in groups.items():
            for t in texts or []:
                if not isinstance(t, str) or not t.strip():
                    raise ValueError(f"{path}: category {category!r} has a non-text pattern")
                out.append(AttackPattern(t.strip(), str(category)))
    return out


class AttackIndex:
    """Embeddings of known attacks; ``similarity(text)`` = best cosine over the text's chunks."""

    def __init__(self, embedder: TextEmbedder, patterns: Sequence[AttackPattern] | None = None) -> None:
        self.embedder = embedder
        self.patterns = list(patterns) if patterns is not None else load_patterns()
        self._matrix: np.ndarray | None = None

    def build(self, cache_dir: Path | None = None) -> AttackIndex:
        """Embed the patterns; with ``cache_dir``, once per embedder and pattern set: the patterns are a bulk
        embedding, which loads the model in torch (~5 s of a start that otherwise needs only the cached int8
        graph), and the vectors are the same every start."""
        texts = [p.text for p in self.patterns]
        fingerprint = getattr(self.embedder, "fingerprint", None)
        if cache_dir is None or not isinstance(fingerprint, str):
            self._matrix = self.embedder.embed_documents(texts)
            return self
        key = hashlib.sha256(json.dumps([fingerprint, texts]).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"attack-index-{key}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                matrix = z["matrix"]
            if matrix.shape[0] == len(texts):
                self._matrix = matrix
                return self
        except (OSError, KeyError, ValueError):  # not cached yet, or an unreadable file: embed again
            pass
        self._matrix = self.embedder.embed_documents(texts)
        try:
            save_npz(path, matrix=self._matrix)
        except OSError as e:  # an unwritable cache costs the embedding at the next start, not this one
            log.warning("attack index not cached in %s (%s)", path.parent, e)
        return self

    def add(self, patterns: Sequence[AttackPattern]) -> None:
        self.patterns.extend(patterns)
        self.build()

    def embed(self, text: str) -> np.ndarray:
        """The text's chunk embeddings (rows); empty when the text is blank."""
        chunks = chunk_text(text, max_chars=300, max_chunks=12)
        if not chunks:
            return np.zeros((0, 0), dtype=np.float32)
        return self.embedder.embed_documents(chunks)

    def nearest(self, q: np.ndarray) -> tuple[float, AttackPattern | None]:
        """Best cosine between any row of ``q`` and any known attack."""
        if self._matrix is None:
            self.build()
        if q.size == 0:
            return 0.0, None
        sims = q @ self._matrix.T
        i, j = np.unravel_index(int(np.argmax(sims)), sims.shape)
        return float(sims[i, j]), self.patterns[int(j)]

    def similarity(self, text: str) -> tuple[float, AttackPattern | None]:
        return self.nearest(self.embed(text))


def detect_injection(
    text: str, index: AttackIndex | None = None, *, threshold: float = 0.5,
    sim_floor: float = 0.55, sim_ceiling: float = 0.75,
    classifier: ProbabilityModel | None = None, clf_floor: float = 0.3, clf_ceiling: float = 0.9,
) -> CheckResult:
    """Flag ``text`` when its risk score reaches ``threshold``.

    Similarity is mapped linearly from [sim_floor, sim_ceiling] to [0, 1], so with the defaults a cosine of
    0.65 to a known attack scores 0.5. The classifier's probability is mapped from [clf_floor, clf_ceiling],
    so P(attack) = 0.6 scores 0.5: a cross-validated operating point on the training files (recall ~0.92,
    false positives ~3%) that is stricter than 0.5 because a false alarm refuses a real user's question.
    The classifier needs the index (it reuses the index's embedding of the text).
    """
    if classifier is not None and index is None:
        raise ValueError("the injection classifier needs an AttackIndex (it reuses its embeddings)")
    h_score, findings = heuristic_score(text)
    sim, pattern = (0.0, None)
    sim_score = clf_score = prob = 0.0
    embedded = False
    if index is not None and text.strip() and h_score < threshold:
        q = index.embed(text)
        embedded = q.size > 0
        sim, pattern = index.nearest(q)
        sim_score = min(1.0, max(0.0, (sim - sim_floor) / (sim_ceiling - sim_floor)))
        if pattern is not None and sim_score > 0:
            findings.append(Finding(kind=f"similar:{pattern.category}", text=pattern.text, score=round(sim, 4)))
        if classifier is not None and embedded:
            prob = float(classifier.prob(q).max())
            clf_score = min(1.0, max(0.0, (prob - clf_floor) / (clf_ceiling - clf_floor)))
            if clf_score >= threshold:
                findings.append(Finding(kind="classifier", score=round(prob, 4)))
    score = max(h_score, sim_score, clf_score)
    passed = score < threshold
    reason = "" if passed else (
        "prompt injection / jailbreak attempt detected ("
        + ", ".join(sorted({f.kind for f in findings})) + ")"
    )
    details = {"heuristic": round(h_score, 4), "similarity": round(sim, 4), "embedded": embedded}
    if classifier is not None:
        details["classifier"] = round(prob, 4)
    return CheckResult(passed, round(score, 4), reason, tuple(findings), details=details)
