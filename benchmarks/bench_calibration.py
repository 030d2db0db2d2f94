"""The uncertainty checks over training seeds, on identical held-out pixels: DAMM runs trained with different seeds
(with validation patches, as `train` splits them) against regression U-Nets trained with the same seeds on the same
store at the same budget.

Per seed: `wsi-damm calibrate` on the DAMM run's validation pixels (K draws), then the held-out slide predicted with one
draw and with K draws (calibrated; `evaluate` reports the interval's coverage before and after), the regression U-Net
trained (`train --model regression`) and predicted, every map scored by `evaluate` over tissue. The summary gives mean
± sd (ddof = 1) over seeds of: coverage of the central interval before and after calibration against its nominal
level, the rank correlation of each patch's spread and error, the mean of K draws' Pearson's r, SSIM and PSNR against
the U-Net's (paired by seed), and one draw's spectral error against the U-Net's — over all frequency bands, and over the
bands where the noiseless truth matches the measured channel (above them the measured channel is camera noise, which
no map predicted from CD31 and DAPI can or should copy). K = 9 draws reach an 80 % interval
(K draws reach at most (K − 1)/(K + 1)). Every step goes through the product's Python API and is kept under `--out`, so
a rerun resumes; each step's wall time is in the JSON.

    python benchmarks/bench_calibration.py --run RUN_SEED0 --run RUN_SEED1 --run RUN_SEED2 --store STORE \\
        --heldout SLIDE [--clean TRUTH] --out W [--samples 9] [--steps 10] --json FILE
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import json
import shutil
import statistics
from pathlib import Path

from _common import Steps, machine, peak_rss_mb, report  # noqa: E402

FIGURES = ("pearson_r", "ssim", "psnr", "nrmse", "spectral_error", "spread_ratio", "mean_ratio")
SIGNAL = 0.1  # log10 power ratio within which the noiseless truth matches the measured channel in a band


def stats(values: list[float]) -> dict:
    """Mean and sd (ddof = 1) over seeds."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def bands(slide: dict) -> dict:
    """The map's power against the measured channel's per frequency band over tissue (log10 ratio), the noiseless
    truth's likewise when the slide has one, and the mean |log10 ratio| over the bands where that truth matches the
    measured channel within `SIGNAL` — where the measured channel is tissue, not camera noise."""
    out = {"spectral_bands": [b["log10_power_ratio"] for b in slide["wsi"]["spectral_bands_tissue"]]}
    truth = (slide.get("oracle_wsi") or {}).get("spectral_bands_tissue")
    if truth:
        out["truth_spectral_bands"] = [b["log10_power_ratio"] for b in truth]
        signal = [i for i, b in enumerate(out["truth_spectral_bands"]) if abs(b) <= SIGNAL]
        out["signal_bands"] = signal
        out["signal_band_spectral_error"] = statistics.fmean(abs(out["spectral_bands"][i]) for i in signal)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, action="append", required=True, help="a DAMM run (repeat: one per training seed)")
    ap.add_argument("--store", type=Path, required=True, help="the patch store the runs were trained on")
    ap.add_argument("--heldout", type=Path, required=True, help="a held-out slide with its measured channel")
    ap.add_argument("--clean", type=Path, help="its noiseless truth, when it has one (simulator slides)")
    ap.add_argument("--out", type=Path, required=True, help="where runs, maps and reports go (rerun to resume)")
    ap.add_argument("--samples", type=int, default=9, help="draws of the mean-of-draws maps (9: an 80 %% interval)")
    ap.add_argument("--steps", type=int, default=10, help="DPM++ steps per draw (the demo's)")
    ap.add_argument("--unet-steps", type=int, default=500, help="the regression U-Net's training steps (the demo's budget)")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    import wsi_damm as wd
    from wsi_damm.workflows.bench_report import seed_figures

    out, k = args.out, args.samples
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out / "seconds.json")
    timed, seconds = steps.run, steps.seconds

    clean = [args.clean] if args.clean else ()
    draws = dict(steps=args.steps, quiet=True)  # every DAMM map: the demo's sampler steps

    def scored(name: str) -> dict:
        report_dir = out / f"report_{name}"
        timed(
            f"evaluate {name}",
            report_dir / "metrics.json",
            lambda: wd.evaluate(out / f"{name}.ome.zarr", truth=args.heldout, clean=clean, out=report_dir, viewer=False, quiet=True),
        )
        metrics = json.loads((report_dir / "metrics.json").read_text())
        figures = seed_figures(metrics)
        row = {f: figures[f] for f in FIGURES} | bands(metrics["slides"][0])
        u = metrics["slides"][0].get("uncertainty")
        if u:
            row |= {
                "coverage": figures["coverage"],
                "coverage_before": (u.get("before_calibration") or {}).get("coverage"),
                "nominal": u["nominal"],
                "scale": u.get("scale"),
                "spread_spearman": figures["spread_spearman"],
            }
        return row

    per_seed: dict[int, dict] = {}
    for source in args.run:
        seed = int(json.loads((source / "config.json").read_text())["train"]["seed"])
        run = out / f"damm_seed{seed}"
        if not run.exists():  # a copy: calibration is written into the run, which stays as it was
            shutil.copytree(source, run, ignore=shutil.ignore_patterns("checkpoints", "*.zarr", "report*", "*.png"))
        timed(
            f"calibrate, seed {seed}",
            run / "calibration.json",
            lambda: wd.calibrate(run, store=args.store, samples=k, seed=seed, out=out / f"calibration_seed{seed}", **draws),
        )
        maps = {
            f"seed{seed}_one_draw": lambda: wd.predict(run, [args.heldout], out=out / f"seed{seed}_one_draw.zarr", seed=seed, **draws),
            f"seed{seed}_k{k}_calibrated": lambda: wd.predict(
                run, [args.heldout], out=out / f"seed{seed}_k{k}_calibrated.zarr", samples=k, seed=seed, calibrated=True, **draws
            ),
        }
        unet = out / f"unet_seed{seed}"
        timed(
            f"train regression U-Net, seed {seed}",
            unet / "regression_ema.safetensors",
            lambda: wd.train(args.store, out=unet, model="regression", steps=args.unet_steps, seed=seed, quiet=True),
        )
        maps[f"seed{seed}_unet"] = lambda: wd.predict(unet, [args.heldout], out=out / f"seed{seed}_unet.zarr", quiet=True)
        for name, fn in maps.items():
            timed(f"predict {name}", out / f"{name}.ome.zarr", fn)
        per_seed[seed] = {
            "one_draw": scored(f"seed{seed}_one_draw"),
            f"mean_of_{k}": scored(f"seed{seed}_k{k}_calibrated"),
            "regression_unet": scored(f"seed{seed}_unet"),
            "calibration": json.loads((run / "calibration.json").read_text()),
        }

    seeds = list(per_seed)
    mean_k = f"mean_of_{k}"

    def over(row: str, figure: str) -> dict:
        return stats([per_seed[s][row][figure] for s in seeds])

    summary = {
        "coverage_before": over(mean_k, "coverage_before"),
        "coverage_after": over(mean_k, "coverage"),
        "nominal": per_seed[seeds[0]][mean_k]["nominal"],
        "scale": stats([per_seed[s]["calibration"]["scale"] for s in seeds]),
        "spread_spearman": over(mean_k, "spread_spearman"),
        "rows": {row: {f: over(row, f) for f in FIGURES} for row in ("one_draw", mean_k, "regression_unet")},
        f"{mean_k}_minus_regression_unet": {
            f: stats([per_seed[s][mean_k][f] - per_seed[s]["regression_unet"][f] for s in seeds]) for f in ("pearson_r", "ssim", "psnr")
        },
        "signal_band_spectral_error": {
            row: stats([per_seed[s][row]["signal_band_spectral_error"] for s in seeds])
            for row in ("one_draw", mean_k, "regression_unet")
            if all("signal_band_spectral_error" in per_seed[s][row] for s in seeds)
        },
        "one_draw_minus_regression_unet_spectral_error": stats(
            [per_seed[s]["one_draw"]["spectral_error"] - per_seed[s]["regression_unet"]["spectral_error"] for s in seeds]
        ),
    }
    report(
        {
            "benchmark": "bench_calibration",
            "runs": [str(r) for r in args.run],
            "store": str(args.store),
            "heldout": args.heldout.name,
            "samples": k,
            "sample_steps": args.steps,
            "unet_steps": args.unet_steps,
            "seeds": seeds,
            "per_seed": per_seed,
            "summary": summary,
            "seconds": seconds,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "machine": machine(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
