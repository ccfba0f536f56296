"""Keel's web pages (Prompt Studio, Releases, Traces) as the API serves them: without auth, with strict headers,
only files inside a page's folder or the shared one (static/common, under each page's static path); the shared
HTML parts put into every page; everything a page links exists, its modules import what exists and parse, the
elements its scripts look up are on it; and every API path a page's client calls is a route of the real app.
tests/integration/test_*_browser.py drive the pages in Chromium against a real server; test_releases_page.py and
test_traces_page.py test what only one page has."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api.main import create_app
from app.api.routes.studio import COMMON_DIR, PAGES, render_page
from app.settings import load_settings

LABELS = {"studio": "Prompt Studio", "releases": "Releases", "traces": "Traces", "ops": "Ops", "pipelines": "Pipelines"}
COMMON_MODULES = sorted(p.name for p in COMMON_DIR.glob("*.js"))


@pytest.fixture
async def client(tmp_path: Path):
    app = create_app(settings=load_settings(home=tmp_path, guardrails={"enabled": False}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://keel") as c:
        c.app = app  # type: ignore[attr-defined]
        yield c


def app_routes(routes: list[Any]) -> Iterator[Any]:
    """The app's endpoints, through included routers (FastAPI >= 0.16x wraps them)."""
    for r in routes:
        if hasattr(r, "effective_candidates"):
            yield from app_routes(r.effective_candidates())
        elif getattr(r, "methods", None):
            yield r


def modules(page: str) -> list[Path]:
    """The page's own ES modules and the shared ones."""
    return sorted((PAGES[page] / "js").glob("*.js")) + sorted(COMMON_DIR.glob("*.js"))


def resolve(module: Path, target: str) -> Path:
    """An import as the browser resolves it: ``../common/x.js`` from a page's js/ is served from static/common."""
    if module.parent.name == "js" and target.startswith("../common/"):
        return COMMON_DIR / target.removeprefix("../common/")
    return (module.parent / target).resolve()


def exported(module: Path) -> set[str]:
    text = module.read_text()
    names = set(re.findall(r"^export (?:async )?(?:function\*?|const|let|class) ([\w$]+)", text, flags=re.M))
    for group in re.findall(r"^export \{([^}]+)\}", text, flags=re.M):
        names |= {n.split(" as ")[-1].strip() for n in group.split(",") if n.strip()}
    return names


@pytest.mark.parametrize("page", PAGES)
async def test_a_page_is_served_without_a_key_and_with_strict_headers(client, page: str) -> None:
    r = await client.get(f"/{page}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert f"<title>{LABELS[page]} · Keel</title>" in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-cache"
    assert r.headers["referrer-policy"] == "no-referrer"
    slash = await client.get(f"/{page}/", follow_redirects=False)
    assert slash.status_code == 308 and slash.headers["location"] == f"/{page}"


@pytest.mark.parametrize("page", PAGES)
async def test_the_shared_parts_are_put_into_every_page(client, page: str) -> None:
    html = (await client.get(f"/{page}")).text
    assert "<!--#" not in html and "<!--/wrap" not in html  # every include and wrap was resolved
    assert html.startswith('<!doctype html>\n<html lang="en">\n<head>\n  <meta charset="utf-8">')
    for marker in ('<header class="topbar">', '<section id="login"', 'id="api-key"', 'id="logout"',
                   '<link rel="stylesheet" href="/studio/static/studio.css">'):
        assert html.count(marker) == 1, (page, marker)
    # the page's own words about its key sit inside the shared login form, before the key field
    own = (PAGES[page] / "index.html").read_text()
    intro = re.search(r'<!--#wrap login.html-->\s*(<p class="muted">.*?</p>)\s*<!--/wrap-->', own, flags=re.S)[1]
    form = re.search(r'<form id="login-form".*?</form>', html, flags=re.S)[0]
    assert intro in form and form.index(intro) < form.index('<label for="api-key">')
    assert render_page(page) == html


@pytest.mark.parametrize("page", PAGES)
async def test_the_three_pages_link_to_each_other(client, page: str) -> None:
    html = (await client.get(f"/{page}")).text
    nav = re.search(r'<nav class="app-nav" aria-label="Keel pages">(.*?)</nav>', html, flags=re.S).group(1)
    for target, label in LABELS.items():
        current = ' aria-current="page"' if target == page else ""
        assert f'<a href="/{target}"{current}>{label}</a>' in nav, (page, target)
    assert nav.count("aria-current") == 1


_JS, _CSS = "text/javascript; charset=utf-8", "text/css; charset=utf-8"


@pytest.mark.parametrize("page, path, media_type", [
    ("studio", "js/main.js", _JS), ("studio", "js/api.js", _JS), ("studio", "js/editor.js", _JS),
    ("studio", "js/diff.js", _JS), ("studio", "studio.css", _CSS), ("studio", "favicon.svg", "image/svg+xml"),
    ("releases", "js/main.js", _JS), ("releases", "js/api.js", _JS), ("releases", "js/charts.js", _JS),
    ("releases", "releases.css", _CSS), ("releases", "vendor/uPlot.esm.js", _JS),
    ("releases", "vendor/uPlot.min.css", _CSS), ("releases", "vendor/uPlot.LICENSE.txt", "text/plain; charset=utf-8"),
    ("traces", "js/main.js", _JS), ("traces", "js/api.js", _JS), ("traces", "js/waterfall.js", _JS),
    ("traces", "js/span.js", _JS), ("traces", "js/lineage.js", _JS), ("traces", "js/dom.js", _JS),
    ("traces", "traces.css", _CSS),
])
async def test_a_pages_assets_are_served_with_their_type(client, page: str, path: str, media_type: str) -> None:
    r = await client.get(f"/{page}/static/{path}")
    assert r.status_code == 200, path
    assert r.headers["content-type"] == media_type
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("module", COMMON_MODULES)
async def test_the_shared_modules_are_served_under_every_page(client, page: str, module: str) -> None:
    r = await client.get(f"/{page}/static/common/{module}")
    assert r.status_code == 200, module
    assert r.headers["content-type"] == _JS
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-cache"
    assert r.text == (COMMON_DIR / module).read_text()


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("path", [
    "", "../common/login.html", "..%2Fcommon%2Flogin.html", "..%2F..%2Froutes%2Fstudio.py", "js/../../routes/studio.py",
    "index", "missing.js", "common", "common/", "common/missing.js", "common/..%2F..%2Froutes%2Fstudio.py",
    "common/..%2Fstudio%2Fjs%2Fmain.js"])
async def test_nothing_outside_the_folders_or_of_another_type_is_served(client, page: str, path: str) -> None:
    r = await client.get(f"/{page}/static/{path}")
    assert r.status_code == 404, (path, r.status_code)


@pytest.mark.parametrize("page", PAGES)
async def test_everything_a_page_links_and_imports_exists(client, page: str) -> None:
    html = (await client.get(f"/{page}")).text
    links = re.findall(r'(?:href|src)="(/[^"#]+)"', html)
    assert {f"/{page}/static/js/main.js", "/studio/static/studio.css", "/studio", "/releases", "/traces"} <= set(links)
    for link in links:
        assert (await client.get(link)).status_code == 200, link
    # ES module imports, as the browser resolves them (and fetches them from this page's static path), and the
    # names they import are exported there
    for module in modules(page):
        for names, target in re.findall(r'^import \{([^}]+)\} from "(\.[^"]+)";$', module.read_text(), flags=re.M):
            path = resolve(module, target)
            assert path.is_file(), f"{module.name} imports missing {target}"
            if module.parent.name == "js":
                served = f"/{page}/static/js/{target}".replace("/js/../", "/").replace("/js/./", "/js/")
                assert (await client.get(served)).status_code == 200, served
            wanted = {n.split(" as ")[0].strip() for n in names.split(",") if n.strip()}
            assert wanted <= exported(path), f"{module.name} imports {sorted(wanted - exported(path))} from {target}"


@pytest.mark.parametrize("page", PAGES)
def test_every_element_the_scripts_look_up_is_on_the_page(page: str) -> None:
    html = render_page(page)
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    looked_up, rendered = set(), set()
    for module in sorted((PAGES[page] / "js").glob("*.js")):
        text = module.read_text()
        looked_up |= set(re.findall(r'\$\("([^"]+)"\)', text))
        rendered |= set(re.findall(r'\bid: "([^"]+)"', text))
        # a shared helper the page imports looks up its elements on this page
        for names, target in re.findall(r'^import \{([^}]+)\} from "(\.\./common/[^"]+)";$', text, flags=re.M):
            source = resolve(module, target).read_text()
            for name in (n.split(" as ")[0].strip() for n in names.split(",")):
                body = re.search(rf"^export (?:async )?function {re.escape(name)}\(.*?^}}$", source, flags=re.M | re.S)
                if body:
                    looked_up |= set(re.findall(r'\$\("([^"]+)"\)', body[0]))
    assert looked_up and looked_up <= ids, sorted(looked_up - ids)
    assert {"login-form", "api-key", "login-error", "session-info", "logout", "app"} <= looked_up
    # a label or region names an element of the page, or one the scripts render into it
    for target in re.findall(r'(?:for|aria-controls|aria-labelledby|aria-describedby)="([^"]+)"', html):
        assert target in ids | rendered, (page, target)


# What each page's client calls: request("METHOD", path) with its ${enc(...)} parts as the routes name them.
_PATH_PARTS = {"${enc(name)}": "{name}", "${enc(ref)}": "{ref}", "${enc(label)}": "{label}",
               "${enc(traceId)}": "{trace_id}", "${enc(completionId)}": "{completion_id}"}


def client_calls(page: str) -> set[tuple[str, str]]:
    source = (PAGES[page] / "js" / "api.js").read_text()
    calls = set()
    for method, path in re.findall(r'request\("(GET|POST|PUT|DELETE)", [`"]([^`"]+)[`"]', source):
        for part, name in _PATH_PARTS.items():
            path = path.replace(part, name)
        if "${action}" in path:  # releases act(): one path per action
            calls |= {(method, path.replace("${action}", a)) for a in ("pause", "resume", "promote", "rollback")}
        else:
            calls.add((method, path))
    calls |= {("POST", path) for path in re.findall(r'send\("([^"]+)"', source)}  # the studio's streamed chat
    return calls


@pytest.mark.parametrize("page, expected", [
    ("studio", {("POST", "/v1/chat/completions"), ("PUT", "/v1/prompts/{name}/labels/{label}"),
                ("POST", "/v1/prompts/preview"), ("GET", "/v1/models")}),
    ("releases", {("GET", "/v1/releases/{name}/series"), ("POST", "/v1/releases/{name}/promote")}),
    ("traces", {("GET", "/v1/traces"), ("GET", "/v1/traces/{trace_id}"), ("GET", "/v1/lineage/{completion_id}")}),
])
async def test_every_api_path_a_page_calls_is_a_route(client, page: str, expected: set) -> None:
    """A renamed or removed endpoint fails here, not only in a browser."""
    calls = client_calls(page)
    assert expected <= calls, sorted(expected - calls)
    assert all("${" not in path for _, path in calls), calls
    routes = {(m, r.path) for r in app_routes(client.app.routes) for m in r.methods}
    assert calls <= routes, sorted(calls - routes)


@pytest.mark.skipif(shutil.which("node") is None, reason="no node to parse the modules with")
@pytest.mark.parametrize("module", sorted({str(p.relative_to(COMMON_DIR.parent)) for page in PAGES
                                           for p in modules(page)}))
def test_the_modules_parse(module: str) -> None:
    r = subprocess.run(["node", "--experimental-default-type=module", "--check", str(COMMON_DIR.parent / module)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
