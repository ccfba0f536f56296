"""What every ``keel`` sub-command shares: how it reports a failure, and how it talks to the running API."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from app.core.errors import KeelError
from app.settings import Settings, load_settings

# soft_wrap: an error stays one line when stderr is a pipe or a log (rich would wrap it at 80 columns)
_stderr = Console(stderr=True, soft_wrap=True)


def fail(exc: KeelError) -> typer.Exit:
    """Print ``exc`` with its stable code and return the exit to raise. Messages are escaped: they
    quote user input and ``[n]`` citations, which rich would otherwise read as markup."""
    _stderr.print(f"[red]error ({exc.code}):[/red] {escape(exc.message)}")
    return typer.Exit(1)


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


@contextmanager
def opened(open_: Callable[[], C]) -> Iterator[C]:
    """A store or service for one command, closed afterwards; a :class:`KeelError` while opening or using it (an
    unreachable database, a refused request) is the command's error, one line and exit 1, not a traceback."""
    try:
        thing = open_()
    except KeelError as exc:
        raise fail(exc) from exc
    try:
        yield thing
    except KeelError as exc:
        raise fail(exc) from exc
    finally:
        thing.close()


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


# -- the running API ---------------------------------------------------------------------------------------

Url = Annotated[str | None, typer.Option(help="Keel API URL (default: server.url from the settings).")]


def api_key_option(help: str, *names: str) -> Any:
    """The ``--api-key`` option (also ``KEEL_API_KEY``) of a command that talks to the running API; ``help``
    says which scope it needs."""
    return Annotated[str | None, typer.Option(*(names or ("--api-key",)), envvar="KEEL_API_KEY", help=help)]


class ApiClient:
    """The running Keel API as every ``keel`` sub-command that talks to it resolves it: ``--url`` (default
    ``server.url``) and ``--api-key`` / ``KEEL_API_KEY`` (default: the dev key ``keel up`` wrote); the settings
    are read only when one of them is not given."""

    def __init__(self, url: str | None, key: str | None) -> None:
        if url is None or key is None:
            settings = settings_or_exit()
            url = url or settings.server.url
            key = key or dev_key(settings.home)
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
             params: dict[str, Any] | None = None, timeout: float = 30, retry: bool = False,
             files: dict[str, Any] | None = None, form: dict[str, str] | None = None, raw: bool = False) -> Any:
        """The response's JSON (``raw``: its bytes); an API error is one line with its stable code and exit 1. A
        connection failure too, unless ``retry``: then it is raised (``httpx.HTTPError``) for the caller to try
        again. Parameters that are None are left out; ``files``/``form`` send multipart instead of JSON."""
        import httpx  # lazy: keeps `keel --help` fast

        if params is not None:
            params = {k: v for k, v in params.items() if v is not None}
        try:
            multipart = {"files": files, "data": form} if files is not None or form is not None else {}
            r = httpx.request(method, self.url + path, json=body, params=params, headers=self.headers,
                              timeout=timeout, **multipart)
        except httpx.HTTPError as e:
            if retry:
                raise
            raise unreachable(self.url, e) from e
        if not 200 <= r.status_code < 300:
            raise api_failure(r)
        return r.content if raw else r.json()


def when_ago(ts: float | None) -> str:
    """A Unix time as local date and time with how long ago it was: ``2025-05-01 12:00:00 (3 min ago)``."""
    if not ts:
        return "-"
    s = max(0.0, time.time() - ts)
    ago = f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"
    return f"{datetime.fromtimestamp(ts).strftime('%Y-%m-%d %H:%M:%S')} ({ago} ago)"
