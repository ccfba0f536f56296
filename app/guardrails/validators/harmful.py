"""Harmful-request detection: a small, shipped, offline classifier over the guard's MiniLM embeddings.

What it refuses: requests for help doing serious harm, in categories (``CATEGORIES``): violence and
weapons/explosives, chemical/biological/radiological agents, cyber attacks and malware, illegal drugs,
self-harm and suicide methods, sexual content involving minors, fraud/scams/theft, hate and harassment,
stalking and exposure of private people, and disinformation campaigns. What it must let through: the
edgy-but-fine requests that share those words (the history of a war, how vaccines work, chemistry homework,
security concepts at a defensive level, cooking with knives, fiction with conflict, a pharmacist's dosage
question, "how do I kill a Python process", "shoot a photo", questions about Keel itself).

How (same recipe as ``injection_model.py``): L2-regularised, class-balanced logistic regression over the
text's embeddings, which the model-backed guards already compute (the text is chunked exactly like
``AttackIndex.embed``, so the shared embedder's cache answers and the check costs a few dot products).

one model per category, trained on that category's requests against all the benign texts. The score of a
text is the largest probability over its chunks and the categories, and that category names it (which picks
the refusal: self-harm gets a supportive one pointing to help, see the default policy).

Training data is ``infra/guardrails/data/harmful_requests.yaml``, written for Keel (no downloads). A fixed
fifth of every list (chosen by a hash of the text, see :func:`is_dev`) is the dev split: ``split="train"``
leaves it out, so the threshold can be chosen on texts the model did not see (:func:`dev_rates`); the
shipped classifier trains on everything. The public held-out sets (``bench/guardrails.py``) are never read.
The fit takes well under a second; embedding the ~1,000 texts takes seconds, so the weights are cached as
``.npz`` (no pickle) under the guardrails cache, keyed by the data, the embedder and the hyper-parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from app.guardrails.validators.base import CheckResult, Finding, TextEmbedder, chunk_text
from app.guardrails.validators.injection import SHIPPED_PATTERNS
from app.guardrails.validators.injection_model import fit_logistic

log = logging.getLogger("keel.guardrails")

HARMFUL_SET = SHIPPED_PATTERNS.parent / "harmful_requests.yaml"
# bump when the features or the fit change, so cached weights from an older trainer are not reused
TRAINER_VERSION = 1
DEV_FRACTION = 5  # one text in DEV_FRACTION (by hash) is the dev split
# L2 strength of the fits, chosen on the dev split (recall at 3% false positives there, an earlier version of
# the data: 0.003 and 0.01 75%, 0.1 69%, 1.0 lower)
DEFAULT_L2 = 0.003

CATEGORIES: dict[str, str] = {
    "violence_weapons": "weapons, explosives, and planning violence against people",
    "cbrn": "chemical, biological, radiological or nuclear weapons and toxins",
    "cyber": "malware, intrusion, account takeover and other cyber attacks",
    "drugs": "making, trafficking or concealing illegal drugs",
    "self_harm": "suicide and self-harm methods, eating-disorder coaching",
    "sexual_minors": "sexual content involving minors, grooming",
    "fraud_crime": "fraud, scams, theft, counterfeiting, evading the law",
    "hate_harassment": "hate speech, harassment, bullying, extremist propaganda",
    "privacy": "stalking, doxxing, covert surveillance of a person",
    "disinformation": "disinformation campaigns, fake reviews or news, impersonation",
}

Split = Literal["all", "train", "dev"]


def is_dev(text: str) -> bool:
    """The fixed dev split: a text's place does not depend on the rest of the file."""
    return hashlib.sha256(text.encode("utf-8")).digest()[0] % DEV_FRACTION == 0


def _texts(items: object, where: str) -> list[str]:
    """A list of texts, or a mapping of group name -> list of texts (flattened)."""
    if isinstance(items, dict):
        return [t for k, v in items.items() for t in _texts(v, f"{where}.{k}")]
    if not isinstance(items, list) or not all(isinstance(t, str) and t.strip() for t in items):
        raise ValueError(f"{where} must be a list of non-empty texts (or a mapping of such lists)")
    return [t.strip() for t in items]


def load_training_data(path: Path = HARMFUL_SET, *, split: Split = "all"
                       ) -> tuple[list[str], np.ndarray, list[str]]:
    """Texts, labels (1 = harmful) and categories ("" for benign). Duplicates are dropped; a text labelled
    both ways, or under two categories, is an error; an unknown category is an error.

    ``harmful_actions`` / ``benign_actions`` are expanded with every entry of ``templates``; their dev split
    is by action (all phrasings of an action on the same side), the plain lists' by text."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not isinstance(data.get("harmful"), dict) or "benign" not in data:
        raise ValueError(f"{path}: expected 'harmful' (category -> texts) and 'benign' (texts or groups)")
    templates = _texts(data.get("templates", []), "templates")
    if any("{action}" not in t for t in templates):
        raise ValueError(f"{path}: every template needs an '{{action}}' slot")
    group: dict[str, str] = {}  # text -> the key of its dev split

    def expand(actions: list[str]) -> list[str]:
        out = []
        for a in actions:
            for t in templates:
                text = t.format(action=a)
                group.setdefault(text, a)
                out.append(text)
        return out

    cats: dict[str, str] = {}
    for source, expander in ((data["harmful"], list), (data.get("harmful_actions") or {}, expand)):
        if not isinstance(source, dict):
            raise ValueError(f"{path}: harmful lists must be mappings of category -> texts")
        for cat, items in source.items():
            if cat not in CATEGORIES:
                raise ValueError(f"{path}: unknown category {cat!r}; known: {', '.join(CATEGORIES)}")
            for t in expander(_texts(items, f"harmful.{cat}")):
                if cats.setdefault(t, cat) != cat:
                    raise ValueError(f"{path}: {t!r} is under both {cats[t]!r} and {cat!r}")
    benign = list(dict.fromkeys(_texts(data["benign"], "benign")
                                + expand(_texts(data.get("benign_actions", []), "benign_actions"))))
    both = set(cats) & set(benign)
    if both:
        raise ValueError(f"{path}: texts labelled both harmful and benign: {sorted(both)[:3]}")
    if split == "all":
        def keep(t: str) -> bool:
            return True
    else:
        def keep(t: str) -> bool:
            return is_dev(group.get(t, t)) == (split == "dev")
    harmful = [t for t in cats if keep(t)]
    benign = [t for t in benign if keep(t)]
    texts = harmful + benign
    labels = np.array([1.0] * len(harmful) + [0.0] * len(benign))
    return texts, labels, [cats[t] for t in harmful] + [""] * len(benign)


@dataclass(frozen=True, eq=False)  # arrays: identity equality, not an ambiguous elementwise ==
class HarmfulClassifier:
    """``weights`` (K, d), ``biases`` (K,): row k is ``categories[k]`` vs the benign texts."""

    weights: np.ndarray
    biases: np.ndarray
    categories: tuple[str, ...]
    key: str = ""
    n_train: int = 0

    def probs(self, embeddings: np.ndarray) -> np.ndarray:
        """P(category k rather than benign) per row and category."""
        z = (np.asarray(embeddings, dtype=np.float32) @ self.weights.T + self.biases).astype(np.float64)
        return 1.0 / (1.0 + np.exp(-z))

    def prob(self, embeddings: np.ndarray) -> np.ndarray:
        """P(harmful) per row: the most confident category."""
        return self.probs(embeddings).max(axis=1)

    def score(self, embeddings: np.ndarray) -> tuple[float, str]:
        """The text's score (the largest probability over its chunk rows and the categories) and that category."""
        if embeddings.size == 0:
            return 0.0, ""
        p = self.probs(embeddings)
        i, k = np.unravel_index(int(np.argmax(p)), p.shape)
        return float(p[i, k]), self.categories[int(k)]

    @classmethod
    def train(cls, embedder: TextEmbedder, texts: Sequence[str], labels: np.ndarray, cats: Sequence[str], *,
              l2: float = DEFAULT_L2, key: str = "") -> HarmfulClassifier:
        x = embedder.embed_documents(list(texts))
        return cls.fit(x, labels, cats, l2=l2, key=key)

    @classmethod
    def fit(cls, x: np.ndarray, labels: np.ndarray, cats: Sequence[str], *, l2: float = DEFAULT_L2,
            key: str = "") -> HarmfulClassifier:
        """One category-vs-benign model per category. Why not one harmful-vs-benign hyperplane: the harmful
        requests are ten separate clusters (weapons, malware, self-harm, ...), each next to its own benign
        neighbours; at 90% recall on the dev split one plane through all of them flagged 19% of its benign texts,
        the per-category planes 5% (an earlier, smaller version of the data)."""
        cat_arr = np.array(list(cats))
        benign = labels == 0
        names = tuple(c for c in CATEGORIES if c in set(cats))
        rows = []
        for c in names:
            m = (cat_arr == c) | benign
            rows.append(fit_logistic(x[m], (cat_arr[m] == c).astype(np.float64), l2=l2))
        w = np.stack([r[0] for r in rows]).astype(np.float32)
        b = np.array([r[1] for r in rows], dtype=np.float32)
        return cls(w, b, names, key, len(labels))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # write-then-rename: two workers starting together never read a half-written file
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
        os.close(fd)
        try:
            np.savez(tmp, weights=self.weights, biases=self.biases, categories=np.array(self.categories, dtype=str),
                     key=np.array(self.key), n_train=np.array([self.n_train]))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: Path, *, key: str, dim: int) -> HarmfulClassifier | None:
        """The cached model, or None when it is missing, unreadable or for other data / another embedder."""
        try:
            with np.load(path, allow_pickle=False) as z:
                cats = tuple(str(c) for c in z["categories"])
                if str(z["key"]) != key or z["weights"].shape != (len(cats), dim):
                    return None
                return cls(z["weights"].astype(np.float32), z["biases"].astype(np.float32), cats, key,
                           int(z["n_train"][0]))
        except (OSError, KeyError, ValueError):
            return None


def training_key(texts: Sequence[str], labels: np.ndarray, cats: Sequence[str], embedder_id: str,
                 l2: float) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": TRAINER_VERSION, "embedder": embedder_id, "l2": l2}, sort_keys=True).encode())
    for t, y, c in zip(texts, labels, cats, strict=True):
        h.update(f"{int(y)}\t{c}\t{t}\n".encode())
    return h.hexdigest()


def load_or_train(embedder: TextEmbedder, cache_dir: Path | None, *, data_file: Path = HARMFUL_SET,
                  l2: float = DEFAULT_L2, split: Split = "all") -> HarmfulClassifier:
    """Load the cached classifier for the current data and embedder, else train it (and cache it).

    ``cache_dir=None`` or an embedder without a ``fingerprint`` (a test double) trains in memory only: a
    cache keyed by an unknown embedder could serve weights fitted to different vectors.
    """
    texts, labels, cats = load_training_data(data_file, split=split)
    fingerprint = getattr(embedder, "fingerprint", None)
    key = training_key(texts, labels, cats, str(fingerprint), l2)
    path = cache_dir / f"harmful-clf-{key[:16]}.npz" if cache_dir is not None and fingerprint else None
    if path is not None and path.exists():
        dim = int(embedder.embed_documents(["x"]).shape[1])
        cached = HarmfulClassifier.load(path, key=key, dim=dim)
        if cached is not None:
            return cached
    clf = HarmfulClassifier.train(embedder, texts, labels, cats, l2=l2, key=key)
    if path is not None:
        try:
            clf.save(path)
        except OSError as e:  # a read-only home only costs a retrain at the next start
            log.warning("could not cache the harmful-request classifier at %s: %s", path, e)
    log.info("trained the harmful-request classifier on %d texts (%d harmful)", len(texts), int(labels.sum()))
    return clf


def embed_chunks(embedder: TextEmbedder, text: str) -> np.ndarray:
    """The text's chunk embeddings, chunked like ``AttackIndex.embed`` (so the embedder's cache is shared)."""
    chunks = chunk_text(text, max_chars=300, max_chunks=12)
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return embedder.embed_documents(chunks)


def check_harmful(text: str, classifier: HarmfulClassifier, embed: Callable[[str], np.ndarray], *,
                  threshold: float = 0.5, categories: Sequence[str] | None = None,
                  exclude: Sequence[str] = ()) -> CheckResult:
    """Flag ``text`` when P(harmful) reaches ``threshold`` and its category is one this entry refuses
    (``categories``: only these; ``exclude``: all but these). ``embed(text)`` gives the chunk rows."""
    if not text.strip():
        return CheckResult(True, details={"skipped": "empty"})
    prob, cat = classifier.score(embed(text))
    mine = (categories is None or cat in categories) and cat not in exclude
    flagged = prob >= threshold and mine
    details = {"probability": round(prob, 4), "other_category": bool(prob >= threshold and not mine)}
    if not flagged:
        return CheckResult(True, round(prob, 4), details=details)
    return CheckResult(False, round(prob, 4), f"harmful request ({cat.replace('_', ' ')})",
                       (Finding(kind=f"harmful:{cat}", score=round(prob, 4)),), details=details)


@dataclass(frozen=True)
class DevRates:
    threshold: float
    recall: float
    false_positive_rate: float
    harmful: int
    benign: int


def dev_rates(embedder: TextEmbedder, thresholds: Sequence[float], *, data_file: Path = HARMFUL_SET,
              l2: float = DEFAULT_L2) -> list[DevRates]:
    """Train on the train split, measure recall / false positives on the dev split per threshold: how the
    shipped threshold was chosen (no held-out data involved)."""
    tr_texts, tr_labels, tr_cats = load_training_data(data_file, split="train")
    clf = HarmfulClassifier.train(embedder, tr_texts, tr_labels, tr_cats, l2=l2)
    dv_texts, dv_labels, _ = load_training_data(data_file, split="dev")
    p = np.array([clf.score(embed_chunks(embedder, t))[0] for t in dv_texts])
    h, b = p[dv_labels == 1], p[dv_labels == 0]
    return [DevRates(t, float((h >= t).mean()), float((b >= t).mean()), len(h), len(b)) for t in thresholds]
