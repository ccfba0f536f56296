"""Keel's web pages, served by the API itself: Prompt Studio (``/studio``), Releases (``/releases``) and Traces
(``/traces``).

The pages are plain HTML, CSS and ES modules (no build step). They hold no privileges of their own:
each asks for an API key (kept in the tab's ``sessionStorage``) and calls the public REST API —
Prompt Studio ``/v1/prompts`` with ``prompts:write`` and ``/v1/chat/completions`` with ``chat``;
Releases ``/v1/releases`` with ``releases``; Traces ``/v1/traces`` with ``admin`` and ``/v1/lineage`` — exactly as
any other client would. The pages and their assets are therefore served without auth.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from app.core.errors import NotFound

STATIC_DIR = Path(__file__).resolve().parent.parent / "static" / "studio"
RELEASES_DIR = STATIC_DIR.parent / "releases"
TRACES_DIR = STATIC_DIR.parent / "traces"

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

router = APIRouter(tags=["studio"], include_in_schema=False)


def _asset(path: str, folder: Path = STATIC_DIR) -> Path:
    """Resolve ``path`` inside a page's folder; anything else (``..``, odd types) is a 404."""
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


@router.get("/studio")
async def studio_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type=_MEDIA_TYPES[".html"], headers=_PAGE_HEADERS)


@router.get("/studio/")
async def studio_slash() -> RedirectResponse:
    return RedirectResponse("/studio", status_code=308)


@router.get("/studio/static/{path:path}")
async def studio_asset(path: str) -> FileResponse:
    file = _asset(path)
    return FileResponse(file, media_type=_MEDIA_TYPES[file.suffix], headers=_HEADERS)


# Releases: every release's split and decision, live numbers and charts, pause / resume / promote / roll back.
# Its charts use uPlot, vendored under static/releases/vendor (MIT, see uPlot.LICENSE.txt): no CDN at run time.


@router.get("/releases")
async def releases_page() -> FileResponse:
    return FileResponse(RELEASES_DIR / "index.html", media_type=_MEDIA_TYPES[".html"], headers=_PAGE_HEADERS)


@router.get("/releases/")
async def releases_slash() -> RedirectResponse:
    return RedirectResponse("/releases", status_code=308)


@router.get("/releases/static/{path:path}")
async def releases_asset(path: str) -> FileResponse:
    file = _asset(path, RELEASES_DIR)
    return FileResponse(file, media_type=_MEDIA_TYPES[file.suffix], headers=_HEADERS)


# Traces: recent traces as a list, one trace as a waterfall with its spans' attributes and events, and the lineage
# of a chat answer (GET /v1/traces needs an admin key; the page itself holds none).


@router.get("/traces")
async def traces_page() -> FileResponse:
    return FileResponse(TRACES_DIR / "index.html", media_type=_MEDIA_TYPES[".html"], headers=_PAGE_HEADERS)


@router.get("/traces/")
async def traces_slash() -> RedirectResponse:
    return RedirectResponse("/traces", status_code=308)


@router.get("/traces/static/{path:path}")
async def traces_asset(path: str) -> FileResponse:
    file = _asset(path, TRACES_DIR)
    return FileResponse(file, media_type=_MEDIA_TYPES[file.suffix], headers=_HEADERS)
