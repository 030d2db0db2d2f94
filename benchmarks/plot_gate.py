"""The DAMMP gate through training, run beside run: what the divergence feedback loss told the gate and
what the gate believed, per region of the simulator's divergence mask.

Each panel is one run: the DFL label rate (share of training samples whose multi-modal ε-loss was no
larger than the uni-modal one's: the label the gate learns from) and the mean confidence κ, against
the step, with the warm-up shaded. The gate fuses a sample when its mean κ exceeds 1 − γ (dotted). A
run whose κ falls under that line stops sending samples to the multi-modal branch; with the paper's
gated loss that branch then stops learning too, its loss rises, the labels fall, and the gate locks.

    python benchmarks/plot_gate.py --out gate.png --columns 3 \
        "gated, seed 0=W/budget500_multigated/seed0" ... "always, seed 0=W/budget500/seed0" ...
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from wsi_damm.training.gate_regions import draw_gate_by_region
from wsi_damm.training.run_dir import RunDir, read_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="TITLE=RUN_DIR, drawn in this order, row by row")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--columns", type=int, default=3)
    args = ap.parse_args()
    runs = []
    for item in args.runs:
        title, sep, path = item.rpartition("=")
        if not sep or not title:
            ap.error(f"{item}: expected TITLE=RUN_DIR")
        run = RunDir(Path(path))
        rows = read_metrics(run.metrics)
        if not rows:
            ap.error(f"{run.metrics}: no training metrics")
        runs.append((title, rows, json.loads(run.config.read_text())["damm"]["gamma"]))
    draw(runs, args.out, args.columns)
    print(json.dumps({"figure": str(args.out), "runs": len(runs)}))


def draw(runs: list[tuple[str, list[dict], float]], out: Path, columns: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(columns, len(runs))
    lines = math.ceil(len(runs) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.6 * columns, 3.3 * lines), sharex=True, sharey=True, squeeze=False)
    for ax in axes.flat[len(runs) :]:
        ax.set_visible(False)
    for ax, (title, rows, gamma) in zip(axes.flat, runs):
        draw_gate_by_region(ax, rows, gamma)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("")
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    for ax in axes[:, 0]:
        ax.set_ylabel("rate / confidence")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1 if lines == 1 else 0.06, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
