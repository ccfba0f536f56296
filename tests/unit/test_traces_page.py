"""The Traces page is served like Prompt Studio and Releases: without auth, with its own strict headers, only files
inside its folder; everything it links exists; its modules parse; every API path its client calls is a route of the
real app; and the names it relies on (the roots of the trace store's own reads, the span attributes it groups) are
the ones the server records (tests/integration/test_traces_browser.py drives it in Chromium against a real server)."""

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
from app.api.routes.studio import RELEASES_DIR, STATIC_DIR, TRACES_DIR
from app.container import Container
from app.settings import load_settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder
from tests.fakes.llm import ScriptedBackend

JS = TRACES_DIR / "js"


@pytest.fixture
async def client(tmp_path: Path):
    app = create_app(settings=load_settings(home=tmp_path, guardrails={"enabled": False}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://keel") as c:
        c.app = app  # type: ignore[attr-defined]
        yield c


async def test_the_page_is_served_without_a_key_and_with_strict_headers(client) -> None:
    r = await client.get("/traces")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>Traces · Keel</title>" in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-cache"
    assert r.headers["referrer-policy"] == "no-referrer"
    slash = await client.get("/traces/", follow_redirects=False)
    assert slash.status_code == 308 and slash.headers["location"] == "/traces"


@pytest.mark.parametrize("path, media_type", [
    ("js/main.js", "text/javascript; charset=utf-8"),
    ("js/api.js", "text/javascript; charset=utf-8"),
    ("js/waterfall.js", "text/javascript; charset=utf-8"),
    ("js/span.js", "text/javascript; charset=utf-8"),
    ("js/lineage.js", "text/javascript; charset=utf-8"),
    ("js/dom.js", "text/javascript; charset=utf-8"),
    ("traces.css", "text/css; charset=utf-8"),
])
async def test_assets_are_served_with_their_type(client, path: str, media_type: str) -> None:
    r = await client.get(f"/traces/static/{path}")
    assert r.status_code == 200, path
    assert r.headers["content-type"] == media_type
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["", "../studio/index.html", "..%2Fstudio%2Findex.html", "js/../../routes/studio.py",
                                  "index", "missing.js", "../releases/js/main.js"])
async def test_nothing_outside_the_folder_or_of_another_type_is_served(client, path: str) -> None:
    r = await client.get(f"/traces/static/{path}")
    assert r.status_code == 404, (path, r.status_code)


async def test_everything_the_page_links_exists(client) -> None:
    html = (TRACES_DIR / "index.html").read_text()
    links = re.findall(r'(?:href|src)="(/[^"#]+)"', html)
    assert {"/traces/static/js/main.js", "/traces/static/traces.css", "/studio/static/studio.css", "/studio",
            "/releases"} <= set(links)
    for link in links:
        assert (await client.get(link)).status_code == 200, link
    # ES module imports, relative to each module, and the names they import are exported there
    for module in sorted(JS.glob("*.js")):
        for names, target in re.findall(r'^import \{([^}]+)\} from "(\.[^"]+)";$', module.read_text(), flags=re.M):
            path = (module.parent / target).resolve()
            assert path.is_file(), f"{module.name} imports missing {target}"
            exported = set(re.findall(r"^export (?:async )?(?:function|const|class) ([\w$]+)", path.read_text(),
                                      flags=re.M))
            wanted = {n.strip() for n in names.split(",") if n.strip()}
            assert wanted <= exported, f"{module.name} imports {sorted(wanted - exported)} that {target} lacks"


def test_every_element_the_script_looks_up_is_on_the_page() -> None:
    html = (TRACES_DIR / "index.html").read_text()
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    looked_up, rendered = set(), set()
    for module in JS.glob("*.js"):
        looked_up |= set(re.findall(r'\$\("([^"]+)"\)', module.read_text()))
        rendered |= set(re.findall(r'\bid: "([^"]+)"', module.read_text()))
    assert looked_up and looked_up <= ids, sorted(looked_up - ids)
    # a label or region names an element of the page, or one the scripts render into it (the span's heading)
    for target in re.findall(r'(?:for|aria-controls|aria-labelledby|aria-describedby)="([^"]+)"', html):
        assert target in ids | rendered, target


async def test_the_three_pages_link_to_each_other(client) -> None:
    pages = {name: (await client.get(f"/{name}")).text for name in ("studio", "releases", "traces")}
    labels = {"studio": "Prompt Studio", "releases": "Releases", "traces": "Traces"}
    for page, html in pages.items():
        nav = re.search(r'<nav class="app-nav" aria-label="Keel pages">(.*?)</nav>', html, flags=re.S).group(1)
        for target, label in labels.items():
            current = ' aria-current="page"' if target == page else ""
            assert f'<a href="/{target}"{current}>{label}</a>' in nav, (page, target)
    assert (STATIC_DIR / "index.html").is_file() and (RELEASES_DIR / "index.html").is_file()


async def test_every_api_path_the_page_calls_is_a_route(client) -> None:
    """A renamed or removed traces or lineage endpoint fails here, not only in a browser."""
    source = (JS / "api.js").read_text()
    calls = {(m, p.replace("${enc(traceId)}", "{trace_id}").replace("${enc(completionId)}", "{completion_id}"))
             for m, p in re.findall(r'request\("(GET|POST)", [`"]([^`"]+)[`"]', source)}
    assert calls == {("GET", "/v1/traces"), ("GET", "/v1/traces/{trace_id}"), ("GET", "/v1/lineage/{completion_id}")}
    routes = {(m, r.path) for r in _routes(client.app.routes) for m in r.methods}
    assert calls <= routes, sorted(calls - routes)


def _routes(routes: list[Any]) -> Iterator[Any]:
    """The app's endpoints, through included routers (FastAPI >= 0.16x wraps them)."""
    for r in routes:
        if hasattr(r, "effective_candidates"):
            yield from _routes(r.effective_candidates())
        elif getattr(r, "methods", None):
            yield r


@pytest.mark.skipif(shutil.which("node") is None, reason="no node to parse the modules with")
@pytest.mark.parametrize("module", sorted(p.name for p in JS.glob("*.js")))
def test_the_modules_parse(module: str) -> None:
    r = subprocess.run(["node", "--experimental-default-type=module", "--check", str(JS / module)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


async def test_the_names_the_page_relies_on_are_what_the_server_records(tmp_path: Path) -> None:
    """The page hides the trace store's own reads by their root span name, finds a chat's completion id in
    gen_ai.response.id, and groups a model call's gen_ai.* attributes: all recorded under those names."""
    settings = load_settings(
        home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake-model"}}, default_model="m", guardrails={"enabled": False},
        releases={"check_interval_s": 0}, auth={"default_rate_limit_per_minute": 10_000})
    container = await Container.build(settings, backends={"local": ScriptedBackend(reply="Hello.")},
                                      rag=build_rag(settings, embedder=HashingEmbedder()))
    admin = {"Authorization": f"Bearer {container.keys.create('admin', ['admin'])[1]}"}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(container=container)),
                                     base_url="http://keel") as c:
            r = await c.post("/v1/chat/completions", headers=admin, json={
                "model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]})
            answer = r.json()["id"]
            listed = (await c.get("/v1/traces", headers=admin)).json()["data"]
            chat = next(t for t in listed if t["response_id"] == answer)
            await c.get(f"/v1/traces/{chat['trace_id']}", headers=admin)
            spans = (await c.get(f"/v1/traces/{chat['trace_id']}", headers=admin)).json()["spans"]
            roots = {t["root"] for t in (await c.get("/v1/traces", headers=admin)).json()["data"]}
    finally:
        await container.aclose()
    own = re.search(r"const OWN_READS = /(.+)/;", (JS / "main.js").read_text()).group(1).replace("\\/", "/")
    reads = {root for root in roots if root and root.startswith("GET /v1/traces")}
    assert reads == set()  # the server does not trace reads of the trace store (app/api/main.py _UNTRACED)
    # the page's filter (for stores written before that) matches them and nothing else
    assert all(re.fullmatch(own.strip("^$"), r) for r in ("GET /v1/traces", "GET /v1/traces/{trace_id}"))
    assert not re.fullmatch(own.strip("^$"), "POST /v1/chat/completions")
    model = next(s for s in spans if s["kind"] == "CLIENT")
    span_js = (JS / "span.js").read_text()
    for key in ("gen_ai.request.model", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
                "gen_ai.response.finish_reasons", "keel.ttft_ms", "gen_ai.response.id"):
        assert key in model["attributes"] and f'"{key}"' in span_js, key
    assert '"gen_ai.response.id"' in (JS / "main.js").read_text()
