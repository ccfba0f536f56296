"""Merge a LoRA adapter into its base model and write a plain model folder (``keel finetune export``).

A merged model serves at full speed on vLLM (LoRA decode on CPU is ~2-3x slower) and needs no
``--enable-lora``; the cost is a full copy of the weights per adapter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, *, base_model: str | Path | None = None) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    meta_path = adapter_dir / "keel-adapter.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if base_model is None:
        base_model = meta.get("base_model") or json.loads((adapter_dir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
    if not base_model or not Path(base_model, "config.json").is_file():
        raise FileNotFoundError(f"base model folder {base_model} not found; pass base_model=")
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(base_model).save_pretrained(str(out_dir))
    for extra in ("chat_template.jinja", "generation_config.json"):
        src = Path(base_model, extra)
        if src.is_file() and not (out_dir / extra).exists():
            shutil.copy2(src, out_dir / extra)
    (out_dir / "keel-merged.json").write_text(json.dumps({**meta, "merged_from": str(adapter_dir)}, indent=2))
    return out_dir
