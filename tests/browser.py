"""Pages in Debian's headless Chromium, driven by Playwright (never a downloaded browser)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)"
)
# Nothing but the page: no update checks or first-run work in a test.
_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@contextmanager
def chromium_page(width: int = 1200, height: int = 900) -> Iterator[Any]:
    """A fresh page of a headless Chromium, closed afterwards."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def log_in_to_label_studio(page: Any, base_url: str, user: str, password: str) -> None:
    page.goto(f"{base_url}/user/login/")
    page.fill("input[name=email]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")


def screenshot_folder(tmp_path: Path) -> Path:
    """docs/screenshots/ with ECHOLABEL_UPDATE_SCREENSHOTS=1 (committed: each ≤ 200 KB), else
    a folder of the test's own."""
    from tests.helpers import ROOT

    update = os.environ.get("ECHOLABEL_UPDATE_SCREENSHOTS") == "1"
    out = ROOT / "docs" / "screenshots" if update else tmp_path / "shots"
    out.mkdir(parents=True, exist_ok=True)
    return out


def shoot(page: Any, path: Path, full_page: bool = False) -> None:
    """A JPEG small enough to commit (the screenshots of the README and docs/)."""
    page.screenshot(path=str(path), type="jpeg", quality=70, full_page=full_page)
