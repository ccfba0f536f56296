"""An int8 ONNX Runtime path for short texts (a question, a guard input), built from the local model.

Why: on this class of CPU one MiniLM forward pass for a ~10-token text costs ~10 ms in torch (bf16, one
thread) and ~3 ms in ONNX Runtime with int8 weights (per-channel dynamic quantisation of the MatMuls only:
cosine >= 0.99 to the float32 vectors on our measurements). That pass sits on every guarded request and
every RAG query, so it is most of the guardrails' and the retriever's latency.

The graph is exported from the already loaded sentence-transformers model (no download, ~2 s) and cached
on disk under a key of the model files and the onnxruntime version; bulk work (ingest batches) stays on
torch. Only the mean-pooling + normalise pipeline is reproduced here; any other pipeline is refused and
the caller keeps torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from app.guardrails.model_files import model_files_digest

log = logging.getLogger("keel.guardrails")


def export_int8(module: Any, sample: Any, target: Path, *, output: str, output_axes: dict[int, str]) -> None:
    """Export a torch module over a BERT-style batch (``input_ids``, ``attention_mask``, ``token_type_ids``, each
    batch x seq) to ONNX, quantise its MatMuls to int8 per channel, and move it to ``target`` atomically (a
    concurrent starter reads the old or the whole new file). The embedder's short path and the harmful-request
    encoder are built this way."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = ["input_ids", "attention_mask", "token_type_ids"]
    target.parent.mkdir(parents=True, exist_ok=True)
    # The exporter's tracer warnings and the quantiser's advice (on the root logger) are noise here.
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            warnings.simplefilter("ignore")
            plain = Path(tmp) / "model.onnx"
            with torch.no_grad():
                torch.onnx.export(module, tuple(sample[n] for n in names), str(plain), input_names=names,
                                  output_names=[output], opset_version=17, dynamo=False,
                                  dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names}, output: output_axes})
            quant = Path(tmp) / "model-int8.onnx"
            quantize_dynamic(str(plain), str(quant), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"])
            os.replace(quant, target)
    finally:
        root.setLevel(level)


def open_session(target: Path, threads: int) -> Any:
    """A CPU session over an exported graph: ``threads`` intra-op threads, one inter-op (requests run beside it)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(target), so, providers=["CPUExecutionProvider"])


class FastTokenizer:
    """A model folder's ``tokenizer.json`` through the ``tokenizers`` library alone: what a serving graph needs,
    without importing transformers (which imports torch: ~4 s of every start). Called as a transformers fast
    tokenizer is with ``padding=True, truncation=True, max_length=n, return_tensors="np"``, it gives the same ids
    (``test_guardrails_models.py::test_the_light_tokenizer_gives_the_transformers_tokenizer_s_ids``). Padding and
    truncation are set once, here: the Rust tokenizer's settings are shared state, changed per call they race
    between threads; set once, concurrent calls only read it. ``backend``: a transformers fast tokenizer's own
    ``backend_tokenizer`` (with any overrides its config applied), else the folder's ``tokenizer.json``."""

    def __init__(self, model_path: Path, max_length: int, *, backend: Any = None) -> None:
        from tokenizers import Tokenizer

        self.max_length = max_length
        self._tok = (Tokenizer.from_str(backend.to_str()) if backend is not None
                     else Tokenizer.from_file(str(Path(model_path) / "tokenizer.json")))
        self._tok.enable_truncation(max_length=max_length)
        pad = self._tok.padding or {}
        self._tok.enable_padding(pad_id=int(pad.get("pad_id", 0)), pad_type_id=int(pad.get("pad_type_id", 0)),
                                 pad_token=str(pad.get("pad_token", "[PAD]")))  # to the longest in the batch

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        encs = self._tok.encode_batch(texts)
        return {"input_ids": np.array([e.ids for e in encs], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64)}


def mean_pooled_pipeline(model_path: Path) -> tuple[int, int] | None:
    """(max_seq_length, dimension) of a sentence-transformers folder whose pipeline is Transformer + mean Pooling
    (+ Normalize), read from its config files; None for any other pipeline. The same check as ``load_or_build``
    makes on a loaded model, for a start that has not loaded it."""
    import json

    try:
        modules = json.loads((model_path / "modules.json").read_text())
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        pooling = json.loads((model_path / modules[1]["path"] / "config.json").read_text())
        max_len = int(json.loads((model_path / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    mean_only = pooling.get("pooling_mode_mean_tokens") and not any(
        pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                 "pooling_mode_mean_sqrt_len_tokens"))
    if kinds[:2] != ["Transformer", "Pooling"] or not mean_only or any(
            k not in ("Transformer", "Pooling", "Normalize") for k in kinds):
        return None
    return max_len, int(pooling["word_embedding_dimension"])


class OnnxUnavailable(RuntimeError):
    """The model's pipeline is not one this path reproduces, or onnxruntime is missing."""


def _cache_key(model_path: Path) -> str:
    import onnxruntime

    recipe = f"onnxruntime {onnxruntime.__version__} int8-matmul-per-channel v1"
    return hashlib.sha256(f"{recipe}:{model_files_digest(model_path)}".encode()).hexdigest()[:20]


class OnnxShortPath:
    def __init__(self, session: Any, tokenizer: FastTokenizer, inputs: list[str], *, dim: int) -> None:
        self.session, self.tokenizer, self.inputs, self.dim = session, tokenizer, inputs, dim

    @classmethod
    def load_or_build(cls, model: Any, model_path: Path, cache_dir: Path, *, threads: int = 1) -> OnnxShortPath:
        try:
            import onnxruntime  # noqa: F401  (here only to say it is missing: open_session imports it)
        except ImportError as e:
            raise OnnxUnavailable("onnxruntime is not installed") from e
        mods = [type(m).__name__ for m in model]
        pooling = model[1].get_config_dict().get("pooling_mode") if len(mods) > 1 else None
        if mods[:2] != ["Transformer", "Pooling"] or pooling != "mean" or any(
                m not in ("Transformer", "Pooling", "Normalize") for m in mods):
            raise OnnxUnavailable(f"pipeline {mods} (pooling {pooling!r}) is not Transformer + mean Pooling")
        target = cls.graph_path(model_path, cache_dir)
        if not target.is_file():
            cls._build(model, target)
        session = open_session(target, threads)
        inputs = [i.name for i in session.get_inputs()]
        backend = getattr(model.tokenizer, "backend_tokenizer", None)  # the tokenizer the model was loaded with
        if backend is None:
            raise OnnxUnavailable(f"{model_path} has no fast tokenizer")
        return cls(session, FastTokenizer(model_path, int(model.max_seq_length), backend=backend), inputs,
                   dim=int(model.get_embedding_dimension()))

    @classmethod
    def open_cached(cls, model_path: Path, cache_dir: Path, *, threads: int = 1) -> OnnxShortPath | None:
        """The graph a previous start built, without loading the model in torch; None when there is none yet
        (or the folder's pipeline is not one this path reproduces): then ``load_or_build``."""
        try:
            import onnxruntime  # noqa: F401  (graph_path and open_session import it; missing: load_or_build says so)
        except ImportError:
            return None
        pipeline = mean_pooled_pipeline(model_path)
        target = cls.graph_path(model_path, cache_dir)
        if pipeline is None or not target.is_file() or not (model_path / "tokenizer.json").is_file():
            return None
        session = open_session(target, threads)
        return cls(session, FastTokenizer(model_path, pipeline[0]), [i.name for i in session.get_inputs()],
                   dim=pipeline[1])

    @staticmethod
    def graph_path(model_path: Path, cache_dir: Path) -> Path:
        return Path(cache_dir) / f"minilm-{_cache_key(model_path)}-int8.onnx"

    @staticmethod
    def _build(model: Any, target: Path) -> None:
        import torch

        bert = model[0].auto_model.eval()

        class Encoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids).last_hidden_state

        export_int8(Encoder(), model.tokenizer(["warm up the exporter"], return_tensors="pt"), target,
                    output="last_hidden_state", output_axes={0: "batch", 1: "seq"})
        log.info("built the int8 ONNX embedding graph %s", target)

    def embed(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(texts)
        feed = {n: enc[n] for n in self.inputs}
        hidden = self.session.run(None, feed)[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        v = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)
