"""What every ``keel`` sub-command shares when it reports a failure."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from app.core.errors import KeelError
from app.settings import Settings, load_settings

_stderr = Console(stderr=True)


def fail(exc: KeelError) -> typer.Exit:
    """Print ``exc`` with its stable code and return the exit to raise. Messages are escaped: they
    quote user input and ``[n]`` citations, which rich would otherwise read as markup."""
    _stderr.print(f"[red]error ({exc.code}):[/red] {escape(exc.message)}")
    return typer.Exit(1)


def settings_or_exit(offline: dict[str, str] | None = None) -> Settings:
    """The settings every sub-command starts from; a configuration error is the user's to fix: one line
    and exit code 2, not a traceback. ``offline`` environment defaults are set first (model libraries
    read them at import)."""
    for k, v in (offline or {}).items():
        os.environ.setdefault(k, v)
    try:
        return load_settings()
    except Exception as exc:
        _stderr.print(f"[red]configuration error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc


def api_failure(response) -> typer.Exit:
    """A Keel API error response (``{"error": {"code", "message"}}``) as one line with its stable code."""
    try:
        e = response.json().get("error", {})
        code, msg = e.get("code") or response.status_code, e.get("message") or response.text
    except ValueError:
        code, msg = response.status_code, response.text
    _stderr.print(f"[red]error ({escape(str(code))}):[/red] {escape(str(msg))}")
    return typer.Exit(1)


def unreachable(url: str, exc: Exception, hint: str = "") -> typer.Exit:
    _stderr.print(f"[red]cannot reach {escape(url)}:[/red] {escape(str(exc))} (is `keel serve` running?{hint})")
    return typer.Exit(1)


DEV_KEY_FILE = "dev-api-key"


def dev_key(home: Path) -> str | None:
    """The admin key `keel up` writes to ``<home>/dev-api-key``: the default of every sub-command that talks
    to the running API, so the README's commands work on the embedded defaults without copying keys."""
    path = home / DEV_KEY_FILE
    return (path.read_text().strip() or None) if path.is_file() else None
