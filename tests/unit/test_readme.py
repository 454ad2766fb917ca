"""The README shows what the code has: the served browser example verbatim and the generated settings table."""

from __future__ import annotations

from pathlib import Path

from services.settings import settings_table

ROOT = Path(__file__).resolve().parents[2]


def test_readme_has_the_browser_example_as_served() -> None:
    example = (ROOT / "gateway" / "http" / "static" / "examples" / "index.html").read_text()
    assert example in (ROOT / "README.md").read_text()


def test_readme_settings_table_is_generated() -> None:
    assert settings_table() in (ROOT / "README.md").read_text()
