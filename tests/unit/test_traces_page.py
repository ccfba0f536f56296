"""What only the Traces page has: the names it relies on (the roots of the trace store's own reads,
the span attributes it groups) are the ones the server records. What every page shares (serving, headers, assets,
links, modules, the elements its scripts look up, API paths) is tested in test_studio_pages.py;
tests/integration/test_traces_browser.py drives the page in Chromium against a real server."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from app.api.main import create_app
from app.api.routes.studio import TRACES_DIR
from app.container import Container
from app.settings import load_settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder
from tests.fakes.llm import ScriptedBackend
from tests.unit import test_studio_pages as pages

JS = TRACES_DIR / "js"
client = pages.client  # the fixture


async def test_another_pages_files_are_not_served_here(client) -> None:
    assert (await client.get("/traces/static/../releases/js/main.js")).status_code == 404
    assert (await client.get("/traces/static/..%2Freleases%2Fjs%2Fmain.js")).status_code == 404


def test_the_page_reads_traces_and_lineage_only() -> None:
    assert pages.client_calls("traces") == {("GET", "/v1/traces"), ("GET", "/v1/traces/{trace_id}"),
                                            ("GET", "/v1/lineage/{completion_id}")}


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
