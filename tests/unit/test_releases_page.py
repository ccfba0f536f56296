"""The Releases page is served like Prompt Studio: without auth, with its own strict headers, only files inside
its folder; everything it links exists; and every API path its client calls is a route of the real app
(tests/integration/test_releases_browser.py drives it in Chromium against a real server)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api.main import create_app
from app.api.routes.studio import RELEASES_DIR, STATIC_DIR
from app.settings import load_settings


@pytest.fixture
async def client(tmp_path: Path):
    app = create_app(settings=load_settings(home=tmp_path, guardrails={"enabled": False}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://keel") as c:
        c.app = app  # type: ignore[attr-defined]
        yield c


async def test_the_page_is_served_without_a_key_and_with_strict_headers(client) -> None:
    r = await client.get("/releases")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>Releases · Keel</title>" in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-cache"
    slash = await client.get("/releases/", follow_redirects=False)
    assert slash.status_code == 308 and slash.headers["location"] == "/releases"


@pytest.mark.parametrize("path, media_type", [
    ("js/main.js", "text/javascript; charset=utf-8"),
    ("js/charts.js", "text/javascript; charset=utf-8"),
    ("releases.css", "text/css; charset=utf-8"),
    ("vendor/uPlot.esm.js", "text/javascript; charset=utf-8"),
    ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    ("vendor/uPlot.LICENSE.txt", "text/plain; charset=utf-8"),
])
async def test_assets_are_served_with_their_type(client, path: str, media_type: str) -> None:
    r = await client.get(f"/releases/static/{path}")
    assert r.status_code == 200, path
    assert r.headers["content-type"] == media_type
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["", "../studio/index.html", "..%2Fstudio%2Findex.html", "js/../../routes/studio.py",
                                  "index", "missing.js", "vendor/README.md"])
async def test_nothing_outside_the_folder_or_of_another_type_is_served(client, path: str) -> None:
    r = await client.get(f"/releases/static/{path}")
    assert r.status_code == 404, (path, r.status_code)


async def test_everything_the_page_links_exists(client) -> None:
    html = (RELEASES_DIR / "index.html").read_text()
    links = re.findall(r'(?:href|src)="(/[^"#]+)"', html)
    assert {"/releases/static/js/main.js", "/releases/static/vendor/uPlot.min.css", "/studio"} <= set(links)
    for link in links:
        assert (await client.get(link)).status_code == 200, link
    # ES module imports, relative to each module
    for module in sorted((RELEASES_DIR / "js").glob("*.js")):
        for target in re.findall(r'^import .* from "(\.[^"]+)";$', module.read_text(), flags=re.M):
            assert (module.parent / target).resolve().is_file(), f"{module.name} imports missing {target}"


async def test_studio_and_releases_link_to_each_other(client) -> None:
    studio = (await client.get("/studio")).text
    releases = (await client.get("/releases")).text
    assert '<a href="/releases">Releases</a>' in studio
    assert '<a href="/studio" aria-current="page">Prompt Studio</a>' in studio
    assert '<a href="/studio">Prompt Studio</a>' in releases
    assert '<a href="/releases" aria-current="page">Releases</a>' in releases
    assert (STATIC_DIR / "index.html").is_file()


def test_the_vendored_chart_library_keeps_its_licence() -> None:
    head = (RELEASES_DIR / "vendor" / "uPlot.esm.js").read_text()[:400]
    assert "uPlot" in head and "(v1.6.32)" in head and "MIT" in head
    assert (RELEASES_DIR / "vendor" / "uPlot.LICENSE.txt").read_text().startswith("The MIT License")


async def test_every_api_path_the_page_calls_is_a_route(client) -> None:
    """A renamed or removed releases endpoint fails here, not only in a browser."""
    source = (RELEASES_DIR / "js" / "api.js").read_text()
    calls = set()
    for method, path in re.findall(r'request\("(GET|POST)", [`"]([^`"]+)[`"]', source):
        path = path.replace("${enc(name)}", "{name}")
        if "${action}" in path:  # act(): one path per action
            calls |= {(method, path.replace("${action}", a)) for a in ("pause", "resume", "promote", "rollback")}
        else:
            calls.add((method, path))
    assert ("GET", "/v1/releases/{name}/series") in calls and ("POST", "/v1/releases/{name}/promote") in calls
    routes = {(m, r.path) for r in _routes(client.app.routes) for m in r.methods}
    assert calls <= routes, sorted(calls - routes)


def _routes(routes: list[Any]) -> Iterator[Any]:
    """The app's endpoints, through included routers (FastAPI >= 0.16x wraps them)."""
    for r in routes:
        if hasattr(r, "effective_candidates"):
            yield from _routes(r.effective_candidates())
        elif getattr(r, "methods", None):
            yield r
