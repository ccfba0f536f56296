"""Path containment for settings that confine what a caller may make the server read."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def is_within(path: str | Path, roots: Iterable[str | Path]) -> bool:
    """Whether ``path`` lies under one of ``roots``. '..' is collapsed but links are not followed: an API caller
    cannot create links, and one an admin placed under a root (e.g. <home>/models/smollm2 -> a shared model
    store) is meant to be used."""
    plain = Path(os.path.abspath(path))
    return any(plain.is_relative_to(os.path.abspath(r)) for r in roots)
