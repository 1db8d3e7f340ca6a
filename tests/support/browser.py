"""Headless Chromium for the dashboard tests: Debian's chromium driven by playwright,
signing in with an API token, screenshots under ``$EDGESHIP_TEST_OUTPUT`` (default
``test-output/``) ``/screenshots``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason="Debian's chromium is not installed")


def screenshot_dir() -> Path:
    out = Path(os.environ.get("EDGESHIP_TEST_OUTPUT", "test-output")) / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out


def sign_in(page, url: str, token: str) -> None:
    page.goto(url)
    page.fill("#token", token)
    page.click("#signin-form button")
