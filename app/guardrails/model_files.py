"""The identity of a local model folder: the key of everything cached from it (vectors, exported graphs)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def model_files_digest(model_path: Path) -> str:
    """What identifies a sentence-transformers folder's weights and pipeline (configs by content, weights by
    size and modification time): the key of everything cached from its vectors or exported from it."""
    h = hashlib.sha256()
    for name in ("config.json", "modules.json", "1_Pooling/config.json", "model.safetensors", "pytorch_model.bin"):
        f = model_path / name
        if f.exists():
            st = f.stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns if f.suffix != '.json' else 0}".encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
    return h.hexdigest()
