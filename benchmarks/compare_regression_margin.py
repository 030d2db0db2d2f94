"""How much of the slide the regression U-Net should see around each patch: trained regression runs predicted with
margins of 0, 16, 32 and 64 px (`sampling/regression.MARGIN`, read from the neighbouring patches) on a held-out
slide, each map scored by `evaluate` over tissue — Pearson's r, spread and mean against the measured channel's,
SSIM, PSNR and the seam score. A margin removes the seams of the U-Net's zero padding; a wider one also moves the
U-Net further from the patch-sized windows it was trained on (GroupNorm reads its statistics over the whole window).

    python benchmarks/compare_regression_margin.py --case NAME=RUN_DIR:SLIDE ... --out W [--margins 0 16 32 64] --json FILE

Everything goes through the product's Python API; every map is a folder kept under `--out`, so a rerun resumes.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import json
import statistics
from pathlib import Path

from _common import machine, report  # noqa: E402
from bench_heldout import figures  # noqa: E402

FIGURES = ("pearson_r", "spread_ratio", "mean_ratio", "ssim", "psnr", "seam_score")


def scored(metrics: dict) -> dict:
    return {f: figures(metrics)[f] for f in FIGURES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--case", action="append", required=True, help="NAME=RUN_DIR:SLIDE (repeat): a regression run and a held-out slide")
    ap.add_argument("--margins", type=int, nargs="+", default=[0, 16, 32, 64])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import wsi_damm as wd
    from wsi_damm.sampling import regression

    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for case in args.case:
        name, paths = case.split("=", 1)
        run, slide = (Path(p) for p in paths.split(":", 1))
        for margin in args.margins:
            key = f"{name}_margin{margin}"
            if not (args.out / f"{key}.ome.zarr").exists():
                kept, regression.MARGIN = regression.MARGIN, margin
                try:
                    wd.predict(run, [slide], out=args.out / f"{key}.zarr", quiet=True, overwrite=True)
                finally:
                    regression.MARGIN = kept
            report_dir = args.out / f"report_{key}"
            if not (report_dir / "metrics.json").exists():
                wd.evaluate(args.out / f"{key}.ome.zarr", truth=slide, out=report_dir, viewer=False, quiet=True)
            rows.setdefault(name, {})[str(margin)] = scored(json.loads((report_dir / "metrics.json").read_text()))
    groups: dict[str, list[str]] = {}  # NAME_seedN cases: one group per NAME, its mean over seeds
    for c in rows:
        groups.setdefault(c.split("_seed")[0], []).append(c)
    means = {
        g: {str(m): {f: statistics.fmean(rows[c][str(m)][f] for c in cases) for f in FIGURES} for m in args.margins}
        for g, cases in groups.items()
    }
    summary = {"benchmark": "compare_regression_margin", "cases": args.case, "maps": rows, "mean_over_seeds": means, "machine": machine()}
    report(summary, args.json)


if __name__ == "__main__":
    main()
