"""What the browser tests share: the Chromium they drive, its flags, and where screenshots go."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (make browser)")


def screenshots(tmp_path: Path) -> Path:
    """TOKENRELAY_TEST_SCREENSHOTS when set, else the test's temporary directory."""
    directory = Path(os.environ.get("TOKENRELAY_TEST_SCREENSHOTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory
