"""MkDocs hook: a figure in a design page is read from the committed JSON it comes from, never typed.

`{{ fig seamless/seamless.json /summary/canvas/draws1/seam_score .2f }}` becomes the value at that JSON pointer
under `benchmarks/results/`, formatted (`mean ± sd` where the pointer names a summary with both), as a link to
the results page of its topic. A pointer that does not resolve fails the build.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
TOKEN = re.compile(r"\{\{ fig (\S+) (\S+) (\S+) \}\}")


def resolve(path: str, pointer: str):
    """The value at a JSON pointer (RFC 6901) of a results file; percent-encoded as in a URI fragment (a space
    is %20), so a key with spaces fits in one token."""
    value = json.loads((RESULTS / path).read_text(encoding="utf-8"))
    for part in pointer.strip("/").split("/"):
        part = unquote(part).replace("~1", "/").replace("~0", "~")
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def render(path: str, pointer: str, fmt: str) -> str:
    """The figure as text: a number; `mean ± sd` of a summary entry; with a format ending in `±`, the value and
    its sibling `<name>_sd` (the study's layout)."""
    if fmt.endswith("±"):
        fmt = fmt[:-1]
        return f"{resolve(path, pointer):{fmt}} ± {resolve(path, pointer + '_sd'):{fmt}}"
    value = resolve(path, pointer)
    if isinstance(value, dict):
        return f"{value['mean']:{fmt}} ± {value['sd']:{fmt}}"
    return f"{value:{fmt}}"


def substitute(markdown: str, depth: int) -> str:
    """Every token of a page replaced; `depth` is the page's folder depth under docs/ (for the link)."""
    up = "../" * depth

    def one(m: re.Match) -> str:
        path, pointer, fmt = m.groups()
        return f"[{render(path, pointer, fmt)}]({up}results/{path.split('/')[0]}.md)"

    return TOKEN.sub(one, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return substitute(markdown, page.file.src_uri.count("/"))
