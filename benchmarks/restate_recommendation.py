"""A committed bench's recommendation re-derived from its rows by today's `recommend`, when the rule changes but the
numbers do not: rewrites the JSON's `recommendation` and the bold sentence of the page beside it.

    python benchmarks/restate_recommendation.py benchmarks/results/bench/synthetic_1024.json benchmarks/results/bench/vectra.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from wsi_damm.util.files import read_json, write_json
from wsi_damm.workflows.bench_report import recommend


def restate(path: Path) -> str:
    summary = read_json(path)
    old, new = summary["recommendation"], recommend(summary["rows"])
    summary["recommendation"] = new
    write_json(path, summary)
    page = path.with_suffix(".md")
    if page.exists():
        text = page.read_text()
        if f"**{old}**" not in text:
            raise SystemExit(f"{page}: its bold recommendation is not the JSON's; render the page again")
        page.write_text(text.replace(f"**{old}**", f"**{new}**"))
    return new


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: {restate(Path(arg))}")
