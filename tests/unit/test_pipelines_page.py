"""The Pipelines page (``/pipelines``): continuous-training pipelines, their runs as a graph of steps, and a person's
start, approval, rejection, cancellation and retry of a run.

What every page shares (serving, headers, the shared parts, links, modules, the elements its scripts look up) is
tested in test_studio_pages.py; here, what only this page has: it is served with the strict headers and holds no
inline script or style, writes what the server sends as text, calls the pipelines API only — and the page itself in
headless Chromium (tests/browser.py) against a real API on a localhost port (tests/cli_server.py) whose pipeline
definitions live in a temporary folder (``pipelines.dirs``). Runs are seeded straight into the server's pipeline
store (nothing is trained); what the page then asks for (reject, start, retry, cancel) runs on the server's job
runner for real:

* the pipelines are listed with their model, triggers, approval mode and last run, and a definition file that does
  not load is reported;
* a run waiting for approval is drawn as the seven steps with their states; a step's log and artifacts are shown
  when it is picked (by mouse or arrow keys), and the pick stays across refreshes;
* starting a run of a pipeline whose run is open shows the API's 409; rejecting the waiting run with a reason ends
  it ``failed`` / ``rejected`` with the reason shown, and the live refresh stops once nothing is open;
* a run started on the page fails on an error (no base model on this server) and Retry resumes it at its failed
  step; a run that failed at its eval gate shows why and offers no retry;
* a key without the finetune scope is refused at the login, one without releases cannot reject or cancel (the
  API's message says why), and cancelling with a key that can ends the run and its open steps.

Screenshots of every view are kept as test artifacts (tests/browser.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.api.routes.studio import PIPELINES_DIR, render_page
from tests import browser
from tests.browser import BAD_KEY, chromium_page, connect, forget_key, tall_screenshot
from tests.cli_server import ApiServer
from tests.fakes.llm import ScriptedBackend
from tests.unit import test_studio_pages as pages

client = pages.client  # the fixture
browser_ready, artifacts = browser.browser_ready, browser.artifacts  # the shared fixtures

ROOT = Path(__file__).resolve().parents[2]
JS = PIPELINES_DIR / "js"
STORAGE_KEY = "keel.pipelines.apiKey"
STEPS = ["trigger", "dataset", "finetune", "evaluate", "canary", "approval", "promote"]
SETTINGS = {
    "backends": {"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
    "models": {"m": {"backend": "local", "model": "fake-model"}}, "default_model": "m",
    "guardrails": {"enabled": False}, "releases": {"check_interval_s": 0},
    "auth": {"default_rate_limit_per_minute": 100_000},
}
# Playwright's default wait (tests/browser.py) is 15 s; the page re-reads every 3 s while a run is open, and the
# server's job runner takes its moment to run the step a decision resumes.
LIVE_TIMEOUT_MS = 20_000


# -- what is served ------------------------------------------------------------------------------------------


_JS, _CSS = "text/javascript; charset=utf-8", "text/css; charset=utf-8"


async def test_the_page_and_its_assets_are_served_with_strict_headers(client) -> None:
    r = await client.get("/pipelines")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>Pipelines · Keel</title>" in r.text
    csp = r.headers["content-security-policy"]
    for rule in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
                 "frame-ancestors 'none'"):
        assert rule in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["referrer-policy"] == "no-referrer"
    assert '<a href="/pipelines" aria-current="page">Pipelines</a>' in r.text
    assert r.text.count("aria-current") == 1
    for path, media_type in (("js/main.js", _JS), ("js/api.js", _JS), ("js/graph.js", _JS),
                             ("pipelines.css", _CSS)):
        asset = await client.get(f"/pipelines/static/{path}")
        assert asset.status_code == 200, path
        assert asset.headers["content-type"] == media_type
        assert asset.headers["x-content-type-options"] == "nosniff" and asset.headers["cache-control"] == "no-cache"
    assert (await client.get("/pipelines/static/common/page.js")).status_code == 200
    assert (await client.get("/pipelines/static/../ops/js/main.js")).status_code == 404
    assert (await client.get("/pipelines/static/..%2Fops%2Fjs%2Fmain.js")).status_code == 404


async def test_every_page_links_to_the_pipelines_page(client) -> None:
    for page in pages.PAGES:
        html = (await client.get(f"/{page}")).text
        nav = re.search(r'<nav class="app-nav" aria-label="Keel pages">(.*?)</nav>', html, flags=re.S).group(1)
        assert re.findall(r'<a href="/(\w+)"', nav)[-1] == "pipelines", page
        current = ' aria-current="page"' if page == "pipelines" else ""
        assert f'<a href="/pipelines"{current}>Pipelines</a>' in nav, page


def test_no_inline_script_or_style_and_server_text_is_never_html() -> None:
    """The CSP refuses inline scripts and styles, so the page has none; what the server sends (logs, artifacts,
    reasons, errors) goes into the page as text. The graph is the page's own DOM and SVG: nothing from a CDN."""
    html = render_page("pipelines")
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and "<style" not in html
    assert not re.search(r"\sstyle=", html) and not re.search(r"\son[a-z]+=", html)
    assert not re.search(r'(?:src|href)="(?:https?:)?//', html)
    for module in JS.glob("*.js"):
        text = module.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                     ".style.", "http://cdn", "https://"):
            assert sink not in text, (module.name, sink)
        for target in re.findall(r'from "([^"]+)"', text):
            assert target.startswith("."), (module.name, target)  # no bare or remote imports


def test_the_graph_knows_the_servers_steps_in_order() -> None:
    from lifecycle.pipeline.spec import STEPS as SERVER_STEPS

    graph = (JS / "graph.js").read_text()
    listed = re.search(r"export const STEPS = \[([^\]]+)\]", graph).group(1)
    assert [s.strip().strip('"') for s in listed.split(",")] == list(SERVER_STEPS) == STEPS


def _client_calls() -> set[tuple[str, str]]:
    source = (JS / "api.js").read_text()
    parts = {"${enc(name)}": "{name}", "${enc(runId)}": "{run_id}"}
    calls = set()
    for method, path in re.findall(r'request\("(GET|POST|PUT|DELETE)", [`"]([^`"]+)[`"]', source):
        for part, name in parts.items():
            path = path.replace(part, name)
        if "${action}" in path:  # act(): one path per action
            calls |= {(method, path.replace("${action}", a)) for a in ("approve", "reject", "cancel", "retry")}
        else:
            calls.add((method, path))
    return calls


async def test_the_page_calls_the_pipelines_api_only_and_each_call_is_a_route(client) -> None:
    calls = _client_calls()
    assert calls == {("GET", "/v1/pipelines"), ("POST", "/v1/pipelines/{name}/runs"), ("GET", "/v1/pipelines/runs"),
                     ("GET", "/v1/pipelines/runs/{run_id}"), ("POST", "/v1/pipelines/runs/{run_id}/approve"),
                     ("POST", "/v1/pipelines/runs/{run_id}/reject"), ("POST", "/v1/pipelines/runs/{run_id}/cancel"),
                     ("POST", "/v1/pipelines/runs/{run_id}/retry")}
    routes = {(m, r.path) for r in pages.app_routes(client.app.routes) for m in r.methods}
    assert calls <= routes, sorted(calls - routes)


def test_every_element_the_scripts_look_up_is_on_the_page() -> None:
    html = render_page("pipelines")
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    looked_up = set()
    for module in JS.glob("*.js"):
        looked_up |= set(re.findall(r'\$\("([^"]+)"\)', module.read_text()))
    assert looked_up and looked_up <= ids, sorted(looked_up - ids)
    for target in re.findall(r'(?:for|aria-controls|aria-labelledby|aria-describedby)="([^"]+)"', html):
        assert target in ids, target


# -- in a browser, against a real API ------------------------------------------------------------------------


def _definitions(folder: Path) -> Path:
    """Pipeline definitions in ``folder/defs`` (the job spec they retrain in ``folder/jobs``): ``demo`` and ``held``
    (a canary, a person approves), ``quick`` (no canary, automatic approval, a schedule), and a broken file."""
    jobs, defs = folder / "jobs", folder / "defs"
    jobs.mkdir()
    defs.mkdir()
    job = yaml.safe_load((ROOT / "finetune" / "jobs" / "veltmar-fact.yaml").read_text())
    job["dataset"]["path"] = str(ROOT / "finetune" / "jobs" / "data" / "veltmar.jsonl")
    assert job["evals"]
    (jobs / "job.yaml").write_text(yaml.safe_dump(job))
    (defs / "demo.yaml").write_text(
        "name: demo\ndescription: The demo pipeline of the page test.\njob: ../jobs/job.yaml\n"
        "canary: {endpoint: demo, steps: [50, 100], min_requests: 5}\npromote: {approval: required}\n")
    (defs / "held.yaml").write_text(
        "name: held\njob: ../jobs/job.yaml\ncanary: {endpoint: held, steps: [100], min_requests: 5}\n")
    (defs / "quick.yaml").write_text(
        "name: quick\njob: ../jobs/job.yaml\ntriggers: [{kind: schedule, every: 7d}]\npromote: {approval: auto}\n")
    (defs / "broken.yaml").write_text("name: Not A Name\njob: nowhere.yaml\n")
    return defs


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """The API with the test's pipeline definitions (no trigger loop: runs start when the test or the page starts
    them). ``ops``: finetune and releases (everything the page does); ``trainer``: finetune only (sees and starts
    runs, cannot decide them); ``releases``: no finetune."""
    folder = tmp_path_factory.mktemp("pipelines-page")
    settings = {**SETTINGS, "pipelines": {"dirs": [str(_definitions(folder))], "triggers": False}}
    server = ApiServer(folder / "home", settings=settings, backends={"local": ScriptedBackend(reply="ok")},
                       keys={"admin": ["admin"], "ops": ["finetune", "releases"], "trainer": ["finetune"],
                             "releases": ["releases"]}).start()
    yield server
    server.stop()


def _call(server: ApiServer, method: str, path: str, key: str = "admin", **kw: Any) -> dict[str, Any]:
    r = httpx.request(method, f"{server.url}{path}", headers=server.h(key), timeout=60, **kw)
    assert r.status_code < 300, (path, r.status_code, r.text)
    return r.json()


def _create(server: ApiServer, name: str, reason: str) -> str:
    """A run of ``name`` straight in the store, with the exact definition a real start records."""
    svc = server.container.pipelines
    d = svc.definition(name)
    run = svc.store.create(
        pipeline=d.name, model=d.model, trigger={"kind": "manual", "by": "tester", "reason": reason},
        definition={"pipeline": d.spec.model_dump(mode="json"), "job": d.job.model_dump(mode="json"),
                    "source": d.source},
        definition_hash=d.hash, actor="tester", skip=() if d.spec.canary else ("canary",))
    return run.id


def _succeed(server: ApiServer, run_id: str, step: str, artifacts: dict[str, Any], line: str) -> None:
    store = server.container.pipelines.store
    store.step_started(run_id, step)
    store.step_update(run_id, step, state="succeeded", artifacts=artifacts, log=f"{line}\n", finished=True)


def _trained(server: ApiServer, run_id: str, name: str, *, version: int) -> None:
    """trigger, dataset and finetune done, as a run records them."""
    _succeed(server, run_id, "trigger", {"trigger": {"kind": "manual", "by": "tester"}}, f"started by tester: {name}")
    _succeed(server, run_id, "dataset", {
        "snapshot": {"path": f"/runs/{run_id}/dataset.jsonl", "records": 42, "sha256": "5e1f" * 16},
        "contract": {"ok": True, "train_examples": 36, "validation_examples": 6}},
        "dataset 5e1f5e1f5e1f: 42 records, contract passed")
    _succeed(server, run_id, "finetune", {"model": "veltmar-fact", "version": version,
                                          "metrics": {"train_loss": 0.4123, "eval_loss": 0.5}},
             f"trained veltmar-fact version {version}")


def _seed_waiting(server: ApiServer, name: str) -> str:
    """A run of ``name`` whose gate and canary passed, waiting for a person's approval."""
    store = server.container.pipelines.store
    run_id = _create(server, name, "more data")
    _trained(server, run_id, name, version=3)
    _succeed(server, run_id, "evaluate", {"gate": {"passed": True, "reason": "every suite passed"},
                                          "suites": {"veltmar-fact": {"passed": True, "metrics": {"accuracy": 0.9}}}},
             "eval gate on veltmar-fact/3: passed (every suite passed)")
    _succeed(server, run_id, "canary", {"release": name, "status": "ready", "candidate": "veltmar-fact-v3",
                                        "baseline": "m"}, f"canary passed: {name} at 100%")
    store.step_started(run_id, "approval")
    store.step_update(run_id, "approval", state="waiting",
                      log="waiting for a person to approve or reject (API, CLI, web page)\n")
    store.set_run(run_id, state="waiting")
    return run_id


def _seed_gate_failed(server: ApiServer, name: str) -> str:
    store = server.container.pipelines.store
    run_id = _create(server, name, "first try")
    _trained(server, run_id, name, version=2)
    why = "the eval gate refused veltmar-fact/2: veltmar-fact accuracy 0.40 < 0.80"
    store.step_started(run_id, "evaluate")
    store.step_update(run_id, "evaluate", state="failed", error=why, artifacts={"gate": {"passed": False}},
                      log=f"failed: {why}\n", finished=True)
    store.finish(run_id, "failed", outcome="gate_failed", error=why)
    return run_id


def _run(server: ApiServer, run_id: str) -> dict[str, Any]:
    return _call(server, "GET", f"/v1/pipelines/runs/{run_id}")


@pytest.mark.slow
def test_runs_as_a_graph_start_reject_and_retry_in_the_browser(browser_ready: None, api: ApiServer,
                                                               artifacts: Path) -> None:
    from playwright.sync_api import expect

    old = _seed_gate_failed(api, "demo")
    waiting = _seed_waiting(api, "demo")
    with chromium_page(artifacts, "pipelines") as page:
        page.goto(f"{api.url}/pipelines")
        expect(page).to_have_title(re.compile("Pipelines"))
        nav = page.get_by_role("navigation", name="Keel pages")
        expect(nav.get_by_role("link", name="Pipelines")).to_have_attribute("aria-current", "page")

        # --- connect: a wrong key, then one without the finetune scope, are refused with the reason
        connect(page, BAD_KEY, refused="does not accept")
        connect(page, api.keys["releases"], refused="lacks the 'finetune' scope")
        expect(page.locator("#login-error")).to_contain_text("the Pipelines page needs a key with the finetune scope")
        connect(page, api.keys["ops"])

        # --- the pipelines, with their model, triggers, approval and last run; the file that does not load
        listing = page.get_by_role("list", name="Pipeline list")
        for name in ("demo", "held", "quick", "veltmar"):
            expect(listing.locator(f'li[data-pipeline="{name}"]')).to_be_visible()
        demo = listing.locator('li[data-pipeline="demo"]')
        expect(demo).to_contain_text("veltmar-fact")
        expect(demo).to_contain_text("approval required")
        expect(demo).to_contain_text("canary demo")
        expect(demo).to_contain_text("triggers: manual only")
        expect(demo.locator(".pipeline-last .run-chip")).to_have_text("waiting")
        quick = listing.locator('li[data-pipeline="quick"]')
        expect(quick).to_contain_text("every 7.0 days")
        expect(quick).to_contain_text("auto approval")
        expect(quick).to_contain_text("no runs yet")
        expect(listing.locator('li[data-pipeline="veltmar"]')).to_contain_text("drift (input_embedding, topic_mix)")
        expect(page.locator("#definition-errors")).to_contain_text("broken.yaml")
        expect(page.locator("#list-status")).to_have_text("4 pipelines")

        # --- demo's runs: the newest (waiting) is shown as the graph of its seven steps
        demo.get_by_role("button").click()
        expect(demo.get_by_role("button")).to_have_attribute("aria-current", "true")
        runs = page.get_by_role("list", name="Runs")
        expect(runs.get_by_role("listitem")).to_have_count(2)
        expect(runs.locator(f'li[data-run-id="{waiting}"] button')).to_have_attribute("aria-current", "true")
        expect(runs.locator(f'li[data-run-id="{old}"]')).to_contain_text("gate failed")
        view = page.locator("#run-view")
        expect(view).to_have_attribute("data-run-id", waiting)
        expect(view).to_have_attribute("data-state", "waiting")
        expect(page.get_by_role("heading", name=f"Run {waiting}")).to_be_visible()
        graph = page.get_by_role("list", name="Steps")
        nodes = graph.get_by_role("listitem")
        expect(nodes).to_have_count(7)
        assert [n.get_attribute("data-step") for n in nodes.all()] == STEPS
        expected = ["succeeded"] * 5 + ["waiting", "pending"]
        assert [n.get_attribute("data-state") for n in nodes.all()] == expected
        approval_node = graph.locator('li[data-step="approval"]')
        expect(approval_node).to_have_class(re.compile(r"\bneeds-you\b"))
        expect(approval_node).to_contain_text("waiting for you")
        expect(graph.locator('li[data-step="dataset"]')).to_contain_text("1 attempt")
        expect(graph.locator("svg.graph-arrow")).to_have_count(6)
        # the step it waits at is open first, with its log
        step_view = page.locator("#step-view")
        expect(step_view).to_have_attribute("data-step", "approval")
        expect(page.locator("#step-log")).to_contain_text("waiting for a person to approve or reject")
        approval = page.get_by_role("region", name="Waiting for your approval")
        expect(approval).to_contain_text("veltmar-fact v3")
        expect(approval).to_contain_text("passed — every suite passed")
        expect(approval).to_contain_text("demo: ready (m vs veltmar-fact-v3)")
        expect(page.locator("#act-cancel")).to_be_visible()
        expect(page.locator("#act-retry")).to_be_hidden()
        facts = page.locator("#run-facts")
        expect(facts).to_contain_text("manual")
        expect(facts).to_contain_text("more data")
        expect(facts).to_contain_text("waiting for a person")
        expect(page.locator("#audit tr[data-action='run.start']")).to_contain_text("more data")
        tall_screenshot(page, artifacts / "pipelines-waiting.png")

        # --- a step picked shows its log and artifacts; the pick stays across refreshes
        graph.get_by_role("button", name=re.compile("^dataset")).click()
        expect(step_view).to_have_attribute("data-step", "dataset")
        expect(graph.locator('li[data-step="dataset"] button')).to_have_attribute("aria-pressed", "true")
        expect(page.get_by_role("heading", name=re.compile("Step 2 of 7: dataset"))).to_be_visible()
        expect(page.locator("#step-log")).to_contain_text("dataset 5e1f5e1f5e1f: 42 records, contract passed")
        arts = page.get_by_role("region", name="Artifacts")
        expect(arts.locator('[data-key="snapshot"] [data-key="records"] dd')).to_have_text("42")
        expect(arts.locator('[data-key="contract"] [data-key="ok"] dd')).to_have_text("yes")
        snapshot_path = arts.locator('[data-key="snapshot"] [data-key="path"] dd')
        expect(snapshot_path).to_have_text(f"/runs/{waiting}/dataset.jsonl")
        arts.get_by_text("As JSON").click()
        expect(arts.locator("details pre")).to_contain_text('"train_examples": 36')
        with page.expect_response(lambda r: f"/v1/pipelines/runs/{waiting}" in r.url):
            page.get_by_role("button", name="Refresh now").click()
        expect(step_view).to_have_attribute("data-step", "dataset")
        expect(graph.locator('li[data-step="dataset"] button')).to_have_attribute("aria-pressed", "true")
        # keyboard: arrow keys move between the steps
        graph.locator('li[data-step="dataset"] button').focus()
        page.keyboard.press("ArrowRight")
        expect(step_view).to_have_attribute("data-step", "finetune")
        expect(graph.locator('li[data-step="finetune"] button')).to_be_focused()
        expect(arts.locator('[data-key="metrics"] [data-key="train_loss"] dd')).to_have_text("0.4123")
        page.keyboard.press("End")
        expect(step_view).to_have_attribute("data-step", "promote")
        expect(page.locator("#step-log")).to_contain_text("has not run yet")
        expect(arts).to_contain_text("No artifacts recorded.")

        # --- Start run while a run is open: the API's 409, said plainly
        page.get_by_label("Reason (optional)", exact=True).fill("again")
        page.get_by_role("button", name="Start run").click()
        start_error = page.locator("#start-error")
        expect(start_error).to_be_visible()
        expect(start_error).to_contain_text("demo already has an open run")
        expect(start_error).to_contain_text(f"({waiting}, waiting)")
        expect(start_error).to_contain_text("(pipeline_run_open)")
        expect(start_error.get_by_role("button", name=f"Show run {waiting}")).to_be_visible()
        page.locator("#start-form").screenshot(path=str(artifacts / "pipelines-409.png"))

        # --- reject with a reason: the server's job runner runs the approval step, the run ends failed / rejected
        approval.get_by_label(re.compile("Reason")).fill("not this week")
        approval.get_by_role("button", name="Reject").click()
        expect(view).to_have_attribute("data-state", "failed", timeout=LIVE_TIMEOUT_MS)
        expect(view).to_have_attribute("data-outcome", "rejected")
        expect(page.locator("#action-status")).to_contain_text("Rejected")
        expect(approval).to_be_hidden()
        expect(graph.locator('li[data-step="approval"]')).to_have_attribute("data-state", "failed")
        expect(graph.locator('li[data-step="promote"]')).to_have_attribute("data-state", "pending")
        expect(graph.locator('li[data-step="approval"]')).not_to_have_class(re.compile(r"\bneeds-you\b"))
        decision = facts.locator(".fact-decision")
        expect(decision).to_contain_text("rejected")
        expect(decision).to_contain_text("not this week")
        expect(page.locator("#run-error")).to_contain_text("rejected: rejected by ops")
        expect(page.locator("#audit tr[data-action='run.reject']")).to_contain_text("not this week")
        expect(page.locator("#audit tr[data-action='run.failed']")).to_contain_text("rejected")
        expect(runs.locator(f'li[data-run-id="{waiting}"]')).to_contain_text("rejected")
        expect(page.locator("#act-cancel")).to_be_hidden()
        expect(page.locator("#act-retry")).to_be_hidden()  # a person's decision stands
        # nothing is open any more: the live refresh stops
        expect(page.locator("#live-note")).to_contain_text("No run is open", timeout=LIVE_TIMEOUT_MS)
        # the pick stayed on promote while the run changed
        expect(step_view).to_have_attribute("data-step", "promote")
        graph.get_by_role("button", name=re.compile("^approval")).click()
        expect(page.locator("#step-log")).to_contain_text("rejected by ops")
        expect(arts.locator('[data-key="decision"] [data-key="reason"] dd')).to_have_text("not this week")
        server = _run(api, waiting)
        assert (server["state"], server["outcome"]) == ("failed", "rejected")
        assert server["decision"]["reason"] == "not this week" and not server["decision"]["approved"]
        tall_screenshot(page, artifacts / "pipelines-rejected.png")

        # --- the older run failed at its eval gate: why, and no retry
        runs.locator(f'li[data-run-id="{old}"] button').click()
        expect(view).to_have_attribute("data-run-id", old)
        expect(graph.locator('li[data-step="evaluate"]')).to_have_attribute("data-state", "failed")
        for step in ("canary", "approval", "promote"):
            expect(graph.locator(f'li[data-step="{step}"]')).to_have_attribute("data-state", "pending")
        expect(step_view).to_have_attribute("data-step", "evaluate")
        expect(page.locator("#step-error")).to_contain_text("accuracy 0.40 < 0.80")
        expect(page.locator("#run-error")).to_contain_text("gate failed: the eval gate refused")
        expect(page.locator("#act-retry")).to_be_hidden()
        expect(page.locator("#act-cancel")).to_be_hidden()

        # --- a run started on the page: live, it fails on an error (no base model here); Retry resumes it
        quick.get_by_role("button").click()
        expect(page.locator("#runs-status")).to_have_text("No runs yet: start one above.")
        expect(view).to_be_hidden()
        page.get_by_label("Reason (optional)", exact=True).fill("try it")
        page.get_by_role("button", name="Start run").click()
        expect(runs.get_by_role("listitem")).to_have_count(1)
        started = runs.get_by_role("listitem").first.get_attribute("data-run-id")
        expect(view).to_have_attribute("data-run-id", started)
        expect(view).to_have_attribute("data-state", "failed", timeout=LIVE_TIMEOUT_MS)
        expect(view).to_have_attribute("data-outcome", "error")
        expect(graph.locator('li[data-step="trigger"]')).to_have_attribute("data-state", "succeeded")
        expect(graph.locator('li[data-step="dataset"]')).to_have_attribute("data-state", "failed")
        expect(graph.locator('li[data-step="canary"]')).to_have_attribute("data-state", "skipped")
        expect(page.locator("#step-error")).to_contain_text("base model")
        expect(facts).to_contain_text("try it")
        retry = page.get_by_role("button", name=re.compile("^Retry run"))
        expect(retry).to_be_visible()
        page.locator("#action-reason").fill("installed the model")
        retry.click()
        expect(graph.locator('li[data-step="dataset"]')).to_contain_text("2 attempts", timeout=LIVE_TIMEOUT_MS)
        expect(view).to_have_attribute("data-state", "failed", timeout=LIVE_TIMEOUT_MS)
        expect(page.locator("#audit tr[data-action='run.retry']")).to_contain_text("installed the model")
        assert _run(api, started)["steps"][1]["attempts"] == 2
        expect(page.locator("#app")).not_to_contain_text("[object ")
        expect(page.locator("#app")).not_to_contain_text("undefined")
        tall_screenshot(page, artifacts / "pipelines-retried.png")

        # --- the key stays in this tab only, and forgetting it returns to the login form
        forget_key(page, STORAGE_KEY, api.keys["ops"])


@pytest.mark.slow
def test_deciding_needs_the_releases_scope_and_cancel_ends_the_run(browser_ready: None, api: ApiServer,
                                                                   artifacts: Path) -> None:
    from playwright.sync_api import expect

    held = _seed_waiting(api, "held")
    with chromium_page(artifacts, "pipelines-keys") as page:
        page.goto(f"{api.url}/pipelines#pipeline=held")
        connect(page, api.keys["trainer"])
        view = page.locator("#run-view")
        expect(view).to_have_attribute("data-run-id", held)  # the pipeline named in the address
        expect(view).to_have_attribute("data-state", "waiting")
        assert f"run={held}" in page.evaluate("location.hash")

        # a finetune-only key sees the run, but its rejection and cancellation are refused with the API's reason
        approval = page.get_by_role("region", name="Waiting for your approval")
        approval.get_by_role("button", name="Reject").click()
        expect(page.locator("#approval-error")).to_contain_text(f"Could not reject run {held}")
        expect(page.locator("#approval-error")).to_contain_text("needs the 'releases' scope too")
        page.get_by_role("button", name=f"Cancel run {held}").click()
        expect(page.locator("#action-error")).to_contain_text("cancelling a pipeline run moves production traffic")
        expect(view).to_have_attribute("data-state", "waiting")
        assert _run(api, held)["state"] == "waiting"
        page.screenshot(path=str(artifacts / "pipelines-forbidden.png"))

        # with a key that may: cancel, with a reason; the open steps end cancelled
        page.get_by_role("button", name="Forget key").click()
        connect(page, api.keys["ops"])
        expect(view).to_have_attribute("data-run-id", held)
        page.locator("#action-reason").fill("wrong data")
        page.get_by_role("button", name=f"Cancel run {held}").click()
        expect(view).to_have_attribute("data-state", "cancelled")
        expect(view).to_have_attribute("data-outcome", "cancelled")
        graph = page.get_by_role("list", name="Steps")
        expect(graph.locator('li[data-step="approval"]')).to_have_attribute("data-state", "cancelled")
        expect(graph.locator('li[data-step="promote"]')).to_have_attribute("data-state", "cancelled")
        expect(graph.locator('li[data-step="canary"]')).to_have_attribute("data-state", "succeeded")
        expect(page.locator("#step-view")).to_have_attribute("data-step", "approval")  # where it stopped
        expect(page.locator("#run-chips")).to_have_text(re.compile(r"^\s*cancelled\s*state cancelled"))
        expect(page.get_by_role("region", name="Waiting for your approval")).to_be_hidden()
        expect(page.locator("#run-error")).to_contain_text("wrong data")
        expect(page.locator("#audit tr[data-action='run.cancelled']")).to_contain_text("wrong data")
        expect(page.locator("#act-cancel")).to_be_hidden()
        assert _run(api, held)["state"] == "cancelled"
        page.screenshot(path=str(artifacts / "pipelines-cancelled.png"))
