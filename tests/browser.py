"""What the browser tests of Keel's pages share: Debian's Chromium driven by Playwright, headless, with the page's
errors collected; screenshots kept as test artifacts; the key login every page has.

Needs /usr/bin/chromium and the `playwright` package: run `infra/setup-browser.sh`. Without them a test fails with
that command, unless KEEL_SKIP_BROWSER_TESTS=1 says to skip it on purpose.

A test module imports the fixtures it uses (``from tests.browser import artifacts, browser_ready``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.security.keys import KeyStore

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SETUP = "infra/setup-browser.sh"
# ENVIRONMENT.md, "Browser tests": Debian's Chromium runs headless with these flags.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run",
]
TIMEOUT_MS = 15_000
BAD_KEY = "keel-not-a-real-key"


def require_browser() -> None:
    missing = []
    if not CHROMIUM.exists():
        missing.append(str(CHROMIUM))
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the `playwright` Python package")
    if not missing:
        return
    if not CHROMIUM.exists() and os.environ.get("KEEL_SKIP_BROWSER_TESTS") == "1":
        pytest.skip("KEEL_SKIP_BROWSER_TESTS=1 and /usr/bin/chromium is missing: browser test skipped on purpose")
    pytest.fail(f"missing {' and '.join(missing)}: run `{SETUP}` first (apt-get chromium + pip playwright)",
                pytrace=False)


@pytest.fixture(scope="session")
def browser_ready() -> None:
    """Checked before `keel_server` starts vLLM, so a missing browser fails (or skips) in a second."""
    require_browser()


@pytest.fixture
def artifacts(tmp_path: Path) -> Iterator[Path]:
    """Screenshots land in tmp_path; afterwards they are also copied to .keel/artifacts/ if writable."""
    folder = tmp_path / "artifacts"
    folder.mkdir()
    yield folder
    target = ROOT / ".keel" / "artifacts"
    try:
        target.mkdir(parents=True, exist_ok=True)
        for shot in folder.glob("*.png"):
            shutil.copy2(shot, target / shot.name)
    except OSError:
        pass


def create_key(home: Path, name: str, scopes: list[str]) -> str:
    """A key made straight in the server's key store (``<home>/keel.db``), as an admin would hand it out."""
    store = KeyStore(home / "keel.db")
    try:
        return store.create(name, scopes)[1]
    finally:
        store.close()


@contextlib.contextmanager
def chromium_page(artifacts: Path, name: str) -> Iterator[Any]:
    """A page in a fresh headless Chromium (1440x1000). What the page logs as an error (an uncaught exception, a
    console error other than a refused request, which the journeys provoke) fails the test at the end; on a failure,
    the page is kept as ``<name>-failure.png``."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    problems: list[str] = []
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(artifacts.parent / "chromium-profile"),
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1440, "height": 1000}, device_scale_factor=1,
        )
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            # Refused requests (401, 403, 409...) are part of the journeys; Chromium logs each one.
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
            yield page
        except BaseException:
            with contextlib.suppress(Exception):  # best effort on the way out
                context.pages[-1].screenshot(path=str(artifacts / f"{name}-failure.png"), full_page=True)
            raise
        finally:
            context.close()
    assert not problems, "the page logged errors:\n" + "\n".join(problems)


def connect(page: Any, key: str, *, refused: str | None = None) -> None:
    """Type a key into the login form and connect; ``refused``: the alert that must say why the key was refused."""
    from playwright.sync_api import expect

    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Connect").click()
    if refused is not None:
        expect(page.get_by_role("alert").filter(has_text=refused)).to_be_visible()


def connect_after_a_wrong_key(page: Any, key: str) -> None:
    """A key the server does not know is refused on the login form; then ``key`` connects."""
    connect(page, BAD_KEY, refused="does not accept")
    connect(page, key)


def forget_key(page: Any, storage_key: str, key: str) -> None:
    """The key stays in this tab only (sessionStorage under the page's name), and forgetting it returns to the login
    form."""
    from playwright.sync_api import expect

    assert page.evaluate(f"sessionStorage.getItem('{storage_key}')") == key
    assert page.evaluate("localStorage.length") == 0
    page.get_by_role("button", name="Forget key").click()
    expect(page.get_by_label("API key")).to_be_visible()
    assert page.evaluate(f"sessionStorage.getItem('{storage_key}')") is None


def tall_screenshot(page: Any, path: Path) -> None:
    """The workspace scrolls inside the page: a tall viewport shows all of it in one picture."""
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": 3000})
    try:
        time.sleep(0.3)  # let the charts follow the resize
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(size)
