"""What only the Releases page has: its charts' vendored library (uPlot 1.6.32, MIT, served with its licence, its
styles before the page's own). What every page shares (serving, headers, assets, links, modules, API paths) is
tested in test_studio_pages.py; tests/integration/test_releases_browser.py drives the page in Chromium against a
real server."""

from __future__ import annotations

from app.api.routes.studio import RELEASES_DIR
from tests.unit import test_studio_pages as pages

client = pages.client  # the fixture


async def test_the_vendor_notes_are_not_served(client) -> None:
    assert (await client.get("/releases/static/vendor/README.md")).status_code == 404


async def test_the_page_links_the_chart_styles(client) -> None:
    html = (await client.get("/releases")).text
    assert '<link rel="stylesheet" href="/releases/static/vendor/uPlot.min.css">' in html
    assert html.index("/studio/static/studio.css") < html.index("uPlot.min.css") < html.index("releases.css")


def test_the_vendored_chart_library_keeps_its_licence() -> None:
    head = (RELEASES_DIR / "vendor" / "uPlot.esm.js").read_text()[:400]
    assert "uPlot" in head and "(v1.6.32)" in head and "MIT" in head
    assert (RELEASES_DIR / "vendor" / "uPlot.LICENSE.txt").read_text().startswith("The MIT License")
