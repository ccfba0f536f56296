"""Second-stage rerankers: rescore the fused (dense + BM25) candidates with a slower, finer model.

Two kinds, chosen per collection (``RerankConfig``):

- ``late_interaction``: no model beyond the embedding model. One forward pass over the candidates gives each
  candidate's token vectors and its pooled embedding; the score is ColBERT's MaxSim (each query token's best
  match among the passage's tokens, averaged) plus the pooled cosine. MiniLM was not trained for MaxSim, so
  the token term alone ranks worse than the pooled cosine; the sum beats either (bench/retrieval_quality.py).
  Token vectors are cached per passage text, so candidates that recur across queries cost nothing.
- ``cross_encoder``: a sentence-transformers ``CrossEncoder`` folder, loaded by path, offline. No registry
  ships one that loads offline (checked), so Keel does not default to it; bring your own.

Both cost one transformer pass over ``top_n`` passages per query (~tens of ms per passage on 2 CPU cores):
that, not the corpus size, sets the rerank latency.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ingest.errors import EmbeddingModelError
from ingest.settings import RerankConfig


@runtime_checkable
class Reranker(Protocol):
    @property
    def name(self) -> str: ...

    def warm_up(self) -> None: ...

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """One relevance score per passage, higher is better (comparable within one call only)."""
        ...


def maxsim(query_tokens: np.ndarray, passage_tokens: np.ndarray) -> float:
    """ColBERT's late interaction: mean over query tokens of the best cosine among the passage's tokens
    (rows L2-normalised)."""
    if not len(query_tokens) or not len(passage_tokens):
        return 0.0
    return float((query_tokens @ passage_tokens.T).max(axis=1).mean())


def token_pass(model: Any, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pooled embedding, token vectors) per text from one forward pass of a sentence-transformers model;
    token rows L2-normalised, without the [CLS]/[SEP] positions and padding."""
    import torch

    features = model.preprocess(texts)
    with torch.inference_mode():
        out = model(features)
    pooled = out["sentence_embedding"].float()
    pooled = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
    tokens = torch.nn.functional.normalize(out["token_embeddings"].float(), dim=-1).cpu().numpy()
    mask = out["attention_mask"].cpu().numpy().astype(bool)
    result = []
    for i in range(len(texts)):
        n = int(mask[i].sum())
        result.append((pooled[i], tokens[i, 1:max(n - 1, 1)]))
    return result


class LateInteractionReranker:
    """MaxSim + pooled cosine with the embedding model's own weights (see the module docstring)."""

    def __init__(self, model: Callable[[], Any], *, cache_size: int = 2048, batch_size: int = 16) -> None:
        self._model = model
        self._batch = batch_size
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "late_interaction"

    def warm_up(self) -> None:
        self._encode(["warm up"])

    def _encode(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        keys = [hashlib.blake2b(t.encode(), digest_size=16).hexdigest() for t in texts]
        with self._lock:
            found = {k: self._cache[k] for k in keys if k in self._cache}
            for k in found:
                self._cache.move_to_end(k)
        missing = list(dict.fromkeys((k, t) for k, t in zip(keys, texts, strict=True) if k not in found))
        model = self._model()
        for start in range(0, len(missing), self._batch):
            part = missing[start:start + self._batch]
            for (k, _), (pooled, toks) in zip(part, token_pass(model, [t for _, t in part]), strict=True):
                # float16 halves the cache; scores move by ~1e-3, far below the gaps that order candidates
                found[k] = (pooled, toks.astype(np.float16))
        with self._lock:
            for k, _ in missing:
                self._cache[k] = found[k]
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return [found[k] for k in keys]

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        if not passages:
            return np.zeros(0, dtype=np.float32)
        (q_pooled, q_tokens), *rest = self._encode([query, *passages])
        return np.array([maxsim(q_tokens, toks.astype(np.float32)) + float(q_pooled @ pooled)
                         for pooled, toks in rest], dtype=np.float32)


class CrossEncoderReranker:
    """A sentence-transformers CrossEncoder folder, loaded once, lazily, offline."""

    def __init__(self, model_path: Path, *, device: str = "cpu", batch_size: int = 16) -> None:
        self.model_path = Path(model_path)
        self.device = device
        self._batch = batch_size
        self._model = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"cross_encoder:{self.model_path.name}"

    def _load(self):
        if self._model is None:
            with self._lock:
                if self._model is None:
                    if not (self.model_path / "config.json").is_file():
                        raise EmbeddingModelError(f"{self.model_path} is not a cross-encoder model folder "
                                                  "(no config.json)")
                    from sentence_transformers import CrossEncoder

                    try:
                        self._model = CrossEncoder(str(self.model_path), device=self.device, local_files_only=True)
                    except Exception as e:  # the library raises many types for a broken folder
                        raise EmbeddingModelError(f"cannot load cross-encoder {self.model_path}: {e}") from e
        return self._model

    def warm_up(self) -> None:
        self._load().predict([("warm", "up")], show_progress_bar=False)

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        if not passages:
            return np.zeros(0, dtype=np.float32)
        scores = self._load().predict([(query, p) for p in passages], batch_size=self._batch,
                                      show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(scores, dtype=np.float32).reshape(len(passages), -1)[:, -1]


class Rerankers:
    """The rerankers of a process, one per configuration, built on first use."""

    def __init__(self, model: Callable[[], Any], *, device: str = "cpu") -> None:
        self._model = model
        self._device = device
        self._made: dict[tuple[str, str], Reranker] = {}
        self._lock = threading.Lock()

    def get(self, config: RerankConfig) -> Reranker | None:
        if config.kind == "none":
            return None
        key = (config.kind, str(config.model))
        with self._lock:
            r = self._made.get(key)
            if r is None:
                r = self._made[key] = (LateInteractionReranker(self._model) if config.kind == "late_interaction"
                                       else CrossEncoderReranker(config.model, device=self._device))  # type: ignore[arg-type]
            return r
