"""The harmful-request check's second stage: MiniLM itself fine-tuned (LoRA) to tell harmful requests from
benign ones.

Why: the first stage (``harmful.py``) reads a frozen sentence vector and n-grams; a frozen vector blurs what
makes a request harmful ("how do I make a bomb" vs "how do I make a bomb-shaped cake", "why can't women
breathe under water" vs an insult), and no head over it recovers that. Tuning the encoder's attention and
feed-forward layers (LoRA, rank 16: ~0.7M of MiniLM's 22M weights) lets it learn those contrasts from the same
shipped data. Both stages' probabilities are averaged (``harmful.with_second_stage``): they fail differently.

The weights ship in the repository (``infra/guardrails/models/harm-encoder.npz``: the LoRA factors of every
adapted layer in float16, the head, and a manifest of the training data's key, the base model and the
hyper-parameters): training takes ~12 minutes on two cores, too long for a first start.
``keel guardrails train-encoder`` reproduces them from ``infra/guardrails/data/harmful/``; a unit test fails when
that data changed and the weights were not retrained. Nothing here reads the public held-out sets.

Serving: the factors are merged into a copy of MiniLM, exported once to an int8 ONNX graph
(``onnx_embed.export_int8``, as the embedder's short path) that outputs the harm logit, cached under a key of the
weights, the base model files and onnxruntime's version; one pass per chunk of the request (``harmful_chunks``: up
to 300 characters, of which it reads the first 96 tokens, all of an English chunk; a chunk of code or of a
non-Latin script may be longer, and the first stage reads all of it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.guardrails.model_files import model_files_digest
from app.guardrails.onnx_embed import FastTokenizer, export_int8, open_session

log = logging.getLogger("keel.guardrails")

SHIPPED_ENCODER = Path(__file__).resolve().parents[3] / "infra" / "guardrails" / "models" / "harm-encoder.npz"
FORMAT = 1


@dataclass(frozen=True)
class EncoderConfig:
    """How the shipped weights were trained (recorded in their manifest)."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.1
    targets: tuple[str, ...] = ("query", "key", "value", "dense")
    epochs: int = 3
    lr: float = 1e-3
    batch: int = 32
    max_len: int = 96
    seed: int = 0


def data_key(texts: Sequence[str], labels: np.ndarray, config: EncoderConfig) -> str:
    """What the weights were trained from: every text and label, in order, and the hyper-parameters."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, **asdict(config)}, sort_keys=True).encode())
    for t, y in zip(texts, labels, strict=True):
        h.update(f"{int(y)}\t{t}\n".encode())
    return h.hexdigest()


def base_model_id(model_path: Path) -> str:
    """The base model by content (the sha256 of its weights file's sha256): the manifest's record of what the
    factors adapt."""
    weights = model_path / "model.safetensors"
    h = hashlib.sha256()
    with weights.open("rb") as f:
        h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class EncoderWeights:
    """LoRA factors per adapted linear layer (``factors[name] = (A (r, in), B (out, r))``, the update being
    ``B @ A * alpha / r``), the head over the mean-pooled last hidden state, and the manifest."""

    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    head_w: np.ndarray  # (hidden,)
    head_b: float
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return float(self.manifest["config"]["alpha"]) / float(self.manifest["config"]["rank"])

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode())
        for name in sorted(self.factors):
            a, b = self.factors[name]
            h.update(name.encode())
            h.update(np.ascontiguousarray(a).tobytes())
            h.update(np.ascontiguousarray(b).tobytes())
        h.update(np.ascontiguousarray(self.head_w).tobytes())
        h.update(np.float64(self.head_b).tobytes())
        return h.hexdigest()

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {}
        for i, name in enumerate(sorted(self.factors)):
            a, b = self.factors[name]
            arrays[f"a{i}"], arrays[f"b{i}"] = a.astype(np.float16), b.astype(np.float16)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, names=np.array(sorted(self.factors), dtype=str),
                            head_w=self.head_w.astype(np.float32), head_b=np.array([self.head_b]),
                            manifest=np.array(json.dumps(self.manifest, sort_keys=True)), **arrays)

    @classmethod
    def load(cls, path: Path) -> EncoderWeights:
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["names"]]
            factors = {n: (z[f"a{i}"].astype(np.float32), z[f"b{i}"].astype(np.float32)) for i, n in enumerate(names)}
            manifest = json.loads(str(z["manifest"]))
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise ValueError(f"{path}: not encoder weights of format {FORMAT}")
            return cls(factors, z["head_w"].astype(np.float32), float(z["head_b"][0]), manifest)


def _mean_pool(hidden: Any, mask: Any) -> Any:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def train(texts: Sequence[str], labels: np.ndarray, model_path: Path, config: EncoderConfig = EncoderConfig(), *,
          progress: Callable[[str], None] = log.info) -> EncoderWeights:
    """Fine-tune LoRA factors and a linear head on (text, harmful?) pairs; class-balanced BCE, AdamW with a
    one-cycle schedule. Deterministic for a given seed on one machine (torch's CPU kernels)."""
    import torch  # lazy: torch and peft load only to train
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(config.seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = get_peft_model(AutoModel.from_pretrained(model_path),
                           LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                      target_modules=list(config.targets)))
    head = torch.nn.Linear(model.config.hidden_size, 1)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    y = np.asarray(labels, dtype=np.float32)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    steps = config.epochs * -(-len(texts) // config.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.1)
    pos_weight = torch.tensor(float((y == 0).sum()) / max(float(y.sum()), 1.0))
    rng = np.random.default_rng(config.seed)
    for epoch in range(config.epochs):
        model.train()
        order, total = rng.permutation(len(texts)), 0.0
        for i in range(0, len(texts), config.batch):
            idx = order[i:i + config.batch]
            enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=config.max_len,
                      return_tensors="pt")
            logits = head(_mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])).squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(y[idx]),
                                                                        pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        progress(f"epoch {epoch + 1}/{config.epochs}: loss {total / len(texts):.4f}")
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            short = name.removeprefix("base_model.model.")
            if short.startswith("pooler."):  # unused by mean pooling: its factors never train
                continue
            factors[short] = (module.lora_A["default"].weight.detach().numpy().copy(),
                              module.lora_B["default"].weight.detach().numpy().copy())
    manifest = {"format": FORMAT, "config": asdict(config), "data_key": data_key(texts, labels, config),
                "base_model": base_model_id(model_path), "n_train": len(texts), "n_harmful": int(y.sum())}
    return EncoderWeights(factors, head.weight.detach().numpy()[0].copy(), float(head.bias.detach()[0]), manifest)


class HarmEncoder:
    """P(harmful) per text from the merged, exported model (see the module docstring)."""

    def __init__(self, session: Any, tokenizer: FastTokenizer, *, key: str = "") -> None:
        self.session, self.tokenizer = session, tokenizer
        self.key = key  # the weights' digest: what the first stage's memo keys a combined score by
        self.inputs = [i.name for i in session.get_inputs()]

    @classmethod
    def load_or_build(cls, weights: EncoderWeights, model_path: Path, cache_dir: Path, *,
                      threads: int = 1) -> HarmEncoder:
        target = cls.graph_path(weights, model_path, cache_dir)
        if not target.is_file():
            cls._build(weights, model_path, target)
        # the tokenizers library alone: a start with the graph cached imports neither transformers nor torch
        return cls(open_session(target, threads), FastTokenizer(model_path, int(weights.manifest["config"]["max_len"])),
                   key=weights.digest()[:16])

    @staticmethod
    def graph_path(weights: EncoderWeights, model_path: Path, cache_dir: Path) -> Path:
        """The cached graph: keyed by the weights, the base model files and onnxruntime's version."""
        import onnxruntime as ort

        recipe = f"onnxruntime {ort.__version__} harm-encoder int8 v1:{model_files_digest(model_path)}"
        key = hashlib.sha256(f"{recipe}:{weights.digest()}".encode()).hexdigest()[:20]
        return Path(cache_dir) / f"harm-encoder-{key}-int8.onnx"

    @staticmethod
    def merged_model(weights: EncoderWeights, model_path: Path) -> Any:
        """MiniLM with every factor's update added to its layer's weight, and the head: a torch module
        (input_ids, attention_mask, token_type_ids) -> harm logit per row."""
        import torch
        from transformers import AutoModel

        bert = AutoModel.from_pretrained(model_path).eval()
        modules = dict(bert.named_modules())
        with torch.no_grad():
            for name, (a, b) in weights.factors.items():
                if name not in modules:
                    raise ValueError(f"encoder weights adapt {name!r}, which the base model does not have")
                modules[name].weight += torch.from_numpy(b @ a * weights.scale)
        head = torch.nn.Linear(bert.config.hidden_size, 1)
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(weights.head_w)[None, :])
            head.bias.fill_(weights.head_b)

        class Scorer(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert, self.head = bert, head

            def forward(self, input_ids, attention_mask, token_type_ids):
                hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                   token_type_ids=token_type_ids).last_hidden_state
                return self.head(_mean_pool(hidden, attention_mask)).squeeze(-1)

        return Scorer().eval()

    @classmethod
    def _build(cls, weights: EncoderWeights, model_path: Path, target: Path) -> None:
        from transformers import AutoTokenizer

        if base_model_id(model_path) != weights.manifest.get("base_model"):
            raise ValueError(f"the encoder weights adapt another base model than {model_path}: retrain them "
                             "(keel guardrails train-encoder)")
        sample = AutoTokenizer.from_pretrained(model_path)(["warm up the exporter"], return_tensors="pt")
        export_int8(cls.merged_model(weights, model_path), sample,
                    target, output="logit", output_axes={0: "batch"})
        log.info("built the harmful-request encoder graph %s", target)

    def probs(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        enc = self.tokenizer(list(texts))  # safe from several validator threads (FastTokenizer's docstring)
        logits = self.session.run(None, {n: enc[n] for n in self.inputs})[0]
        return 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -60.0, 60.0)))


_FALLBACK = ("keel/harmful_request uses its first stage only (more false positives at the default policy's 0.5, "
             "which is for both stages; the first stage's own dev-split threshold is 0.55)")


def load_shipped(model_path: Path, cache_dir: Path, *, path: Path = SHIPPED_ENCODER,
                 threads: int = 1) -> HarmEncoder | None:
    """The shipped encoder, or None (logged) when its weights are missing, unreadable or adapt another base model,
    or its graph cannot be built: a guard that degrades says so, it does not stop the server starting."""
    if not path.is_file():
        log.warning("no harmful-request encoder weights at %s: %s", path, _FALLBACK)
        return None
    try:
        weights = EncoderWeights.load(path)
        weights.digest()  # a malformed manifest or factors fail here, not on a request
    except Exception as e:  # any unreadable file: truncated, not an npz, a foreign layout
        log.warning("harmful-request encoder weights %s unreadable (%s: %s): %s", path, type(e).__name__, e, _FALLBACK)
        return None
    for attempt in (1, 2):
        try:
            return HarmEncoder.load_or_build(weights, model_path, cache_dir, threads=threads)
        except Exception as e:  # export, quantiser or a corrupt cached graph; another base model (ValueError)
            stale = HarmEncoder.graph_path(weights, model_path, cache_dir)
            if attempt == 1 and not isinstance(e, ValueError) and stale.is_file():
                stale.unlink(missing_ok=True)  # a corrupt cached graph would fail every start: build it again
                continue
            log.warning("harmful-request encoder unavailable (%s: %s): %s", type(e).__name__, e, _FALLBACK)
    return None
