"""Render every committed result under benchmarks/results/ into the documentation's results pages.

One page per topic folder (docs/results/TOPIC.md): for each JSON file, where it came from — the command that
writes it, the commit and date it was committed with, the machine it records — and its figures as a table
(the file's `summary` when it has one, else its top-level figures), every number read from the JSON.
Pages a benchmark renders itself (`*.md` beside the JSON) are included as they are. `tests/test_docs.py`
renders again and compares, so a page cannot drift from its JSON.

    python benchmarks/render_results.py          # writes docs/results/*.md and the index docs/results.md
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
# topic folder → (title, the command that writes its JSON)
TOPICS = {
    "study": ("The ablation study", "wsi-damm study --out STUDY (and benchmarks/study_autoencoders.py)"),
    "bench": ("The bench on a real image and on synthetic slides", "wsi-damm bench --out BENCH (its bench.json and bench.md)"),
    "sparse": ("Sparse target stains", "python benchmarks/compare_sparse_target.py --work W --json …, sparse_feature_bound.py"),
    "demo": ("The demo's summary", "wsi-damm demo (its demo_summary.json)"),
    "seamless": ("Seamless sampling", "python benchmarks/compare_seamless.py"),
    "sampling": ("Sampling modes", "python benchmarks/compare_sampling.py"),
    "context": ("Context around each patch", "python benchmarks/compare_context.py"),
    "budget": (
        "Training budget, autoencoders and the regression U-Net",
        "python benchmarks/compare_budget.py, compare_regression.py, compare_sampler_steps.py, ceiling_errors.py",
    ),
    "fov": ("Field-of-view bound", "python benchmarks/fov_bound.py"),
    "canvas": ("Canvas sampling, speed and memory", "python benchmarks/bench_canvas.py"),
    "heldout": (
        "Every figure on the demo's held-out slide, and the calibrated interval",
        "python benchmarks/bench_heldout.py --demo DEMO --out W --json …",
    ),
    "metrics": ("What evaluate's figures cost", "python benchmarks/bench_metrics.py --json …"),
    "register": ("Registration speed", "python benchmarks/bench_register.py --json …"),
    "train": ("Training speed and memory", "python benchmarks/bench_train.py, bench_heap.py"),
    "viewer": ("Viewer tiles", "python benchmarks/bench_viewer.py --json …"),
}
SKIP = {"runs", "rows", "legs", "outputs", "results", "models", "scored"}  # per-run detail: in the JSON, not the table
MAX_ROWS = 60


def committed(path: Path) -> tuple[str, str]:
    """(date, short commit) of the last commit that changed `path`; ('not committed', '–') outside git history."""
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cs %h", "--", str(path.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = []
    return (out[0], out[1]) if len(out) == 2 else ("not committed", "–")


def _number(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _cell(v) -> str | None:
    """A leaf of the table: a number, a short text, or a mean ± sd (n) summary; None for anything else."""
    if isinstance(v, dict) and "mean" in v and not isinstance(v["mean"], dict):
        sd = v.get("sd")
        return _number(v["mean"]) + (f" ± {_number(sd)}" if sd is not None else "") + (f" (n = {v['n']})" if "n" in v else "")
    if isinstance(v, (int, float, bool)) or v is None:
        return _number(v)
    if isinstance(v, str) and len(v) <= 80:
        return v.replace("|", "\\|")
    if isinstance(v, list) and len(v) <= 6 and all(isinstance(x, (int, float, str)) for x in v):
        return ", ".join(_number(x) for x in v)
    return None


def flatten(value, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """(dotted key, cell) of every leaf down to four levels, per-run detail left out."""
    cell = _cell(value)
    if cell is not None or depth > 4:
        return [(prefix, cell)] if cell is not None else []
    rows: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if depth == 0 and k in SKIP:
                continue
            rows += flatten(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)
    return rows


def render_json(path: Path) -> str:
    data = json.loads(path.read_text())
    date, commit = committed(path)
    machine = data.get("machine") if isinstance(data, dict) else None
    body = data.get("summary", data) if isinstance(data, dict) else {f"[{i}]": row for i, row in enumerate(data)}
    rows = flatten(body)
    lines = [
        f"### `{path.relative_to(ROOT).as_posix()}`",
        "",
        f"Committed {date} ({commit}); machine: {json.dumps(machine) if machine else 'not recorded in the file'}.",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| `{k}` | {v} |" for k, v in rows[:MAX_ROWS]),
    ]
    if len(rows) > MAX_ROWS:
        lines += ["", f"… and {len(rows) - MAX_ROWS} more figures in the file."]
    return "\n".join(lines)


def render_topic(topic: str) -> str:
    title, command = TOPICS[topic]
    folder = RESULTS / topic
    out = [
        f"# {title}",
        "",
        "Rendered by `python benchmarks/render_results.py` from the files in "
        f"`benchmarks/results/{topic}/`, written by `{command}`; every figure below is read from them.",
        "",
    ]
    for page in sorted(folder.glob("*.md")):
        # links relative to the page's folder name the file instead (the site holds no copy of it)
        text = re.sub(
            r"!?\[([^\]]*)\]\((?!https?:|#)([^)]+)\)", lambda m: f"{m[1]} (`benchmarks/results/{topic}/{m[2]}`)", page.read_text().strip()
        )
        out += [f"## {page.name}", "", text.split("\n", 1)[1].strip() if text.startswith("# ") else text, ""]
    jsons = sorted(folder.glob("*.json"))
    if jsons:
        out += ["## The JSON files", ""]
        for path in jsons:
            out += [render_json(path), ""]
    pictures = sorted(folder.glob("*.png"))
    if pictures:
        out += ["## Figures", "", *(f"- `{p.relative_to(ROOT).as_posix()}`" for p in pictures), ""]
    return "\n".join(out).rstrip() + "\n"


def render_index() -> str:
    rows = [f"| [{TOPICS[t][0]}](results/{t}.md) | `{TOPICS[t][1]}` |" for t in TOPICS if (RESULTS / t).is_dir()]
    return "\n".join(
        [
            "# Results",
            "",
            "Every figure we quote comes from a file in `benchmarks/results/`, written by the command named here and "
            "rendered into these pages by `python benchmarks/render_results.py` (a test renders them again and compares). "
            "`benchmarks/README.md` says what each script compares and how to rerun it; dated history is in `CHANGELOG.md`.",
            "",
            "| topic | written by |",
            "|---|---|",
            *rows,
            "",
        ]
    )


def pages() -> dict[Path, str]:
    """Every results page, path → text."""
    out = {DOCS / "results.md": render_index()}
    for topic in TOPICS:
        if (RESULTS / topic).is_dir():
            out[DOCS / "results" / f"{topic}.md"] = render_topic(topic)
    return out


def main() -> None:
    (DOCS / "results").mkdir(exist_ok=True)
    for path, text in pages().items():
        path.write_text(text)
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
