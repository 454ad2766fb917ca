"""README and docs/ show what the code has: the served browser example verbatim, the generated settings table, and
links that lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

from services.settings import settings_table

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_api_page_has_the_browser_example_as_served() -> None:
    example = (ROOT / "gateway" / "http" / "static" / "examples" / "index.html").read_text()
    assert example in (DOCS / "api.md").read_text()


def test_the_configuration_page_has_the_generated_settings_table() -> None:
    assert settings_table() in (DOCS / "configuration.md").read_text()


def test_relative_links_of_readme_and_docs_lead_to_files() -> None:
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to a missing {target}"


def test_every_docs_page_is_in_the_site_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.glob("*.md"):
        assert f": {page.name}" in nav, f"{page.name} is not in mkdocs.yml's nav"
