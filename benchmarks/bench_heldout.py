"""Every figure `evaluate` reports on the demo's held-out slide, for the maps a lab would put side by side: DAMM as
the demo draws it (one draw), the mean of K draws with their central interval, the same interval calibrated on the
run's own validation pixels (`wsi-damm calibrate`, then `predict --calibrated`), the regression U-Net trained on
the demo's patches at the demo's budget (`train --model regression`) — predicted as `predict` does, each patch with
a margin of the slide around it, and without that margin (each patch alone, as before), each stitched with `stitch`'s
default Hann window and with the Gaussian one (the default before) — and the demo's blurred-vessel baseline.

It reads a finished `wsi-damm demo` folder (its run, patch store, held-out slide and the two maps it wrote) and
works through the product's Python API only; every map and report is a folder it keeps, so a rerun resumes.
The JSON holds, per map, the bench's figures over tissue, the seam score, the interval's coverage (before and
after calibration) and the wall time of each step (kept in W/seconds.json across a resumed run).
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import json
import math
import re
import shutil
from pathlib import Path

from _common import Steps, machine, peak_rss_mb, report  # noqa: E402
from bench_calibration import SIGNAL, bands  # noqa: E402


def figures(metrics: dict) -> dict:
    """What one map scored over tissue — the bench's figures (`bench_report.seed_figures`), NaN as None — its seam
    score and, for draws, their interval as `evaluate` checked it."""
    from wsi_damm.workflows.bench_report import seed_figures

    out = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in seed_figures(metrics).items() if k != "regions"}
    s = metrics["slides"][0]
    out["seam_score"] = (s.get("seams") or {}).get("map")
    out |= bands(s)
    u = s.get("uncertainty")
    if u:
        out["interval"] = {k: u.get(k) for k in ("draws", "rank", "nominal", "scale", "below", "above", "check", "before_calibration")}
    return out


def _num(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def table(summary: dict) -> str:
    """The maps side by side, Pearson's r and spread first (on a sparse target SSIM rewards a flat map)."""
    lines = [
        f"On the demo's held-out slide ({summary['heldout']}), over tissue. Spread and mean: the map's over the measured "
        "channel's. Coverage: how often the measured value lies inside the draws' central interval, against its nominal "
        "level; ρ: rank correlation of each patch's spread and error. Spectral error: mean |log10| of the map's power over the "
        "measured channel's per frequency band; over signal bands: only where the noiseless truth's power matches the measured "
        f"channel's within {SIGNAL} in log10 (above them the measured channel is camera noise).",
        "",
        "| map | Pearson's r | spread | mean | SSIM | PSNR (dB) | NRMSE | spectral error | … signal bands | seam score "
        "| coverage (nominal) | ρ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["maps"].items():
        u = m.get("interval")
        coverage = "–"
        if u:
            coverage = f"{_num(m['coverage'], 3)} ({_num(u['nominal'], 2)})"
            if u.get("before_calibration"):
                coverage += f", {_num(u['before_calibration']['coverage'], 3)} before calibration"
        cells = [
            name,
            _num(m["pearson_r"]),
            _num(m["spread_ratio"], 2),
            _num(m["mean_ratio"], 2),
            _num(m["ssim"]),
            _num(m["psnr"], 2),
            _num(m["nrmse"]),
            _num(m["spectral_error"]),
            _num(m.get("signal_band_spectral_error")),
            _num(m["seam_score"]),
            coverage,
            _num(m["spread_spearman"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--demo", type=Path, required=True, help="a finished `wsi-damm demo` folder")
    ap.add_argument("--out", type=Path, required=True, help="where the maps and reports go (rerun to resume)")
    ap.add_argument("--samples", type=int, default=9, help="draws of the mean-of-draws maps (9: an 80 %% interval)")
    ap.add_argument("--steps", type=int, default=500, help="the regression U-Net's training steps (the demo's budget)")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    import wsi_damm as wd

    demo, out = args.demo, args.out
    out.mkdir(parents=True, exist_ok=True)
    run, store = out / "run", demo / "patches.zarr"
    if not run.exists():  # a copy: the calibration is written into the run, and the demo folder stays as it was
        shutil.copytree(demo / "run", run, ignore=shutil.ignore_patterns("checkpoints"))
    [slide] = sorted((demo / "slides" / "heldout").glob("*.ome.tif"))
    clean = demo / "slides" / "heldout" / "truth" / slide.name.replace(".ome.tif", ".np_clean.ome.tif")
    steps = Steps(out / "seconds.json")
    timed, seconds = steps.run, steps.seconds

    k = args.samples
    timed("calibrate", run / "calibration.json", lambda: wd.calibrate(run, store=store, samples=k, out=out / "calibration", quiet=True))
    timed("predict, mean of K", out / f"k{k}.ome.zarr", lambda: wd.predict(run, [slide], out=out / f"k{k}.zarr", samples=k, quiet=True))
    timed(
        "predict, mean of K calibrated",
        out / f"k{k}_calibrated.ome.zarr",
        lambda: wd.predict(run, [slide], out=out / f"k{k}_calibrated.zarr", samples=k, calibrated=True, quiet=True),
    )
    unet = out / "unet"
    timed(
        "train regression U-Net",
        unet / "regression_ema.safetensors",
        lambda: wd.train(store, out=unet, model="regression", steps=args.steps, quiet=True),
    )
    timed("predict regression U-Net", out / "unet_map.ome.zarr", lambda: wd.predict(unet, [slide], out=out / "unet_map.zarr", quiet=True))

    def without_margin() -> None:  # each patch seen alone, through the U-Net's zero padding (how `predict` ran before)
        from wsi_damm.sampling import regression

        kept, regression.MARGIN = regression.MARGIN, 0
        try:
            wd.predict(unet, [slide], out=out / "unet_map_no_margin.zarr", quiet=True)
        finally:
            regression.MARGIN = kept

    timed("predict regression U-Net, no margin", out / "unet_map_no_margin.ome.zarr", without_margin)
    for name in ("unet_map", "unet_map_no_margin"):  # the same patches stitched with the Gaussian window (the default before)
        timed(
            f"stitch {name} with the Gaussian window",
            out / f"{name}_gaussian.ome.zarr",
            lambda name=name: wd.stitch(out / f"{name}.zarr", out=out / f"{name}_gaussian.ome.zarr", blend="gaussian", quiet=True),
        )
    maps = {
        "DAMM, one draw (the demo's map)": demo / "prediction.ome.zarr",
        f"DAMM, mean of {k} draws": out / f"k{k}.ome.zarr",
        f"DAMM, mean of {k} draws, calibrated interval": out / f"k{k}_calibrated.ome.zarr",
        "regression U-Net": out / "unet_map.ome.zarr",
        "regression U-Net, Gaussian blend": out / "unet_map_gaussian.ome.zarr",
        "regression U-Net, patches without a margin": out / "unet_map_no_margin.ome.zarr",
        "regression U-Net, patches without a margin, Gaussian blend": out / "unet_map_no_margin_gaussian.ome.zarr",
        "blurred-vessel baseline": demo / "baseline.ome.zarr",
    }
    rows = {}
    for name, path in maps.items():
        report_dir = out / ("report_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"))  # by name: rows may be added
        timed(
            f"evaluate: {name}",
            report_dir / "metrics.json",
            lambda: wd.evaluate(path, truth=slide, clean=[clean], out=report_dir, viewer=False, quiet=True),
        )
        rows[name] = figures(json.loads((report_dir / "metrics.json").read_text()))
    summary = {
        "benchmark": "bench_heldout",
        "demo": str(demo),
        "heldout": slide.name,
        "samples": k,
        "regression_steps": args.steps,
        "calibration": json.loads((run / "calibration.json").read_text()),
        "maps": rows,
        "seconds": seconds,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "machine": machine(),
    }
    report(summary, args.json)
    if args.json:
        args.json.with_suffix(".md").write_text(table(summary))


if __name__ == "__main__":
    main()
