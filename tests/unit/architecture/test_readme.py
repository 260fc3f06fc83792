"""The README fits on a page and points into the documentation site; the site's pages are all in its nav
(`mkdocs build --strict`, run by `make docs` in CI, checks the links themselves)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]


def test_the_readme_fits_on_a_page_and_states_the_test_command():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "make test " in text  # the test command CI runs (.ci/run)


def test_every_docs_page_is_in_the_nav_and_every_readme_link_into_docs_exists():
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    listed = set(re.findall(r"[\w-]+\.md", str(nav)))
    assert listed == {p.name for p in (REPO / "docs").glob("*.md")}
    linked = re.findall(r"\]\((docs/[\w-]+\.md)", (REPO / "README.md").read_text())
    assert linked and all((REPO / link).is_file() for link in linked)
