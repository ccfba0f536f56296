"""What only the Releases page has: its charts' vendored library (uPlot, served with its licence) and its assets.
What every page shares (serving, headers, links, modules, API paths) is tested in test_studio_pages.py;
tests/integration/test_releases_browser.py drives the page in Chromium against a real server."""

from __future__ import annotations

import pytest

from app.api.routes.studio import RELEASES_DIR
from tests.unit.test_studio_pages import client  # noqa: F401  (the fixture)


@pytest.mark.parametrize("path, media_type", [
    ("js/main.js", "text/javascript; charset=utf-8"),
    ("js/charts.js", "text/javascript; charset=utf-8"),
    ("releases.css", "text/css; charset=utf-8"),
    ("vendor/uPlot.esm.js", "text/javascript; charset=utf-8"),
    ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    ("vendor/uPlot.LICENSE.txt", "text/plain; charset=utf-8"),
])
async def test_assets_are_served_with_their_type(client, path: str, media_type: str) -> None:  # noqa: F811
    r = await client.get(f"/releases/static/{path}")
    assert r.status_code == 200, path
    assert r.headers["content-type"] == media_type
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_the_vendor_notes_are_not_served(client) -> None:  # noqa: F811
    assert (await client.get("/releases/static/vendor/README.md")).status_code == 404


async def test_the_page_links_the_chart_styles(client) -> None:  # noqa: F811
    html = (await client.get("/releases")).text
    assert '<link rel="stylesheet" href="/releases/static/vendor/uPlot.min.css">' in html
    assert html.index("/studio/static/studio.css") < html.index("uPlot.min.css") < html.index("releases.css")


def test_the_vendored_chart_library_keeps_its_licence() -> None:
    head = (RELEASES_DIR / "vendor" / "uPlot.esm.js").read_text()[:400]
    assert "uPlot" in head and "(v1.6.32)" in head and "MIT" in head
    assert (RELEASES_DIR / "vendor" / "uPlot.LICENSE.txt").read_text().startswith("The MIT License")
