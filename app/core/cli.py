"""What every ``keel`` sub-command shares when it reports a failure."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from app.core.errors import KeelError

_stderr = Console(stderr=True)


def fail(exc: KeelError) -> typer.Exit:
    """Print ``exc`` with its stable code and return the exit to raise. Messages are escaped: they
    quote user input and ``[n]`` citations, which rich would otherwise read as markup."""
    _stderr.print(f"[red]error ({exc.code}):[/red] {escape(exc.message)}")
    return typer.Exit(1)
