"""Shared pieces of the browser tests: Debian's chromium driven by playwright (launched by path, no browser
download), the web app under a real uvicorn on 127.0.0.1, and where screenshots go.

Screenshots are test artifacts: they go to $CHATFORGE_TEST_ARTIFACTS when set (CI uploads that folder),
else into the test's tmp dir.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHATFORGE_CHROMIUM", "/usr/bin/chromium")
PHONE = {"width": 375, "height": 812}


def launch_chromium():  # noqa: ANN201 - playwright's (playwright, browser) pair
    """(playwright, browser): headless chromium by executable path; skips when it is not installed."""
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"chromium not found at {CHROMIUM}: run `make system-deps` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
    except Exception:
        pw.stop()
        raise
    return pw, browser


def artifacts_dir(tmp_path: Path) -> Path:
    d = Path(os.environ["CHATFORGE_TEST_ARTIFACTS"]) if os.environ.get("CHATFORGE_TEST_ARTIFACTS") else tmp_path
    d.mkdir(parents=True, exist_ok=True)
    return d


def browser_login(page, base: str, name: str, password: str = "password-123") -> None:  # noqa: ANN001
    """Log in by keyboard only: type the name, Tab to the password, Enter submits."""
    page.goto(base + "/app/login")
    page.focus("input[name=username]")
    page.keyboard.type(name)
    page.keyboard.press("Tab")
    page.keyboard.type(password)
    page.keyboard.press("Enter")
    # Enter starts a navigation that load-state alone does not wait for: wait until the URL has left the form
    try:
        page.wait_for_url(lambda url: "/app/login" not in url, timeout=15_000)
    except Exception:  # noqa: BLE001 - a failed login stays on the page; the assert below says so
        pass
    assert "/app/login" not in page.url, f"login of {name} failed: {page.inner_text('main')[:300]}"


def no_horizontal_scroll(page) -> bool:  # noqa: ANN001
    """True when nothing on the page is wider than the viewport (no sideways scrolling on a phone)."""
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
