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


def test_every_command_line_in_the_readme_and_tutorial_names_real_options():
    """Each `wsi-damm COMMAND --option …` in the README's and the tutorial's examples names a command and options
    that exist (parsed from the click commands, nothing run)."""
    import click

    from wsi_damm_cli.main import cli

    for page in (ROOT / "README.md", ROOT / "docs" / "tutorial.md"):
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                words = line.split("#")[0].split()
                if len(words) < 2 or words[0] != "wsi-damm":
                    continue
                command = cli.get_command(click.Context(cli), words[1])
                assert command is not None, line
                known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
                unknown = [w for w in words[2:] if w.startswith("--") and w not in known]
                assert not unknown, (line, unknown)


def test_every_public_name_of_the_api_reference_has_a_docstring():
    """The API page is generated from `wsi_damm.api`'s docstrings: none of its public functions or results may lack one."""
    import inspect

    import wsi_damm.api as api

    public = [
        (name, obj) for name, obj in inspect.getmembers(api, lambda o: inspect.isfunction(o) or inspect.isclass(o)) if name in api.__all__
    ]
    assert len(public) >= 8
    assert all(inspect.getdoc(obj) for _, obj in public), [name for name, obj in public if not inspect.getdoc(obj)]


def test_the_results_pages_are_rendered_from_the_committed_json():
    """docs/results/*.md are `benchmarks/render_results.py`'s output for the JSON as committed: rerun it after
    committing a changed JSON (its page names the commit), and commit the pages."""
    import subprocess
    import sys

    if subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: the pages name the commits of their JSON files")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from render_results import pages
    finally:
        sys.path.pop(0)
    stale = [str(path.relative_to(ROOT)) for path, text in pages().items() if not path.exists() or path.read_text() != text]
    assert not stale, f"render again: python benchmarks/render_results.py ({stale})"


def test_every_figure_of_a_design_page_is_read_from_the_json_it_links():
    """Design pages type no measured figure: each is a `{{ fig FILE POINTER FORMAT }}` token that the MkDocs hook
    reads from benchmarks/results/ (and that must resolve); outside code, the pages hold no decimal number."""
    import sys

    sys.path.insert(0, str(ROOT / "docs" / "hooks"))
    try:
        from figures import TOKEN, render, substitute
    finally:
        sys.path.pop(0)
    for page in sorted((ROOT / "docs" / "design").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for path, pointer, fmt in TOKEN.findall(text):
            assert re.fullmatch(r"-?\d[\d.]*( ± \d[\d.]*)?", render(path, pointer, fmt)), (page.name, pointer)
        prose = re.sub(r"```.*?```|`[^`]*`|\]\([^)]*\)", "", TOKEN.sub("", text), flags=re.S)
        typed = re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", prose)
        assert not typed, f"{page.name}: figures typed by hand, read them from their JSON instead: {typed}"
        assert "{{ fig" not in substitute(text, 1)


def test_the_figures_hook_reads_a_json_pointer_and_a_summary(tmp_path, monkeypatch):
    import json
    import sys

    sys.path.insert(0, str(ROOT / "docs" / "hooks"))
    try:
        import figures
    finally:
        sys.path.pop(0)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "r.json").write_text(json.dumps({"rows": [{"a/b": 0.12345}], "s": {"mean": 1.5, "sd": 0.25}, "x": 2.0, "x_sd": 0.5}))
    monkeypatch.setattr(figures, "RESULTS", tmp_path)
    assert figures.render("t/r.json", "/rows/0/a~1b", ".3f") == "0.123"
    assert figures.render("t/r.json", "/s", ".2f") == "1.50 ± 0.25"
    assert figures.render("t/r.json", "/x", ".1f±") == "2.0 ± 0.5"
    assert figures.substitute("r {{ fig t/r.json /x .1f }} dB", 1) == "r [2.0](../results/t.md) dB"
    with pytest.raises(KeyError):
        figures.render("t/r.json", "/missing", ".1f")
