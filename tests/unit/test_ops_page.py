"""The Ops page (``/ops``): ask the ops agent, watch it investigate, approve or reject what agents propose.

What every page shares (serving, headers, the shared parts, links, modules, the elements its scripts look up) is
tested in test_studio_pages.py; here, what only this page has: it is served with the strict headers and holds no
inline script or style, writes what the server sends as text, calls the agents API only — and the page itself in
headless Chromium (tests/browser.py) against a real API on a localhost port (tests/cli_server.py), whose ``ops``
workflow runs the real lifecycle tools over the real stores on a scripted model:

* a canary question streams its tool calls (one the key may make, one it may not: a finding that names the
  scope), the answer as the model writes it, then the final answer with its findings;
* "Is prompt support-qa v2 ready for production?" (the eval gate off: it passes) ends in a proposal to promote
  v2, shown with its tool, arguments and reason and in the approvals list; nothing moves until it is approved on
  the page, then the label has moved and nothing waits any more;
* a proposal made elsewhere (the API) appears in the live list without a reload and is rejected there with a
  reason (the label stays); one decided behind the page's back answers the page's approval with the API's error;
* the API's error before a run starts (with its code) and a stream that breaks off are shown on the run's card;
  Stop ends reading a run and the server cancels it;
* a key the server refuses (a wrong one, one without the chat scope, one revoked while the page is open) brings
  the login form back with the reason.

Screenshots of every view are kept as test artifacts (tests/browser.py).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api.routes.studio import OPS_DIR, render_page
from tests import browser
from tests.browser import BAD_KEY, chromium_page, connect, forget_key, tall_screenshot
from tests.cli_server import ApiServer
from tests.fakes.llm import ScriptedBackend
from tests.unit import test_studio_pages as pages

client = pages.client  # the fixture
browser_ready, artifacts = browser.browser_ready, browser.artifacts  # the shared fixtures

JS = OPS_DIR / "js"
STORAGE_KEY = "keel.ops.apiKey"
# The model writes the analysis word by word, slowly enough to be seen streaming.
ANALYSIS = "Nothing looks wrong: no release is running and the tools found no problem [1]."
SETTINGS = {
    "backends": {"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
    "models": {"m": {"backend": "local", "model": "fake-model"}}, "default_model": "m",
    "guardrails": {"enabled": False},  # under a guardrail policy answers are not streamed as tokens
    "evals": {"gate_enabled": False},  # no eval gate: a prompt version's promotion gate passes
    "releases": {"check_interval_s": 0}, "auth": {"default_rate_limit_per_minute": 100_000},
}
STABLE = {"messages": [{"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}]}
TERSE = {"messages": [{"role": "system", "content": "You are a terse assistant. Reply in a few words."}]}
# Playwright's default wait (tests/browser.py) is 15 s; the list re-reads every 5 s.
LIVE_TIMEOUT_MS = 20_000


# -- what is served ------------------------------------------------------------------------------------------


_JS, _CSS = "text/javascript; charset=utf-8", "text/css; charset=utf-8"


async def test_the_page_and_its_assets_are_served_with_strict_headers(client) -> None:
    r = await client.get("/ops")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>Ops · Keel</title>" in r.text
    csp = r.headers["content-security-policy"]
    for rule in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
                 "frame-ancestors 'none'"):
        assert rule in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["referrer-policy"] == "no-referrer"
    assert '<a href="/ops" aria-current="page">Ops</a>' in r.text
    for path, media_type in (("js/main.js", _JS), ("js/api.js", _JS), ("js/run.js", _JS), ("js/approvals.js", _JS),
                             ("ops.css", _CSS)):
        asset = await client.get(f"/ops/static/{path}")
        assert asset.status_code == 200, path
        assert asset.headers["content-type"] == media_type
        assert asset.headers["x-content-type-options"] == "nosniff" and asset.headers["cache-control"] == "no-cache"
    assert (await client.get("/ops/static/../traces/js/main.js")).status_code == 404
    assert (await client.get("/ops/static/..%2Ftraces%2Fjs%2Fmain.js")).status_code == 404


async def test_every_page_links_to_the_ops_page(client) -> None:
    for page in pages.PAGES:
        html = (await client.get(f"/{page}")).text
        nav = re.search(r'<nav class="app-nav" aria-label="Keel pages">(.*?)</nav>', html, flags=re.S).group(1)
        links = re.findall(r'<a href="/(\w+)"', nav)
        assert links == ["studio", "releases", "traces", "ops", "pipelines"], (page, links)


def test_no_inline_script_or_style_and_server_text_is_never_html() -> None:
    """The CSP refuses inline scripts and styles, so the page has none; what the server sends (answers, tool
    arguments, reasons) goes into the page as text."""
    html = render_page("ops")
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and "<style" not in html
    assert not re.search(r"\sstyle=", html) and not re.search(r"\son[a-z]+=", html)
    for module in JS.glob("*.js"):
        text = module.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in text, (module.name, sink)


async def test_the_page_calls_the_agents_api_only_and_each_call_is_a_route(client) -> None:
    calls = {(m, p.replace("${enc(runId)}", "{run_id}")) for m, p in pages.client_calls("ops")}
    assert calls == {("POST", "/v1/agents/ops/runs"), ("GET", "/v1/agents/approvals"),
                     ("POST", "/v1/agents/runs/{run_id}/resume")}
    routes = {(m, r.path) for r in pages.app_routes(client.app.routes) for m in r.methods}
    as_routes = {(m, p.replace("/agents/ops/", "/agents/{workflow}/")) for m, p in calls}
    assert as_routes <= routes, sorted(as_routes - routes)


# -- in a browser, against a real API ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """The API on a scripted model. ``ops``: what an on-call engineer's key might hold here (the agent, prompts and
    releases, not monitor); ``releases``: a key without the chat scope."""
    fake = ScriptedBackend(reply=ANALYSIS, delay_s=0.12)
    server = ApiServer(tmp_path_factory.mktemp("ops-page"), settings=SETTINGS, backends={"local": fake},
                       keys={"admin": ["admin"], "ops": ["chat", "prompts:write", "releases"],
                             "releases": ["releases"], "doomed": ["chat"]}).start()
    yield server
    server.stop()


def _call(server: ApiServer, method: str, path: str, key: str = "admin", **kw: Any) -> dict[str, Any]:
    r = httpx.request(method, f"{server.url}{path}", headers=server.h(key), timeout=60, **kw)
    assert r.status_code < 300, (path, r.status_code, r.text)
    return r.json()


def _two_versions(server: ApiServer, name: str, *, production: int | None = None) -> None:
    _call(server, "POST", "/v1/prompts", json={"name": name, "content": STABLE})
    _call(server, "POST", f"/v1/prompts/{name}/versions", json={"content": TERSE, "base_version": 1})
    if production is not None:
        _call(server, "PUT", f"/v1/prompts/{name}/labels/production", json={"version": production})


def _production(server: ApiServer, name: str) -> int | None:
    return _call(server, "GET", f"/v1/prompts/{name}")["labels"].get("production")


def _approvals(server: ApiServer) -> list[dict[str, Any]]:
    return _call(server, "GET", "/v1/agents/approvals", key="admin")["data"]


@pytest.mark.slow
def test_ask_watch_and_approve_or_reject_in_the_browser(browser_ready: None, api: ApiServer, artifacts: Path) -> None:
    from playwright.sync_api import expect

    _two_versions(api, "support-qa", production=1)
    _two_versions(api, "faq-answers", production=1)
    with chromium_page(artifacts, "ops") as page:
        page.goto(f"{api.url}/ops")
        expect(page).to_have_title(re.compile("Ops"))
        nav = page.get_by_role("navigation", name="Keel pages")
        for label in ("Prompt Studio", "Releases", "Traces"):
            expect(nav.get_by_role("link", name=label)).to_be_visible()
        expect(nav.get_by_role("link", name="Ops")).to_have_attribute("aria-current", "page")

        # --- connect: a wrong key, then one without the chat scope, are refused with the reason
        connect(page, BAD_KEY, refused="does not accept")
        connect(page, api.keys["releases"], refused="lacks the 'chat' scope")
        expect(page.locator("#login-error")).to_contain_text("the Ops page needs a key with the chat scope")
        connect(page, api.keys["ops"])
        sidebar = page.get_by_role("complementary", name="Waiting for approval")
        expect(sidebar.locator("#list-status")).to_have_text("Nothing is waiting for approval.")
        approvals = page.get_by_role("list", name="Approvals")
        expect(approvals.get_by_role("listitem")).to_have_count(0)

        # --- a canary question: the tool calls as they run, the answer as it streams, then the final answer
        page.get_by_role("button", name="How is the canary doing?").click()
        question = page.get_by_label("Question")
        expect(question).to_have_value("How is the canary doing?")
        page.get_by_role("button", name="Ask", exact=True).click()
        runs = page.get_by_role("region", name="Runs")
        run = runs.locator("article.run").first
        expect(run.get_by_role("heading", name="How is the canary doing?")).to_be_visible()
        answer = run.get_by_role("region", name="Answer")
        expect(answer).to_have_class(re.compile(r"\bstreaming\b"))  # tokens arriving
        expect(page.get_by_role("button", name="Stop")).to_be_visible()
        expect(run).to_have_attribute("data-status", "completed")
        tools = run.get_by_role("list", name="Tool calls")
        expect(tools.locator('li[data-tool="release_list"]')).to_have_attribute("data-state", "ok")
        refused = tools.locator('li[data-tool="drift_reports"]')
        expect(refused).to_have_attribute("data-state", "failed")
        expect(refused).to_contain_text("needs an API key with the 'monitor' scope")
        expect(refused).to_contain_text('{"limit":3}')
        expect(answer).to_contain_text(ANALYSIS)
        expect(answer).to_contain_text("Findings:")
        expect(answer).to_contain_text("[1] No release is running.")
        expect(answer).to_contain_text("could not run drift_reports")
        expect(answer).not_to_have_class(re.compile(r"\bstreaming\b"))
        expect(run.locator(".run-status")).to_have_text("completed")
        assert run.get_attribute("data-run-id", timeout=1000).startswith("run-")
        expect(page.get_by_role("button", name="Ask", exact=True)).to_be_enabled()
        expect(page.get_by_role("button", name="Stop")).to_be_hidden()
        page.screenshot(path=str(artifacts / "ops-canary.png"))

        # --- a readiness question (the example, the prompt's name typed over its blank): a proposal that waits
        page.get_by_role("button", name="Is prompt <name> v2 ready for production?").click()
        page.keyboard.type("support-qa")
        expect(question).to_have_value("Is prompt support-qa v2 ready for production?")
        question.press("Control+Enter")
        run = runs.locator("article.run").first
        expect(run.get_by_role("heading", name="Is prompt support-qa v2 ready for production?")).to_be_visible()
        expect(run).to_have_attribute("data-status", "interrupted")
        expect(run.locator(".run-status")).to_have_text("waiting for approval")
        run_id = run.get_attribute("data-run-id")
        proposal = run.get_by_role("region", name=re.compile("Proposed action"))
        expect(proposal.locator(".proposal-tool")).to_have_text("prompt_promote")
        expect(proposal.locator(".proposal-reason")).to_have_text("point support-qa@production at v2 (the gate passes)")
        expect(proposal.locator(".proposal-args")).to_contain_text('"name": "support-qa"')
        expect(proposal.locator(".proposal-args")).to_contain_text('"version": 2')
        for tool in ("prompt_list", "prompt_versions", "prompt_gate"):
            expect(run.locator(f'li[data-tool="{tool}"]')).to_have_attribute("data-state", "ok")
        expect(run.get_by_role("region", name="Answer")).to_contain_text(ANALYSIS)  # the analysis so far
        # the list shows it too (re-read as soon as the run paused)
        item = approvals.locator(f'li[data-run-id="{run_id}"]')
        expect(item).to_contain_text("prompt_promote")
        expect(item).to_contain_text("Is prompt support-qa v2 ready for production?")
        expect(sidebar.locator("#list-status")).to_have_text("1 run waiting for approval")
        assert _production(api, "support-qa") == 1  # nothing moved before a person approved
        tall_screenshot(page, artifacts / "ops-proposal.png")

        # --- approved on the page: the run resumes, the label moves, nothing waits any more
        proposal.get_by_label("Reason (optional)").fill("v2 is what we tested")
        proposal.get_by_role("button", name="Approve").click()
        expect(run).to_have_attribute("data-status", "completed")
        final = run.get_by_role("region", name="Answer")
        expect(final).to_contain_text("Findings:")
        expect(final).to_contain_text("The promotion gate PASSES support-qa v2")
        expect(final).to_contain_text(
            "Proposed: point support-qa@production at v2 (the gate passes) - approved and done.")
        expect(run.locator('li[data-tool="prompt_promote"]')).to_have_attribute("data-state", "ok")
        expect(run.locator(".proposal")).to_contain_text("Approved — “v2 is what we tested”.")
        expect(run.locator(".proposal").get_by_role("button")).to_have_count(0)
        expect(approvals.get_by_role("listitem")).to_have_count(0)
        expect(sidebar.locator("#list-status")).to_have_text("Nothing is waiting for approval.")
        assert _production(api, "support-qa") == 2
        assert _approvals(api) == []
        tall_screenshot(page, artifacts / "ops-approved.png")

        # --- a proposal made elsewhere appears in the live list, and is rejected there with a reason
        elsewhere = _call(api, "POST", "/v1/agents/ops/runs", key="ops", json={
            "input": "Is prompt faq-answers v2 ready for production?", "stream": False})
        assert elsewhere["status"] == "interrupted", elsewhere
        item = approvals.locator(f'li[data-run-id="{elsewhere["run_id"]}"]')
        expect(item).to_be_visible(timeout=LIVE_TIMEOUT_MS)
        expect(item).to_contain_text("point faq-answers@production at v2")
        expect(item.get_by_label("Arguments")).to_contain_text('"name": "faq-answers"')
        page.locator("#approval-list").screenshot(path=str(artifacts / "ops-approvals.png"))
        item.get_by_label("Reason (optional)").fill("not this week")
        item.get_by_role("button", name="Reject").click()
        rejected = runs.locator(f'article.run[data-run-id="{elsewhere["run_id"]}"]')
        expect(rejected).to_have_attribute("data-status", "completed")
        expect(rejected.get_by_role("heading", name="Is prompt faq-answers v2 ready for production?")).to_be_visible()
        expect(rejected.locator(".proposal")).to_contain_text("Rejected — “not this week”.")
        refused_call = rejected.locator('li[data-tool="prompt_promote"]')
        expect(refused_call).to_have_attribute("data-state", "rejected")
        expect(refused_call).to_contain_text('"name":"faq-answers"')
        expect(refused_call).to_contain_text("not this week")
        expect(rejected.get_by_role("region", name="Answer")).to_contain_text("Proposed: point faq-answers@production")
        expect(rejected.get_by_role("region", name="Answer")).not_to_contain_text("approved and done")
        expect(item).to_have_count(0)
        assert _production(api, "faq-answers") == 1
        assert _approvals(api) == []

        # --- decided behind the page's back: the page's approval gets the API's answer, and the item leaves
        page.get_by_label(re.compile("Live")).uncheck()
        again = _call(api, "POST", "/v1/agents/ops/runs", key="ops", json={
            "input": "Is prompt faq-answers v2 ready for production?", "stream": False})
        page.get_by_role("button", name="Refresh now").click()
        item = approvals.locator(f'li[data-run-id="{again["run_id"]}"]')
        expect(item).to_be_visible()
        _call(api, "POST", f"/v1/agents/runs/{again['run_id']}/resume", key="ops",
              json={"action": "reject", "reason": "decided in the CLI", "stream": False})
        item.get_by_role("button", name="Approve").click()
        expect(page.locator("#toast")).to_contain_text(f"Could not approve {again['run_id']}")
        expect(page.locator("#toast")).to_contain_text("run_not_resumable")
        expect(item).to_have_count(0)
        assert _production(api, "faq-answers") == 1
        expect(page.locator("#app")).not_to_contain_text("[object ")
        tall_screenshot(page, artifacts / "ops-runs.png")

        # --- the key stays in this tab only, and forgetting it returns to the login form
        forget_key(page, STORAGE_KEY, api.keys["ops"])


@pytest.mark.slow
def test_errors_stop_and_a_refused_key_are_shown_on_the_page(browser_ready: None, api: ApiServer,
                                                              artifacts: Path) -> None:
    from playwright.sync_api import expect

    with chromium_page(artifacts, "ops-keys") as page:
        # a key the tab kept that the server does not know: the login form, with the server's reason
        page.goto(f"{api.url}/ops")
        page.evaluate(f"sessionStorage.setItem('{STORAGE_KEY}', '{BAD_KEY}')")
        page.reload()
        expect(page.get_by_label("API key")).to_be_visible()
        expect(page.locator("#login-error")).to_contain_text("check the API key")
        assert page.evaluate(f"sessionStorage.getItem('{STORAGE_KEY}')") is None
        expect(page.locator("#app")).to_be_hidden()
        page.screenshot(path=str(artifacts / "ops-login-error.png"))

        connect(page, api.keys["doomed"])
        expect(page.get_by_role("status").filter(has_text="Nothing is waiting for approval.")).to_be_visible()
        runs = page.get_by_role("region", name="Runs")
        question = page.get_by_label("Question")
        ask = page.get_by_role("button", name="Ask", exact=True)

        # the API's error before a run starts (here a rate limit) is shown on the run's card, with its code
        limited = {"error": {"message": "rate limit exceeded: 60 requests per minute", "type": "rate_limit_error",
                             "code": "rate_limited"}}
        page.route("**/v1/agents/ops/runs", lambda route: route.fulfill(
            status=429, content_type="application/json", body=json.dumps(limited)))
        question.fill("How is the canary doing?")
        ask.click()
        card = runs.locator("article.run").first
        expect(card).to_have_attribute("data-status", "not_started")
        expect(card.get_by_role("alert")).to_have_text(
            "The run could not start: rate limit exceeded: 60 requests per minute (rate_limited)")
        # a stream that breaks off before the run ends says so
        page.unroute("**/v1/agents/ops/runs")
        started = {"type": "run.started", "seq": 0, "run_id": "run-cut", "workflow": "ops", "resumed": False}
        page.route("**/v1/agents/ops/runs", lambda route: route.fulfill(
            status=200, content_type="text/event-stream",
            body=f"event: run.started\nid: 0\ndata: {json.dumps(started)}\n\n"))
        ask.click()
        expect(card).to_have_attribute("data-run-id", "run-cut")
        expect(card).to_have_attribute("data-status", "failed")
        expect(card.get_by_role("alert")).to_contain_text("The stream ended before the run did")
        page.unroute("**/v1/agents/ops/runs")
        page.screenshot(path=str(artifacts / "ops-errors.png"))

        # Stop: the page stops reading, the server cancels the run (the model writes slowly meanwhile)
        api.backends["local"].delay_s = 0.5
        ask.click()
        card = runs.locator("article.run").first
        expect(card.get_by_role("region", name="Answer")).to_have_class(re.compile(r"\bstreaming\b"))
        run_id = card.get_attribute("data-run-id")
        page.get_by_role("button", name="Stop").click()
        expect(card).to_have_attribute("data-status", "stopped")
        expect(card.get_by_role("alert")).to_contain_text(f"POST /v1/agents/runs/{run_id}/resume")
        expect(ask).to_be_enabled()
        api.backends["local"].delay_s = 0.12
        deadline = time.monotonic() + 15
        while _call(api, "GET", f"/v1/agents/runs/{run_id}")["status"] != "cancelled":
            assert time.monotonic() < deadline, "the server did not cancel the run"
            time.sleep(0.2)

        # a key revoked while the page is open: the next request (the list's refresh, or a question) is a 401
        key_id = next(k["id"] for k in _call(api, "GET", "/v1/admin/keys") if k["name"] == "doomed")
        _call(api, "DELETE", f"/v1/admin/keys/{key_id}")
        ask.click()
        expect(page.get_by_label("API key")).to_be_visible()
        expect(page.locator("#login-error")).to_contain_text("The server refused the key")
        expect(page.locator("#app")).to_be_hidden()
        page.screenshot(path=str(artifacts / "ops-key-revoked.png"))
