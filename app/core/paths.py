"""Path containment for settings that confine what a caller may make the server read."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path


def is_within(path: str | Path, roots: Iterable[str | Path]) -> bool:
    """Whether ``path`` lies under one of ``roots``. '..' is collapsed but links are not followed: an API caller
    cannot create links, and one an admin placed under a root (e.g. <home>/models/smollm2 -> a shared model
    store) is meant to be used."""
    plain = Path(os.path.abspath(path))
    return any(plain.is_relative_to(os.path.abspath(r)) for r in roots)


def same_folder(a: str | Path | None, b: str | Path | None) -> bool:
    """Whether two recorded paths name the same folder (links resolved); a missing one never matches."""
    return bool(a and b) and Path(a).resolve() == Path(b).resolve()


def tree_hash(folder: str | Path) -> str:
    """sha256 over a folder's files (relative path and bytes): the content identity of an artifact (a LoRA
    adapter) that stays the same when two copies of it live in different folders."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()
