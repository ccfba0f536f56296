"""Prompt Studio in headless Chromium (Debian's package, driven by Playwright) against a real
Keel API, real vLLM and the real SmolLM2 model.

One user journey: connect with a key, create a template, edit it (messages, variable schema,
parameters) while the live preview follows, save version 2, run it with streamed output, lose a
save race (409), diff v1 against v2, promote v2 to production through the gate, and read the
audit history. Screenshots of every view are kept as test artifacts.

Needs /usr/bin/chromium and the `playwright` package (tests/browser.py): run `infra/setup-browser.sh`.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import httpx
import pytest

from tests import browser
from tests.browser import chromium_page, connect_after_a_wrong_key, create_key, forget_key
from tests.integration.conftest import KeelServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
browser_ready, artifacts = browser.browser_ready, browser.artifacts  # the shared fixtures

# Generation on a shared 2-core CPU: a short answer, but leave room for a busy machine.
RUN_TIMEOUT_MS = 120_000


@pytest.fixture
def studio_key(keel_server: KeelServer) -> str:
    """What a prompt engineer gets: edit templates and run them, nothing else (no admin)."""
    return create_key(keel_server.home, "prompt-engineer", ["prompts:write", "chat"])


def test_prompt_studio_end_to_end(
    browser_ready: None, keel_server: KeelServer, studio_key: str, artifacts: Path
) -> None:
    name = f"studio-e2e-{uuid.uuid4().hex[:6]}"
    with chromium_page(artifacts, "studio") as page:
        drive_studio(page, keel_server, studio_key, name, artifacts)


def drive_studio(page, server: KeelServer, key: str, name: str, artifacts: Path) -> None:
    from playwright.sync_api import expect

    page.goto(f"{server.url}/studio")
    expect(page).to_have_title(re.compile("Prompt Studio"))

    # --- connect: a wrong key is refused, the right one opens the template list
    connect_after_a_wrong_key(page, key)
    expect(page.get_by_role("list", name="Template list")).to_be_visible()
    expect(page.get_by_role("button", name="Open template rag-answer")).to_be_visible()  # seeded starter
    page.get_by_label("Search templates").fill("summar")
    expect(page.get_by_role("button", name="Open template summarize")).to_be_visible()
    expect(page.get_by_role("button", name="Open template rag-answer")).to_have_count(0)
    page.get_by_label("Search templates").fill("")

    # --- create a template
    page.get_by_role("button", name="New template").click()
    page.get_by_label("Template name").fill(name)
    page.get_by_label("Template description").fill("Browser test: answer in the requested tone")
    page.get_by_role("button", name="Create template").click()
    expect(page.get_by_role("heading", name=name)).to_be_visible()
    expect(page.get_by_role("button", name=f"Open template {name}")).to_be_visible()
    preview = page.get_by_label("Rendered preview")
    page.get_by_label("Value of question").fill("What is the capital of France?")
    expect(preview).to_contain_text("What is the capital of France?")
    expect(preview).to_contain_text("You are a helpful assistant")

    # --- edit: a variable the schema does not declare is an inline error, not a crash
    system = page.get_by_label("Message 1 content")
    system.fill("You are a {{ tone }} assistant.\n{% if short %}Answer in one short sentence.{% endif %}")
    preview_error = page.locator("#preview-error")
    expect(preview_error).to_be_visible()
    expect(preview_error).to_contain_text("undeclared")
    expect(preview_error).to_contain_text("tone")
    # Jinja is highlighted in the editor as it is typed.
    expect(page.locator(".message .tok-var", has_text="tone").first).to_be_visible()
    expect(page.locator(".message .tok-keyword", has_text="if").first).to_be_visible()

    # Declare the variables in the schema table beside the editor.
    page.get_by_role("button", name="Add variable").click()
    page.get_by_label("Variable 2 name").fill("tone")
    page.get_by_label("Variable 2 default").fill("friendly")
    page.get_by_label("Variable 2 description").fill("How the assistant sounds")
    page.get_by_label("Variable 2 required").uncheck()
    page.get_by_role("button", name="Declare used variables").click()  # finds `short`
    expect(page.get_by_label("Variable 3 name")).to_have_value("short")
    page.get_by_label("Variable 3 type").select_option("boolean")
    page.get_by_label("Variable 3 required").uncheck()
    expect(preview_error).to_be_hidden()
    expect(preview).to_contain_text("You are a friendly assistant.")  # the default applies
    expect(preview).not_to_contain_text("one short sentence")

    # Live preview follows the variable values as they change.
    page.get_by_label("Value of tone").fill("cheerful")
    expect(preview).to_contain_text("You are a cheerful assistant.")
    page.get_by_label("Value of short").select_option("true")
    expect(preview).to_contain_text("Answer in one short sentence.")
    expect(page.get_by_role("status").filter(has_text="Up to date")).to_be_visible()

    # Model parameters.
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens", exact=True).fill("24")
    page.get_by_label("Version message").fill("add tone and short variables")
    expect(page.get_by_role("status").filter(has_text="Up to date")).to_be_visible()
    page.screenshot(path=str(artifacts / "studio.png"), full_page=True)

    # --- save version 2
    page.get_by_role("button", name="Save as new version").click()
    expect(page.locator("#save-status")).to_contain_text(f"Saved {name}@2")
    expect(page.locator("#dirty")).to_be_hidden()
    v2 = httpx.get(f"{server.url}/v1/prompts/{name}/versions/2", headers={"Authorization": f"Bearer {key}"},
                   timeout=10).json()
    assert v2["message"] == "add tone and short variables"
    assert v2["content"]["params"] == {"model": None, "temperature": 0.0, "max_tokens": 24, "stop": None,
                                       "response_schema": None}
    assert [v["name"] for v in v2["content"]["variables"]] == ["question", "tone", "short"]
    assert "{{ tone }}" in v2["content"]["messages"][0]["content"]

    # --- run v2 against the real model: tokens stream in, the first chunk names ref and hash
    page.get_by_role("tab", name="Run").click()
    expect(page.get_by_label("Version to run")).to_have_value("2")
    page.get_by_role("button", name="Run", exact=True).click()
    output = page.get_by_label("Model output")
    expect(output).not_to_be_empty(timeout=RUN_TIMEOUT_MS)
    expect(page.locator("#run-meta")).to_contain_text(f"{name}@2")
    expect(page.locator("#run-meta")).to_contain_text(v2["hash"])
    expect(page.locator("#run-status")).to_contain_text("Done", timeout=RUN_TIMEOUT_MS)
    assert output.inner_text().strip(), "no streamed text appeared"
    page.screenshot(path=str(artifacts / "studio-run.png"), full_page=True)

    # The unsaved draft runs too (rendered messages sent as plain chat messages).
    page.get_by_label("Unsaved draft").check()
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("#run-status")).to_contain_text("Done", timeout=RUN_TIMEOUT_MS)
    expect(page.locator("#run-meta")).to_contain_text(f"{name}@draft")
    assert output.inner_text().strip(), "no streamed text appeared for the draft"

    # --- a save race: someone else saves v3 while this page still edits v2 -> 409, reload
    page.get_by_role("tab", name="Editor").click()
    other = httpx.post(
        f"{server.url}/v1/prompts/{name}/versions", headers={"Authorization": f"Bearer {key}"}, timeout=10,
        json={"content": v2["content"], "base_version": 2, "message": "a colleague's edit"},
    )
    assert other.status_code == 201, other.text
    page.get_by_label("Description", exact=True).fill("my conflicting edit")
    page.get_by_role("button", name="Save as new version").click()
    conflict = page.locator("#save-status .conflict")
    expect(conflict).to_contain_text("Someone saved a newer version")
    expect(conflict).to_contain_text("Reload")
    page.get_by_role("button", name="Reload latest version").click()
    expect(page.get_by_label("Open version")).to_have_value("3")
    expect(page.get_by_label("Description", exact=True)).to_have_value("Browser test: answer in the requested tone")

    # --- side-by-side diff v1 -> v2
    page.get_by_role("tab", name="Diff").click()
    page.get_by_label("From version").select_option("1")
    page.get_by_label("To version").select_option("2")
    page.get_by_role("button", name="Compare").click()
    diff = page.get_by_role("table", name=f"Differences between {name}@1 and {name}@2")
    expect(diff).to_be_visible()
    expect(diff.locator("td.diff-code.diff-del").filter(has_text="You are a helpful assistant")).not_to_have_count(0)
    expect(diff.locator("td.diff-code.diff-add").filter(has_text="{{ tone }}")).not_to_have_count(0)
    expect(diff.locator("td.diff-code.diff-add").filter(has_text="max_tokens: 24")).not_to_have_count(0)
    expect(page.get_by_label("Changed parts")).to_contain_text("messages changed")
    expect(page.get_by_label("Changed parts")).to_contain_text("variables changed")
    page.screenshot(path=str(artifacts / "studio-diff.png"), full_page=True)

    # --- promote v2 to production through the real eval gate: refused without a passing run of v2
    page.get_by_role("tab", name="Labels").click()
    page.get_by_label("Label", exact=True).fill("production")
    page.get_by_label("Target version").select_option("2")
    page.get_by_role("button", name="Move label", exact=True).click()
    verdict = page.get_by_role("status", name="Gate verdict")
    expect(verdict).to_contain_text(f"Gate refused {name}@2 for production")
    expect(verdict).to_contain_text(f"no completed eval run of {name}@2")
    page.screenshot(path=str(artifacts / "studio-gate-refused.png"), full_page=True)
    expect(page.get_by_role("table", name="Current labels")).not_to_contain_text("production")

    # CI (or the engineer) runs the suite bound to this exact version; then the same click goes through.
    run_suite(server, name, 2)
    page.get_by_role("button", name="Move label", exact=True).click()
    expect(verdict).to_contain_text("Moved production to v2")
    expect(verdict).to_contain_text("Gate verdict: passed")
    expect(verdict).to_contain_text("passing eval run")
    expect(page.get_by_role("table", name="Current labels")).to_contain_text("v2")
    page.screenshot(path=str(artifacts / "studio-labels.png"), full_page=True)
    # A custom label skips the gate.
    page.get_by_label("Label", exact=True).fill("staging")
    page.get_by_label("Target version").select_option("3")
    page.get_by_role("button", name="Move label", exact=True).click()
    expect(verdict).to_contain_text("Moved staging to v3")
    expect(verdict).to_contain_text("no gate check")
    # Overriding needs admin: this key is refused, with the reason shown.
    page.get_by_label("Label", exact=True).fill("production")
    page.get_by_label("Target version").select_option("1")
    page.get_by_label("Override reason (admin only, optional)").fill("rollback drill")
    page.get_by_role("button", name="Move label", exact=True).click()
    expect(verdict).to_contain_text("Label not moved")
    expect(verdict).to_contain_text("admin")
    page.get_by_label("Override reason (admin only, optional)").fill("")
    page.get_by_label("Target version").select_option("2")
    page.get_by_role("button", name="Move label", exact=True).click()
    expect(verdict).to_contain_text("already points at v2")
    # v3 has no eval run: the gate refuses it and the labels stay where they were.
    page.get_by_label("Target version").select_option("3")
    page.get_by_role("button", name="Move label", exact=True).click()
    expect(verdict).to_contain_text(f"Gate refused {name}@3 for production")
    expect(page.get_by_role("table", name="Current labels")).to_contain_text("v2")
    labels = httpx.get(f"{server.url}/v1/prompts/{name}/labels", headers={"Authorization": f"Bearer {key}"},
                       timeout=10).json()
    assert labels == {"production": 2, "staging": 3}

    # --- history: versions and the audit log with who / what / from -> to
    page.get_by_role("tab", name="History").click()
    versions = page.get_by_role("table", name="Versions")
    expect(versions.locator("tbody tr")).to_have_count(3)
    expect(versions).to_contain_text("add tone and short variables")
    expect(versions).to_contain_text("a colleague's edit")
    audit = page.get_by_role("table", name="Audit log")
    expect(audit.locator("tbody tr")).to_have_count(5)  # 3 versions + 2 label moves (refusals move nothing)
    production_row = audit.locator("tbody tr", has_text="production")
    expect(production_row).to_contain_text("label.move")
    expect(production_row).to_contain_text("— → v2")
    expect(production_row).to_contain_text("gate passed")
    expect(production_row).to_contain_text("prompt-engineer")
    expect(audit.locator("tbody tr", has_text="version.create")).to_have_count(3)
    page.screenshot(path=str(artifacts / "studio-history.png"), full_page=True)

    # --- the key stays in this tab only, and forgetting it returns to the login form
    forget_key(page, "keel.studio.apiKey", key)


def run_suite(server: KeelServer, name: str, version: int) -> None:
    """Write a one-case suite bound to ``name@version`` and run it through the API, as CI would."""
    import time

    import yaml

    suite = {"name": f"{name}-v{version}", "target": {"prompt": f"{name}@{version}",
                                                      "variables": {"question": "What is the capital of France?"},
                                                      "params": {"temperature": 0.0, "max_tokens": 16}},
             "dataset": {"cases": [{"id": "france", "input": "What is the capital of France?"}]},
             "metrics": [{"name": "latency_ms", "threshold": 120000}], "gate": {"min_pass_rate": 1.0}}
    (server.home / "suites" / f"{suite['name']}.yaml").write_text(yaml.safe_dump(suite))
    admin = server.headers("admin")
    r = httpx.post(f"{server.url}/v1/evals/runs", json={"suite": suite["name"]}, headers=admin, timeout=30)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + RUN_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        runs = httpx.get(f"{server.url}/v1/evals/runs", params={"suite": suite["name"]}, headers=admin,
                         timeout=30).json()
        if runs and runs[0]["status"] == "completed":
            assert runs[0]["passed"], runs[0]
            return
        time.sleep(1)
    raise AssertionError(f"the eval run of {suite['name']} did not finish: {runs}")
