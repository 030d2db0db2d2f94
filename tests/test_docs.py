"""The README stays a front page (short, no dated figures) and every link in it and in `docs/` resolves;
the documentation's navigation lists every page (the strict MkDocs build in CI checks the rest)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
MONTHS = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*"


def _relative_links(path: Path) -> list[str]:
    return [m for m in LINK.findall(path.read_text()) if not re.match(r"[a-z]+:", m)]


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert not re.search(rf"\b\d{{1,2}} {MONTHS}\b|\b{MONTHS} \d{{1,2}}\b", text), "dates belong in CHANGELOG.md"
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert first_block == ['pip install torch==2.13.0 -e ".[dev]" && wsi-damm demo', "python -m pytest -q -n 2 --dist loadfile"]


@pytest.mark.parametrize("page", ["README.md", "CHANGELOG.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))])
def test_every_relative_link_resolves(page):
    path = ROOT / page
    missing = [link for link in _relative_links(path) if not (path.parent / link).exists()]
    assert not missing, missing


def test_the_navigation_lists_every_page():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, re.M))
    assert pages == listed, (pages - listed, listed - pages)
