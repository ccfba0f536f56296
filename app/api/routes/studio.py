"""Keel's web pages, served by the API itself: Prompt Studio (``/studio``), Releases (``/releases``), Traces
(``/traces``), Ops (``/ops``) and Pipelines (``/pipelines``).

The pages are plain HTML, CSS and ES modules (no build step). They hold no privileges of their own:
each asks for an API key (kept in the tab's ``sessionStorage``) and calls the public REST API —
Prompt Studio ``/v1/prompts`` with ``prompts:write`` and ``/v1/chat/completions`` with ``chat``;
Releases ``/v1/releases`` with ``releases``; Traces ``/v1/traces`` with ``admin`` and ``/v1/lineage``; Ops
``/v1/agents`` with ``chat``; Pipelines ``/v1/pipelines`` with ``finetune`` (and ``releases`` to approve, reject or
cancel a run) — exactly as any other client would. The pages and their assets are therefore served without auth.

What the pages share lives in ``static/common/``: ES modules (the API client with its key handling, DOM helpers,
the login and live refresh) served under each page's own static path (``/<page>/static/common/...``, so a page's
modules import ``../common/...``), and HTML parts put into each page's ``index.html`` as it is served:
``<!--#include NAME-->`` is the part ``common/NAME``; ``<!--#wrap NAME-->...<!--/wrap-->`` is that part with the
enclosed HTML at its ``<!--#slot-->``. The navigation marks the page's own link with ``aria-current="page"``.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from app.core.errors import NotFound

STATIC_DIR = Path(__file__).resolve().parent.parent / "static" / "studio"
RELEASES_DIR = STATIC_DIR.parent / "releases"
TRACES_DIR = STATIC_DIR.parent / "traces"
OPS_DIR = STATIC_DIR.parent / "ops"
PIPELINES_DIR = STATIC_DIR.parent / "pipelines"
COMMON_DIR = STATIC_DIR.parent / "common"

# Prompt Studio: templates, preview, runs, diffs, labels and their audit.
# Releases: every release's split and decision, live numbers and charts, pause / resume / promote / roll back.
# Its charts use uPlot, vendored under static/releases/vendor (MIT, see uPlot.LICENSE.txt): no CDN at run time.
# Traces: recent traces as a list, one trace as a waterfall with its spans' attributes and events, and the lineage
# of a chat answer (GET /v1/traces needs a monitor key; the page itself holds none).
# Ops: ask the ops agent (streamed) and approve or reject what agents propose (/v1/agents, with a chat key).
# Pipelines: continuous-training pipelines, their runs as a graph of steps (state, attempts, log, artifacts), start,
# approve / reject, cancel and retry a run (/v1/pipelines, with a finetune key; deciding also needs releases).
PAGES = {"studio": STATIC_DIR, "releases": RELEASES_DIR, "traces": TRACES_DIR, "ops": OPS_DIR,
         "pipelines": PIPELINES_DIR}

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".json": "application/json",
}
# The page is small and changes with the server version: revalidate rather than cache blindly.
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}
# The page only talks to its own origin; inline scripts and third-party hosts are not needed.
_PAGE_HEADERS = {
    **_HEADERS,
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_COMMON = "common/"
_INCLUDE = re.compile(r"<!--#include ([\w.-]+)-->")
_WRAP = re.compile(r"<!--#wrap ([\w.-]+)-->\n?(.*?)\s*<!--/wrap-->", re.S)
_SLOT = "<!--#slot-->"

router = APIRouter(tags=["studio"], include_in_schema=False)


def _asset(path: str, folder: Path = STATIC_DIR) -> Path:
    """Resolve ``path`` inside a page's folder (``common/...`` inside the shared one); anything else (``..``, odd
    types) is a 404."""
    if path.startswith(_COMMON):
        folder, path = COMMON_DIR, path.removeprefix(_COMMON)
    root = folder.resolve()
    candidate = (root / path).resolve()
    if (
        not path
        or candidate == root
        or root not in candidate.parents
        or candidate.suffix not in _MEDIA_TYPES
        or not candidate.is_file()
    ):
        raise NotFound(f"no {folder.name} asset {path!r}")
    return candidate


def render_page(name: str) -> str:
    """A page's ``index.html`` with the shared parts put in (see the module's doc)."""
    current = f'<a href="/{name}">'

    def part(file: str) -> str:
        html = _asset(file, COMMON_DIR).read_text(encoding="utf-8").rstrip("\n")
        return html.replace(current, current[:-1] + ' aria-current="page">')

    html = (PAGES[name] / "index.html").read_text(encoding="utf-8")
    html = _WRAP.sub(lambda m: part(m[1]).replace(_SLOT, m[2].strip()), html)
    return _INCLUDE.sub(lambda m: part(m[1]), html)


def _page_routes(name: str, folder: Path) -> None:
    async def page() -> HTMLResponse:
        return HTMLResponse(render_page(name), headers=_PAGE_HEADERS)

    async def slash() -> RedirectResponse:
        return RedirectResponse(f"/{name}", status_code=308)

    async def asset(path: str) -> FileResponse:
        file = _asset(path, folder)
        return FileResponse(file, media_type=_MEDIA_TYPES[file.suffix], headers=_HEADERS)

    router.add_api_route(f"/{name}", page, methods=["GET"], name=f"{name}_page")
    router.add_api_route(f"/{name}/", slash, methods=["GET"], name=f"{name}_slash")
    router.add_api_route(f"/{name}/static/{{path:path}}", asset, methods=["GET"], name=f"{name}_asset")


for _name, _folder in PAGES.items():
    _page_routes(_name, _folder)
