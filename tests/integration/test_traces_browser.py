"""The Traces page in headless Chromium (Debian's package, driven by Playwright) against a real Keel API,
real vLLM and the real SmolLM2 model.

An operator's journey: real chat traffic goes through the API (an answer framed by a registry prompt, and a
grounded one over a small collection); in the page, a key without the admin scope is refused with the reason, the
admin key opens the list, the answer's trace is found by its completion id, its waterfall shows the span tree
(HTTP server -> keel.chat -> input guard, prompt rendering, the model call) with bars on the trace's time axis,
the model span shows the GenAI attributes (model, tokens, time to first token, finish reasons) matching what the
API answered, the guard span its verdicts, the keyboard moves through the spans, and the lineage section shows the
prompt version and hash, the route, the guardrail policy and verdicts — and the feedback given meanwhile. The
grounded answer's trace has its retrieval span and its lineage the passages. New traffic appears in the list
without a reload and the selection stays. Screenshots of every view are kept as test artifacts.

Needs /usr/bin/chromium and the `playwright` package (tests/browser.py): run `infra/setup-browser.sh`.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import browser
from tests.browser import BAD_KEY, chromium_page, connect, forget_key, tall_screenshot
from tests.integration.conftest import KeelServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
browser_ready, artifacts = browser.browser_ready, browser.artifacts  # the shared fixtures

# Generation on a shared 2-core CPU: short answers, but leave room for a busy machine.
CHAT_TIMEOUT_S = 120
# The list re-reads every 5 s; a trace recorded elsewhere shows within one or two rounds.
LIVE_TIMEOUT_MS = 20_000
DOC = ("# Lighthouses\n\nThe Eddystone lighthouse stands on rocks fourteen kilometres south of Plymouth. "
       "Its present tower, designed by James Douglass, was completed in 1882.\n")


def test_traces_page_end_to_end(browser_ready: None, keel_server: KeelServer, artifacts: Path) -> None:
    traffic = send_traffic(keel_server, uuid.uuid4().hex[:6])
    with chromium_page(artifacts, "traces") as page:
        drive_traces(page, keel_server, traffic, artifacts)


# -- traffic through the API, as clients send it ------------------------------------------------------------


def chat(server: KeelServer, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers("chat"), timeout=CHAT_TIMEOUT_S,
                   json={"max_tokens": 8, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def send_traffic(server: KeelServer, tag: str) -> dict[str, Any]:
    """A prompted answer and a grounded one; what the API said about each, and what the store recorded."""
    admin = server.headers("admin")
    prompt = f"traces-e2e-{tag}"
    r = httpx.post(f"{server.url}/v1/prompts", headers=admin, timeout=30, json={
        "name": prompt, "message": "v1", "content": {
            "description": "traces browser test",
            "messages": [{"role": "system", "content": "You are a helpful assistant. Answer in a few words."}]}})
    assert r.status_code == 201, r.text
    prompted = chat(server, prompt={"ref": f"{prompt}@1"}, messages=[{"role": "user", "content": "Say hello."}])
    collection = f"traces-{tag}"
    r = httpx.post(f"{server.url}/v1/ingest", files=[("files", ("lighthouse.md", DOC.encode(), "text/markdown"))],
                   data={"collection": collection}, headers=admin, timeout=60)
    assert r.status_code == 202, r.text
    job = httpx.get(f"{server.url}/v1/ingest/jobs/{r.json()['id']}?wait_s=60", headers=admin, timeout=90).json()
    assert job["state"] == "succeeded", job
    grounded = chat(server, model=f"rag:{collection}", max_tokens=12,
                    messages=[{"role": "user", "content": "When was the Eddystone lighthouse tower completed?"}])
    records = {}
    for name, answer in (("prompted", prompted), ("grounded", grounded)):
        rec = httpx.get(f"{server.url}/v1/lineage/{answer['id']}", headers=server.headers("chat"), timeout=30)
        assert rec.status_code == 200, rec.text
        trace = httpx.get(f"{server.url}/v1/traces/{rec.json()['trace_id']}", headers=admin, timeout=30)
        assert trace.status_code == 200, trace.text
        records[name] = {"answer": answer, "lineage": rec.json(), "spans": trace.json()["spans"]}
    records["prompt"] = prompt
    records["collection"] = collection
    return records


# -- the page ---------------------------------------------------------------------------------------------


def drive_traces(page, server: KeelServer, traffic: dict[str, Any], artifacts: Path) -> None:
    from playwright.sync_api import expect

    prompted = traffic["prompted"]
    answer, record = prompted["answer"], prompted["lineage"]
    completion_id, trace_id = answer["id"], record["trace_id"]
    model_name = f"chat {record['route']['model']}"

    page.goto(f"{server.url}/traces")
    expect(page).to_have_title(re.compile("Traces"))
    nav = page.get_by_role("navigation", name="Keel pages")
    expect(nav.get_by_role("link", name="Prompt Studio")).to_be_visible()
    expect(nav.get_by_role("link", name="Releases")).to_be_visible()
    expect(nav.get_by_role("link", name="Traces")).to_have_attribute("aria-current", "page")

    # --- connect: a wrong key is refused; a chat key is told traces need the monitor scope; the admin key opens
    connect(page, BAD_KEY, refused="does not accept")
    connect(page, server.keys["chat"], refused="lacks the 'monitor' scope")
    connect(page, server.keys["admin"])
    trace_list = page.get_by_role("list", name="Trace list")
    expect(trace_list).to_be_visible()
    expect(trace_list.locator(f'li[data-response-id="{completion_id}"]')).to_be_visible()
    page.screenshot(path=str(artifacts / "traces-list.png"))

    # --- find the answer's trace by its completion id
    page.get_by_label("Completion id").fill(completion_id)
    page.get_by_role("button", name="Apply filters").click()
    items = trace_list.get_by_role("listitem")
    expect(items).to_have_count(1)
    item = items.first
    expect(item).to_have_attribute("data-trace-id", trace_id)
    expect(item).to_contain_text("POST /v1/chat/completions")
    expect(item).to_contain_text(completion_id)
    expect(item).to_contain_text(f"{len(prompted['spans'])} spans")
    expect(page.get_by_role("status").filter(has_text="1 trace matching the filters")).to_be_visible()

    # --- the waterfall: one row per span, under its parent, with a bar on the trace's axis
    item.get_by_role("button").click()
    expect(page.get_by_role("heading", name="POST /v1/chat/completions", level=1)).to_be_visible()
    expect(page.locator("#trace-id")).to_have_text(trace_id)
    waterfall = page.get_by_role("table", name="Spans")
    rows = waterfall.locator("tbody tr")
    expect(rows).to_have_count(len(prompted["spans"]))
    tree = {r["name"]: r for r in rows.evaluate_all(
        "rs => rs.map(r => ({name: r.dataset.name, id: r.dataset.spanId, parent: r.dataset.parentId || null, "
        "depth: Number(r.dataset.depth), kind: r.querySelector('.kind').textContent.trim(), "
        "left: parseFloat(r.querySelector('.bar').style.left), "
        "width: parseFloat(r.querySelector('.bar').style.width)}))")}
    server_row, chat_row = tree["POST /v1/chat/completions"], tree["keel.chat"]
    assert server_row["depth"] == 0 and server_row["kind"] == "server" and server_row["parent"] is None
    assert chat_row["parent"] == server_row["id"] and chat_row["depth"] == 1
    assert tree["keel.auth"]["parent"] == server_row["id"]  # the key's check, before the chat
    for child in ("keel.guardrails.input", "keel.prompt.render", model_name):
        assert tree[child]["parent"] == chat_row["id"] and tree[child]["depth"] == 2, (child, tree)
    assert tree[model_name]["kind"] == "client"
    # under the model call, its HTTP request to vLLM (OpenTelemetry's httpx instrumentation)
    assert tree["POST"]["parent"] == tree[model_name]["id"] and tree["POST"]["kind"] == "client", tree
    assert server_row["left"] == 0 and server_row["width"] > 99  # the root spans the trace
    # the model call starts after the guard and prompt rendering, and ends inside keel.chat
    assert tree[model_name]["left"] > tree["keel.prompt.render"]["left"]
    assert tree[model_name]["left"] + tree[model_name]["width"] <= chat_row["left"] + chat_row["width"] + 0.5
    expect(waterfall.locator("tr.is-error")).to_have_count(0)
    page.locator("#trace-body").screenshot(path=str(artifacts / "traces-waterfall.png"))

    # --- the model span: GenAI attributes as the API answered them
    model_row = waterfall.locator(f'tr[data-name="{model_name}"]')
    # (anchored: the row's expand/collapse toggle is named "Collapse <model> (1 child span)")
    model_row.get_by_role("button", name=re.compile("^" + re.escape(model_name))).click()
    expect(model_row.locator(".span-btn")).to_have_attribute("aria-current", "true")
    detail = page.locator("#span-detail")
    expect(detail.get_by_role("heading", level=2)).to_contain_text(model_name)
    summary = detail.locator("#genai-summary")
    usage = answer["usage"]
    for label, value in (("Model", record["route"]["model"]), ("Input tokens", str(usage["prompt_tokens"])),
                         ("Output tokens", str(usage["completion_tokens"])),
                         ("Finish reasons", answer["choices"][0]["finish_reason"])):
        expect(summary.locator(".kv-row").filter(has=page.locator("dt", has_text=label)).locator("dd")).to_have_text(
            value)
    expect(summary.locator(".kv-row").filter(has=page.locator("dt", has_text="Time to first token"))).to_contain_text(
        re.compile(r"\d+(\.\d+)? (ms|s)"))
    attrs = detail.get_by_role("table", name="Span attributes")
    expect(attrs.locator('tr[data-attr="gen_ai.request.model"] td')).to_have_text(record["route"]["model"])
    expect(attrs.locator('tr[data-attr="gen_ai.request.max_tokens"] td')).to_have_text("8")
    expect(attrs.locator('tr[data-attr="gen_ai.response.id"] td')).to_have_text(completion_id)
    # gen_ai.* first, then the rest
    keys = attrs.locator("tr[data-attr]").evaluate_all("rs => rs.map(r => r.dataset.attr)")
    first_other = next(i for i, k in enumerate(keys) if not (k.startswith("gen_ai.") or k == "keel.ttft_ms"))
    assert all(not k.startswith("gen_ai.") for k in keys[first_other:]), keys
    model_span = next(sp for sp in prompted["spans"] if sp["name"] == model_name)
    if "gen_ai.input.messages" in model_span["attributes"]:  # otel.capture_content on
        expect(detail.get_by_role("region", name="Captured messages")).to_contain_text("Say hello.")
    else:  # off, as on this test server: the page says where the messages would be
        expect(detail.locator("#capture-off")).to_be_visible()
    page.locator("#trace-body").screenshot(path=str(artifacts / "traces-model-span.png"))

    # --- the keyboard: up moves to the previous span, Home to the root, left collapses, right expands
    model_row.locator(".span-btn").focus()
    page.keyboard.press("ArrowUp")
    order = list(tree)  # the rows as the waterfall shows them
    previous = waterfall.locator(f'tr[data-name="{order[order.index(model_name) - 1]}"]')
    expect(previous.locator(".span-btn")).to_have_attribute("aria-current", "true")
    expect(previous.locator(".span-btn")).to_be_focused()
    page.keyboard.press("Home")
    root_btn = waterfall.locator('tr[data-name="POST /v1/chat/completions"] .span-btn')
    expect(root_btn).to_have_attribute("aria-current", "true")
    for _ in range(order.index("keel.chat")):  # down past the spans before it (keel.auth)
        page.keyboard.press("ArrowDown")
    chat_btn = waterfall.locator('tr[data-name="keel.chat"] .span-btn')
    expect(chat_btn).to_be_focused()
    page.keyboard.press("ArrowLeft")
    expect(rows).to_have_count(sum(r["depth"] <= 1 for r in tree.values()))  # keel.chat's children hidden
    expect(waterfall.locator('tr[data-name="keel.chat"] .tree-toggle')).to_have_attribute("aria-expanded", "false")
    page.keyboard.press("ArrowRight")
    expect(rows).to_have_count(len(prompted["spans"]))

    # --- the input guard: every validator's verdict as a table
    guard_row = waterfall.locator('tr[data-name="keel.guardrails.input"]')
    guard_row.locator(".span-btn").click()
    guard_span = next(s for s in prompted["spans"] if s["name"] == "keel.guardrails.input")
    verdict_events = [e for e in guard_span["events"] if e["name"] == "guardrail.verdict"]
    assert verdict_events, guard_span
    verdicts = detail.get_by_role("table", name="Guardrail verdicts")
    expect(verdicts.locator("tbody tr")).to_have_count(len(verdict_events))
    first = verdict_events[0]["attributes"]
    expect(verdicts.locator(f'tr[data-validator="{first["keel.guardrails.validator"]}"]').first).to_contain_text(
        first["keel.guardrails.verdict"])

    # --- lineage: prompt version and hash, route, guardrail policy and verdicts; then feedback arrives
    lineage_button = page.get_by_role("button", name="Show lineage")
    lineage_button.click()
    lineage = page.locator("#lineage-body")
    prompt_part = lineage.locator('[data-part="prompt"]')
    expect(prompt_part).to_contain_text(f"{traffic['prompt']}@1")
    expect(prompt_part.locator(f'[title="{answer["prompt"]["hash"]}"]')).to_be_visible()
    expect(prompt_part).to_contain_text("No eval suite has run on this prompt version.")
    route = lineage.locator('[data-part="route"]')
    for value in (record["route"]["alias"], record["route"]["backend"], record["route"]["model"]):
        expect(route).to_contain_text(value)
    guard = lineage.locator('[data-part="guardrails"]')
    expect(guard).to_contain_text(answer["guardrails"])
    expect(guard.get_by_role("table", name="Lineage guardrail verdicts").locator("tbody tr")).to_have_count(
        len(record["guardrail_verdicts"]))
    expect(lineage.locator('[data-part="release"]')).to_contain_text("Not served through a release.")
    expect(lineage.locator('[data-part="passages"]')).to_contain_text("Not a grounded answer")
    expect(lineage.locator('[data-part="feedback"]')).to_contain_text("No feedback on this answer yet.")
    r = httpx.post(f"{server.url}/v1/feedback", headers=server.headers("chat"), timeout=30,
                   json={"id": completion_id, "rating": "down", "comment": "too terse"})
    assert r.status_code < 300, r.text
    page.get_by_role("button", name="Hide lineage").click()
    expect(lineage).to_be_hidden()
    page.get_by_role("button", name="Show lineage").click()
    feedback = lineage.get_by_role("table", name="Feedback")
    expect(feedback).to_contain_text("too terse")
    expect(feedback).to_contain_text("bad (0.00)")
    tall_screenshot(page, artifacts / "traces-lineage.png")

    # --- the grounded answer: its retrieval span and its passages
    grounded = traffic["grounded"]
    page.get_by_label("Completion id").fill("")
    page.get_by_label("Span name contains").fill("keel.rag.retrieve")
    page.get_by_role("button", name="Apply filters").click()
    grounded_item = trace_list.locator(f'li[data-response-id="{grounded["answer"]["id"]}"]')
    grounded_item.get_by_role("button").click()
    expect(page.locator("#trace-id")).to_have_text(grounded["lineage"]["trace_id"])
    retrieve = waterfall.locator('tr[data-name="keel.rag.retrieve"]')
    expect(retrieve).to_have_attribute("data-parent-id", waterfall.locator('tr[data-name="keel.chat"]')
                                       .get_attribute("data-span-id"))
    retrieve.locator(".span-btn").click()
    expect(detail.get_by_role("table", name="Retrieved chunks").locator("tbody tr")).to_have_count(
        len(grounded["lineage"]["retrieval"]))
    # the lineage section stays open from one trace to the next
    passages = lineage.get_by_role("table", name="Passages")
    expect(passages).to_contain_text("lighthouse.md")
    expect(passages.locator("tbody tr")).to_have_count(len(grounded["lineage"]["retrieval"]))
    expect(lineage.locator('[data-part="prompt"]')).to_contain_text("rag-answer@")
    events = grounded["lineage"]["guardrail_events"]
    if events:  # what the guards did to this answer (the output guard may retract a small model's answer)
        expect(lineage.get_by_role("table", name="Guardrail events").locator("tbody tr")).to_have_count(len(events))
    expect(page.locator("#trace-view")).not_to_contain_text("[object ")
    tall_screenshot(page, artifacts / "traces-grounded.png")

    # --- live: a new answer's trace appears without a reload, and the selection stays
    page.get_by_label("Span name contains").fill("")
    page.get_by_role("button", name="Clear").click()
    selected = trace_list.locator(f'li[data-trace-id="{grounded["lineage"]["trace_id"]}"] button')
    expect(selected).to_have_attribute("aria-current", "true")
    later = chat(server, messages=[{"role": "user", "content": "Say goodbye."}])
    expect(trace_list.locator(f'li[data-response-id="{later["id"]}"]')).to_be_visible(timeout=LIVE_TIMEOUT_MS)
    expect(selected).to_have_attribute("aria-current", "true")
    expect(page.locator("#trace-id")).to_have_text(grounded["lineage"]["trace_id"])
    # the page's own reads of the trace store are hidden by default
    expect(trace_list.locator("li").filter(has_text="GET /v1/traces")).to_have_count(0)

    # --- the key stays in this tab only, and forgetting it returns to the login form
    forget_key(page, "keel.traces.apiKey", server.keys["admin"])

