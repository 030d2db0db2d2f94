"""The draws' interval over training seeds, before and after calibration, from a finished `wsi-damm bench` folder.

For each seed's DAMM run the bench trained: `wsi-damm calibrate` on the run's own validation pixels (K draws), then
the held-out slide predicted with K draws, uncalibrated and calibrated, at the bench's sampler steps, and scored by
`evaluate` against the measured channel — the interval's coverage over tissue against its nominal level, the rank
correlation of each patch's spread and its error, and the mean of K draws' figures beside the bench's regression
U-Net row of the same seed (same pixels: the bench's held-out tissue). K = 9 draws reach an 80 % interval (K draws
reach at most (K − 1)/(K + 1)). Everything goes through the product's Python API; every map is a folder kept under
`--out`, so a rerun resumes.

    python benchmarks/bench_calibration.py --bench BENCH --heldout SLIDE [--clean TRUTH] --out W [--samples 9] --json FILE
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from _common import machine, peak_rss_mb, report  # noqa: E402

FIGURES = ("pearson_r", "ssim", "psnr", "nrmse", "spectral_error", "spread_ratio", "mean_ratio")


def stats(values: list[float]) -> dict:
    """Mean and sd (ddof = 1) over seeds."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def seed_rows(bench: dict, key: str) -> dict[int, dict]:
    """The bench's per-seed figures of one row (`key`, e.g. "regression")."""
    [row] = [r for r in bench["rows"] if r["key"] == key]
    n = len(row["per_seed"]["pearson_r"])
    return {seed: {f: row["per_seed"][f][i] for f in FIGURES} for i, seed in enumerate(bench["plan"]["seeds"][:n])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bench", type=Path, required=True, help="a finished `wsi-damm bench` folder")
    ap.add_argument("--heldout", type=Path, required=True, help="the held-out slide the bench scored")
    ap.add_argument("--clean", type=Path, help="its noiseless truth, when it has one (simulator slides)")
    ap.add_argument("--out", type=Path, required=True, help="where runs, maps and reports go (rerun to resume)")
    ap.add_argument("--samples", type=int, default=9, help="draws per patch (9: an 80 %% interval)")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    import wsi_damm as wd
    from wsi_damm.workflows.bench_report import seed_figures

    bench = json.loads((args.bench / "bench.json").read_text())
    steps, k = bench["plan"]["sample_steps"], args.samples
    store = args.bench / "patches.zarr"
    args.out.mkdir(parents=True, exist_ok=True)
    clock = args.out / "seconds.json"
    seconds: dict[str, float] = json.loads(clock.read_text()) if clock.exists() else {}

    def timed(name: str, done: Path, fn) -> None:
        if not done.exists():
            t0 = time.perf_counter()
            fn()
            seconds[name] = round(time.perf_counter() - t0, 1)
            clock.write_text(json.dumps(seconds, indent=2))

    unet = seed_rows(bench, "regression")
    one_draw = seed_rows(bench, "damm/k1")
    per_seed = {}
    for seed in bench["plan"]["seeds"]:
        run = args.out / f"damm_seed{seed}"
        if not run.exists():  # a copy: calibration is written into the run; the bench folder stays as it was
            shutil.copytree(args.bench / "runs" / f"damm_seed{seed}", run, ignore=shutil.ignore_patterns("checkpoints"))
        timed(
            f"calibrate, seed {seed}",
            run / "calibration.json",
            lambda: wd.calibrate(run, store=store, samples=k, steps=steps, seed=seed, out=args.out / f"calibration_seed{seed}", quiet=True),
        )
        rows = {}
        for calibrated in (False, True):
            name = f"seed{seed}_k{k}" + ("_calibrated" if calibrated else "")
            pred = args.out / f"{name}.zarr"
            timed(
                f"predict {name}",
                args.out / f"{name}.ome.zarr",
                lambda: wd.predict(run, [args.heldout], out=pred, samples=k, steps=steps, seed=seed, calibrated=calibrated, quiet=True),
            )
            report_dir = args.out / f"report_{name}"
            timed(
                f"evaluate {name}",
                report_dir / "metrics.json",
                lambda: wd.evaluate(
                    args.out / f"{name}.ome.zarr",
                    truth=args.heldout,
                    clean=[args.clean] if args.clean else (),
                    out=report_dir,
                    viewer=False,
                    quiet=True,
                ),
            )
            metrics = json.loads((report_dir / "metrics.json").read_text())
            figures = seed_figures(metrics)
            u = metrics["slides"][0]["uncertainty"]
            rows["calibrated" if calibrated else "uncalibrated"] = {f: figures[f] for f in FIGURES} | {
                "coverage": figures["coverage"],
                "nominal": u["nominal"],
                "spread_spearman": figures["spread_spearman"],
                "scale": u.get("scale"),
            }
        calibration = json.loads((run / "calibration.json").read_text())
        per_seed[seed] = rows | {"calibration": calibration, "regression_unet": unet[seed], "one_draw": one_draw[seed]}

    seeds = list(per_seed)
    mean_k = {f: stats([per_seed[s]["uncalibrated"][f] for s in seeds]) for f in FIGURES}
    ahead = {  # the mean of K draws against the regression U-Net of the same seed, paired
        f: stats([per_seed[s]["uncalibrated"][f] - per_seed[s]["regression_unet"][f] for s in seeds]) for f in ("pearson_r", "ssim", "psnr")
    }
    summary = {
        "benchmark": "bench_calibration",
        "bench": bench["train"],
        "heldout": args.heldout.name,
        "samples": k,
        "sample_steps": steps,
        "seeds": seeds,
        "per_seed": per_seed,
        "summary": {
            "coverage_before": stats([per_seed[s]["uncalibrated"]["coverage"] for s in seeds]),
            "coverage_after": stats([per_seed[s]["calibrated"]["coverage"] for s in seeds]),
            "nominal": per_seed[seeds[0]]["uncalibrated"]["nominal"],
            "scale": stats([per_seed[s]["calibration"]["scale"] for s in seeds]),
            "spread_spearman": stats([per_seed[s]["uncalibrated"]["spread_spearman"] for s in seeds]),
            f"mean_of_{k}": mean_k,
            "regression_unet": {f: stats([per_seed[s]["regression_unet"][f] for s in seeds]) for f in FIGURES},
            "one_draw": {f: stats([per_seed[s]["one_draw"][f] for s in seeds]) for f in FIGURES},
            f"mean_of_{k}_minus_regression_unet": ahead,
        },
        "seconds": seconds,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "machine": machine(),
    }
    report(summary, args.json)


if __name__ == "__main__":
    main()
