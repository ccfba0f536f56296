"""The Releases page in headless Chromium (Debian's package, driven by Playwright) against a real Keel API,
real vLLM and the real SmolLM2 model.

One release manager's journey: a canary of a new prompt version is created through the API and real chat
traffic goes through its endpoint; in the page, connect with a key that has only the `releases` scope, find the
release with its split and status, open it (variant numbers, comparisons, charts drawn from the series), watch
new traffic arrive without reloading, pause and resume it with reasons, see an action refused with the server's
message when someone else finished a release first, promote the canary (weights 0/100), and read the decision
history, then roll the promoted release back. Screenshots of every view are kept as test artifacts.

Needs /usr/bin/chromium and the `playwright` package (tests/browser.py): run `infra/setup-browser.sh`.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests import browser
from tests.browser import chromium_page, connect_after_a_wrong_key, create_key, forget_key, tall_screenshot
from tests.integration.conftest import KeelServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
browser_ready, artifacts = browser.browser_ready, browser.artifacts  # the shared fixtures

# Generation on a shared 2-core CPU: short answers, but leave room for a busy machine.
CHAT_TIMEOUT_S = 120
# The page re-reads everything every 5 s; a change made elsewhere shows within one or two rounds.
LIVE_TIMEOUT_MS = 20_000
# The variant colours of js/charts.js (PALETTE[0], PALETTE[1]): baseline, candidate.
LINE_COLOURS = {"stable": (0x0A, 0x6B, 0xB3), "canary": (0xD5, 0x5E, 0x00)}


@pytest.fixture
def releases_key(keel_server: KeelServer) -> str:
    """What a release manager gets: watch and steer releases, nothing else (no chat, no admin)."""
    return create_key(keel_server.home, "release-manager", ["releases"])


def test_releases_page_end_to_end(
    browser_ready: None, keel_server: KeelServer, releases_key: str, artifacts: Path
) -> None:
    name = f"rel-e2e-{uuid.uuid4().hex[:6]}"
    served = start_canary(keel_server, name)
    with chromium_page(artifacts, "releases") as page:
        drive_releases(page, keel_server, releases_key, name, served, artifacts)


# -- set-up through the API, as a CI pipeline would ---------------------------------------------------------


def start_canary(server: KeelServer, name: str) -> Counter[str]:
    """Two versions of a prompt, a canary from v1 (stable) to v2 (canary) on the default model, and real chat
    traffic through it until both variants have answered. Returns the requests each variant served."""
    admin = server.headers("admin")
    prompt = f"{name}-prompt"
    v1 = {"description": "release browser test", "params": {"max_tokens": 8, "temperature": 0.0},
          "messages": [{"role": "system", "content": "You are a helpful assistant. Answer in a few words."}]}
    v2 = {**v1, "messages": [{"role": "system", "content": "You are a friendly assistant. Answer in one short "
                                                            "sentence."}]}
    r = httpx.post(f"{server.url}/v1/prompts", json={"name": prompt, "content": v1, "message": "v1"}, headers=admin,
                   timeout=30)
    assert r.status_code == 201, r.text
    r = httpx.post(f"{server.url}/v1/prompts/{prompt}/versions", headers=admin, timeout=30,
                   json={"content": v2, "base_version": 1, "message": "friendlier"})
    assert r.status_code == 201, r.text
    # A long step window: the controller (judging every second here) holds the canary at 50% until a person acts.
    spec = {"name": name, "strategy": "canary", "unit": "request",
            "variants": [{"name": "stable", "prompt": f"{prompt}@1"}, {"name": "canary", "prompt": f"{prompt}@2"}],
            "canary": {"steps": [50, 100], "min_requests": 3, "min_duration_s": 3600, "max_duration_s": 7200},
            "metrics": [{"name": "errors", "margin": 0.5}],
            "reason": "browser test: roll out the friendlier prompt",
            # v2 has no eval run on this server; an admin starts the canary anyway, and the reason is recorded.
            "override_reason": "browser test, no suite for this prompt"}
    r = httpx.post(f"{server.url}/v1/releases", json=spec, headers=admin, timeout=30)
    assert r.status_code == 201, r.text
    assert r.json()["weights"] == {"stable": 50, "canary": 50}
    served: Counter[str] = Counter()
    for _ in range(24):
        chat(server, name, served)
        if len(served) == 2 and min(served.values()) >= 2 and sum(served.values()) >= 6:
            break
    assert min(served.get("stable", 0), served.get("canary", 0)) >= 2, served
    return served


def chat(server: KeelServer, release: str, served: Counter[str]) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers("chat"), timeout=CHAT_TIMEOUT_S,
                   json={"model": release, "max_tokens": 8, "temperature": 0,
                         "messages": [{"role": "user", "content": "Say hello."}]})
    assert r.status_code == 200, r.text
    endpoint, variant = r.headers["x-keel-release"].split("/")
    assert endpoint == release and r.json()["release"] == {"name": release, "variant": variant}
    served[variant] += 1


# -- the page ---------------------------------------------------------------------------------------------


def drive_releases(page, server: KeelServer, key: str, name: str, served: Counter[str], artifacts: Path) -> None:
    from playwright.sync_api import expect

    page.goto(f"{server.url}/releases")
    expect(page).to_have_title(re.compile("Releases"))
    expect(page.get_by_role("navigation", name="Keel pages").get_by_role("link", name="Prompt Studio")).to_be_visible()

    # --- connect: a wrong key is refused, the right one (scope `releases` only) opens the list
    connect_after_a_wrong_key(page, key)
    expect(page.get_by_role("list", name="Release list")).to_be_visible()

    # --- the list: strategy, status, split and the current decision of every release
    open_it = page.get_by_role("button", name=f"Open release {name}", exact=True)
    item = page.get_by_role("listitem").filter(has=open_it)
    expect(item).to_contain_text("canary")
    expect(item).to_contain_text("running")
    expect(item).to_contain_text("stable 50% · canary 50%")
    expect(item.locator(".release-decision")).to_contain_text(re.compile(r"(create|hold): "))
    page.screenshot(path=str(artifacts / "releases-list.png"), full_page=True)

    # --- open it: the numbers of each variant, the comparisons, the charts
    open_it.click()
    expect(page.get_by_role("heading", name=name, exact=True)).to_be_visible()
    variants = page.get_by_role("table", name="Variants")
    for variant, count in served.items():
        row = variants.locator(f'tr[data-variant="{variant}"]')
        expect(row.locator(".requests")).to_have_text(str(count))
        expect(row).to_contain_text("50%")
    expect(variants.locator('tr[data-variant="canary"]')).to_contain_text(f"prompt {name}-prompt@2")
    comparisons = page.get_by_role("table", name="Comparisons")
    expect(comparisons.locator('tr[data-metric="errors"]')).to_contain_text(
        re.compile("pass|fail|inconclusive|insufficient"))
    expect(page.get_by_role("list", name="Canary steps")).to_contain_text("50%")
    expect(page.get_by_role("list", name="Traffic split")).to_contain_text("canary 50%")

    requests_chart = page.locator("#chart-requests")
    expect(requests_chart).to_have_attribute("data-lines", "2")  # one line per variant, each with data
    # at least two buckets on the time axis (the live chart runs up to now), so there are lines, not dots
    expect(requests_chart).to_have_attribute("data-points", re.compile(r"^([2-9]|\d{2,})$"), timeout=LIVE_TIMEOUT_MS)
    for chart in ("error_rate", "latency"):
        expect(page.locator(f"#chart-{chart}")).to_have_attribute("data-lines", "2")
    expect(requests_chart).to_have_attribute("role", "img")
    drawn = line_pixels(page, "#chart-requests")
    assert all(drawn[v] >= 20 for v in LINE_COLOURS), f"the requests chart did not draw both lines: {drawn}"
    assert sum(line_pixels(page, "#chart-latency").values()) > 0, "the latency chart drew nothing"
    tall_screenshot(page, artifacts / "releases-detail.png")
    page.locator("#charts").screenshot(path=str(artifacts / "releases-charts.png"))

    # --- live: traffic sent now shows up without a click, and the selection stays
    before = sum(served.values())
    for _ in range(2):
        chat(server, name, served)
    for variant, count in served.items():
        expect(variants.locator(f'tr[data-variant="{variant}"] .requests')).to_have_text(str(count),
                                                                                            timeout=LIVE_TIMEOUT_MS)
    assert sum(served.values()) == before + 2
    expect(open_it).to_have_attribute("aria-current", "true")

    # --- pause and resume, each with a reason
    act(page, "Pause", "Pause release", "browser test: pause to look at the numbers")
    expect(page.locator("#release-chips")).to_contain_text("paused")
    # the current decision: the pause, or the controller's hold note on it ("paused: traffic stays..."); the
    # last change and its reason stay visible under it either way
    decision = page.locator("#decision")
    expect(decision).to_contain_text("browser test: pause to look at the numbers")
    expect(decision).to_contain_text("paused")
    expect(item).to_contain_text("paused")
    expect(page.get_by_role("button", name="Pause", exact=True)).to_be_disabled()
    page.screenshot(path=str(artifacts / "releases-paused.png"), full_page=True)
    act(page, "Resume", "Resume release", "browser test: numbers look fine")
    expect(page.locator("#release-chips")).to_contain_text("running")
    expect(decision).to_contain_text("browser test: numbers look fine")

    # --- an action refused by the server is shown with its message: someone else finishes a release first
    other = f"{name}-ab"
    r = httpx.post(f"{server.url}/v1/releases", headers=server.headers("admin"), timeout=30,
                   json={"name": other, "strategy": "ab", "variants": [{"name": "a"}, {"name": "b"}]})
    assert r.status_code == 201, r.text
    # it appears in the list by itself (live)
    page.get_by_role("button", name=f"Open release {other}", exact=True).click(timeout=LIVE_TIMEOUT_MS)
    expect(page.get_by_role("heading", name=other, exact=True)).to_be_visible()
    expect(page.locator("#release-chips")).to_contain_text("running")
    page.get_by_role("button", name="Pause", exact=True).click()
    page.get_by_label("Reason").fill("browser test: too late")
    r = httpx.post(f"{server.url}/v1/releases/{other}/rollback", json={"reason": "a colleague was faster"},
                   headers=server.headers("admin"), timeout=30)
    assert r.status_code == 200, r.text
    page.get_by_role("button", name="Pause release").click()
    dialog_error = page.get_by_role("dialog").get_by_role("alert")
    expect(dialog_error).to_contain_text(f"release '{other}' is rolled_back; it cannot pause any more")
    expect(dialog_error).to_contain_text("release_finished")
    page.screenshot(path=str(artifacts / "releases-refused.png"))
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#action-error")).to_contain_text("cannot pause any more")
    expect(page.locator("#release-chips")).to_contain_text("rolled back", timeout=LIVE_TIMEOUT_MS)
    expect(page.locator("#decision")).to_contain_text("a colleague was faster")

    # --- back to the canary: promote it (all traffic to the candidate)
    open_it.click()
    expect(page.get_by_role("heading", name=name, exact=True)).to_be_visible()
    expect(page.locator("#action-error")).to_be_hidden()
    page.get_by_role("button", name="Promote", exact=True).click()
    expect(page.get_by_label("Variant to promote")).to_have_value("canary")
    act(page, None, "Promote", "browser test: v2 is as good as v1")
    expect(page.locator("#release-chips")).to_contain_text("promoted")
    split = page.get_by_role("list", name="Traffic split")
    expect(split.locator('li[data-variant="stable"]')).to_contain_text("0%")
    expect(split.locator('li[data-variant="canary"]')).to_contain_text("100%")
    expect(item).to_contain_text("stable 0% · canary 100%")
    expect(page.locator("#action-result")).to_contain_text(f"Promoted {name}: now promoted")
    for button in ("Pause", "Resume", "Promote"):
        expect(page.get_by_role("button", name=button, exact=True)).to_be_disabled()
    expect(page.get_by_role("button", name="Roll back")).to_be_enabled()  # blue/green-style instant rollback
    state = httpx.get(f"{server.url}/v1/releases/{name}", headers={"Authorization": f"Bearer {key}"},
                      timeout=30).json()
    assert state["status"] == "promoted" and state["weights"] == {"stable": 0, "canary": 100}

    # --- the decision history: who did what, and why
    history = page.get_by_role("table", name="Decision history")
    rows = history.locator("tbody tr")
    expect(rows).to_have_count(4)
    assert [rows.nth(i).get_attribute("data-action") for i in range(4)] == ["promote", "resume", "pause", "create"]
    for action, reason in [("promote", "browser test: v2 is as good as v1"),
                           ("resume", "browser test: numbers look fine"),
                           ("pause", "browser test: pause to look at the numbers")]:
        row = history.locator(f'tr[data-action="{action}"]')
        expect(row).to_contain_text(reason)
        expect(row).to_contain_text("release-manager")
    expect(history.locator('tr[data-action="promote"]')).to_contain_text("running → promoted")
    expect(history.locator('tr[data-action="promote"]')).to_contain_text("stable 0% · canary 100%")
    expect(history.locator('tr[data-action="pause"]')).to_contain_text("running → paused")
    created = history.locator('tr[data-action="create"]')
    expect(created).to_contain_text("browser test: roll out the friendlier prompt")
    expect(created).to_contain_text("gate overridden")
    tall_screenshot(page, artifacts / "releases-promoted.png")

    # --- roll the promoted release back: all traffic to the baseline again, at once
    act(page, "Roll back", "Roll back", "browser test: back to v1 after all")
    expect(page.locator("#release-chips")).to_contain_text("rolled back")
    expect(split.locator('li[data-variant="stable"]')).to_contain_text("100%")
    expect(split.locator('li[data-variant="canary"]')).to_contain_text("0%")
    expect(page.get_by_role("button", name="Roll back")).to_be_disabled()
    expect(rows).to_have_count(5)
    expect(rows.nth(0)).to_have_attribute("data-action", "rollback")
    expect(rows.nth(0)).to_contain_text("browser test: back to v1 after all")
    state = httpx.get(f"{server.url}/v1/releases/{name}", headers={"Authorization": f"Bearer {key}"},
                      timeout=30).json()
    assert state["status"] == "rolled_back" and state["weights"] == {"stable": 100, "canary": 0}
    served_now = Counter[str]()
    chat(server, name, served_now)
    assert served_now == {"stable": 1}  # the endpoint answers with the baseline again

    # --- the key stays in this tab only, and forgetting it returns to the login form
    forget_key(page, "keel.releases.apiKey", key)


def act(page, button: str | None, confirm: str, reason: str) -> None:
    """Click an action button (unless its dialog is already open), give the reason, confirm."""
    from playwright.sync_api import expect

    if button:
        page.get_by_role("button", name=button, exact=True).click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    dialog.get_by_label("Reason").fill(reason)
    dialog.get_by_role("button", name=confirm, exact=True).click()
    expect(dialog).to_be_hidden()


def line_pixels(page, selector: str) -> dict[str, int]:
    """How many pixels of the chart's canvas have each variant's line colour (the canvas really drew lines)."""
    counts = page.evaluate(
        """([selector, colours]) => {
            const canvas = document.querySelector(`${selector} canvas`);
            const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            const out = Object.fromEntries(Object.keys(colours).map((k) => [k, 0]));
            for (let i = 0; i < data.length; i += 4) {
              if (data[i + 3] < 200) continue;
              for (const [k, [r, g, b]] of Object.entries(colours)) {
                if (Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < 60) out[k]++;
              }
            }
            return out;
        }""",
        [selector, {k: list(v) for k, v in LINE_COLOURS.items()}],
    )
    return {k: int(v) for k, v in counts.items()}

