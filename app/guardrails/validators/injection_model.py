"""A small, shipped, offline injection/jailbreak classifier: L2 logistic regression over sentence embeddings.

Why: the regular expressions only catch the phrasings someone wrote a rule for, and nearest-neighbour
similarity to known attacks only catches close paraphrases (27% recall on a never-tuned attack set). A linear
model over the same MiniLM embeddings learns the *direction* that separates attacks from ordinary requests
(including hard negatives that merely mention prompts, passwords or rules), and it costs one dot product:
the embedding is already computed for the similarity check.

Training data is Keel's own labelled files (no downloads): every attack in ``attack_patterns.yaml`` (and in
extra pattern files), every split of ``eval_set.yaml`` and ``injection_train.yaml``. The fit is a few Newton
steps (a second at most); embedding the ~500 texts is what costs (seconds), so the weights are cached on disk
as ``.npz`` (no pickle), keyed by a hash of the training texts, the embedding model and the hyper-parameters,
and retrained automatically when any of them changes.

The held-out evaluation set (``tests/data/guardrails/injection_heldout.yaml``) is never read here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from app.guardrails.model_files import save_npz
from app.guardrails.validators.base import TextEmbedder
from app.guardrails.validators.injection import SHIPPED_PATTERNS, load_patterns

log = logging.getLogger("keel.guardrails")

DATA_DIR = SHIPPED_PATTERNS.parent
EVAL_SET = DATA_DIR / "eval_set.yaml"
TRAIN_SET = DATA_DIR / "injection_train.yaml"
# bump when the features or the fit change, so cached weights from an older trainer are not reused
TRAINER_VERSION = 1


def _labelled_lists(path: Path) -> tuple[list[str], list[str]]:
    """Attacks and benign texts of a labelled file: keys ending in 'attacks' / 'benign' (any split prefix)."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with '*attacks' and '*benign' lists")
    attacks: list[str] = []
    benign: list[str] = []
    for key, items in data.items():
        if not (str(key).endswith("attacks") or str(key).endswith("benign")):
            continue
        if not isinstance(items, list) or not all(isinstance(t, str) and t.strip() for t in items):
            raise ValueError(f"{path}: {key!r} must be a list of non-empty texts")
        (attacks if str(key).endswith("attacks") else benign).extend(t.strip() for t in items)
    return attacks, benign


def load_training_data(extra_pattern_files: Iterable[Path] = (),
                       labelled_files: Sequence[Path] = (EVAL_SET, TRAIN_SET)) -> tuple[list[str], np.ndarray]:
    """Texts and labels (1 = attack). Duplicates are dropped; a text labelled both ways is an error."""
    attacks = [p.text for p in load_patterns(list(extra_pattern_files))]
    benign: list[str] = []
    for path in labelled_files:
        a, b = _labelled_lists(path)
        attacks += a
        benign += b
    a_set, b_set = dict.fromkeys(attacks), dict.fromkeys(benign)
    both = set(a_set) & set(b_set)
    if both:
        raise ValueError(f"texts labelled both attack and benign: {sorted(both)[:3]}")
    texts = list(a_set) + list(b_set)
    labels = np.array([1.0] * len(a_set) + [0.0] * len(b_set))
    return texts, labels


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1.0, max_iter: int = 50, tol: float = 1e-8
                 ) -> tuple[np.ndarray, float]:
    """Class-balanced, L2-regularised logistic regression by Newton's method (bias not regularised).

    Balanced weights because the files hold fewer attacks than benign texts and a missed attack and a
    false alarm should weigh the same per class. Newton converges in ~10 steps at this size (d=384).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = x.shape
    if n == 0 or not (0 < y.sum() < n):
        raise ValueError("training data needs both attacks and benign texts")
    pos = y.sum()
    sw = np.where(y == 1, n / (2 * pos), n / (2 * (n - pos)))
    xa = np.hstack([x, np.ones((n, 1))])
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0
    w = np.zeros(d + 1)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(xa @ w)))
        grad = xa.T @ (sw * (p - y)) + reg * w
        hess = (xa * (sw * p * (1 - p))[:, None]).T @ xa + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < tol:
            break
    return w[:-1].astype(np.float32), float(w[-1])


@dataclass(frozen=True, eq=False)  # arrays: identity equality, not an ambiguous elementwise ==
class InjectionClassifier:
    """``prob(embeddings)`` = P(attack) per row; the text's probability is the max over its chunks."""

    weights: np.ndarray
    bias: float
    key: str = ""
    n_train: int = 0

    def prob(self, embeddings: np.ndarray) -> np.ndarray:
        z = np.asarray(embeddings, dtype=np.float32) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))

    @classmethod
    def train(cls, embedder: TextEmbedder, texts: Sequence[str], labels: np.ndarray, *, l2: float = 1.0,
              key: str = "") -> InjectionClassifier:
        x = embedder.embed_documents(list(texts))
        w, b = fit_logistic(x, labels, l2=l2)
        return cls(w, b, key, len(texts))

    def save(self, path: Path) -> None:
        save_npz(path, weights=self.weights, bias=np.array([self.bias]), key=np.array(self.key),
                 n_train=np.array([self.n_train]))

    @classmethod
    def load(cls, path: Path, *, key: str, dim: int) -> InjectionClassifier | None:
        """The cached model, or None when it is missing, unreadable or for other data / another embedder."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) != key or z["weights"].shape != (dim,):
                    return None
                return cls(z["weights"].astype(np.float32), float(z["bias"][0]), key, int(z["n_train"][0]))
        except (OSError, KeyError, ValueError):
            return None


def training_key(texts: Sequence[str], labels: np.ndarray, embedder_id: str, l2: float) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": TRAINER_VERSION, "embedder": embedder_id, "l2": l2}, sort_keys=True).encode())
    for t, y in zip(texts, labels, strict=True):
        h.update(f"{int(y)}\t{t}\n".encode())
    return h.hexdigest()


def load_or_train(embedder: TextEmbedder, cache_dir: Path | None, *, extra_pattern_files: Iterable[Path] = (),
                  l2: float = 1.0) -> InjectionClassifier:
    """Load the cached classifier for the current data and embedder, else train it (and cache it).

    ``cache_dir=None`` or an embedder without a ``fingerprint`` (a test double) trains in memory only: a
    cache keyed by an unknown embedder could serve weights fitted to different vectors.
    """
    texts, labels = load_training_data(extra_pattern_files)
    fingerprint = getattr(embedder, "fingerprint", None)
    key = training_key(texts, labels, str(fingerprint), l2)
    path = cache_dir / f"injection-clf-{key[:16]}.npz" if cache_dir is not None and fingerprint else None
    if path is not None and path.exists():
        dim = int(embedder.embed_documents(["x"]).shape[1])
        cached = InjectionClassifier.load(path, key=key, dim=dim)
        if cached is not None:
            return cached
    clf = InjectionClassifier.train(embedder, texts, labels, l2=l2, key=key)
    if path is not None:
        try:
            clf.save(path)
        except OSError as e:  # an unwritable cache only costs a retrain at the next start
            log.warning("could not cache the injection classifier at %s: %s", path, e)
    log.info("trained the injection classifier on %d texts (%d attacks)", len(texts), int(labels.sum()))
    return clf
