"""The identity of a local model folder (the key of everything cached from it: vectors, exported graphs) and the
one way a fitted model is written to the cache."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np


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


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` write-then-rename: processes starting together never read a half-written file.
    Raises OSError (an unwritable cache): the caller decides whether that matters."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
