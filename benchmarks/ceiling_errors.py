"""What an autoencoder's ceiling gets wrong, and why it can gain PSNR and lose SSIM.

The ceiling map decode(encode(measured NP)) is scored against the measured NP, which holds the
simulator's camera noise. An autoencoder that learns to reproduce that noise gets closer to the
measurement in squared error, while what it should carry for a diffusion model is the signal. For
each run directory given, its ceiling map (`ceiling.ome.zarr`, written by `compare_budget.py`) is
scored over tissue against the measured NP and against the noiseless field (normalised with the
measured channel's range, as `evaluate` does), and the share of the noise it reproduces is
β = ⟨(map − clean)·(measured − clean)⟩ / ⟨(measured − clean)²⟩ (0: none of the noise; 1: all of it).
Then by brightness: tissue split into quarters of the noiseless field's local mean (Gaussian σ 1.5 px,
SSIM's own window), each with SSIM against the noiseless field, the mean of map and field, and the
share of pixels the map renders black (≤ 0.002) — SSIM's luminance term weighs dim tissue heavily,
PSNR hardly at all; and the local contrast the map keeps (mean local sd, map over field). The
noiseless field itself is the reference row. Numpy only (no torch): it runs beside training.

    python benchmarks/ceiling_errors.py RUN_DIR... [--work /tmp/compare_seamless] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import dask.array as da
import numpy as np
from scipy import ndimage

BLACK = 0.002  # a map value this low renders as black
WINDOW = 1.5  # SSIM's Gaussian window (px)


def local_sd(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(ndimage.gaussian_filter(x * x, WINDOW) - ndimage.gaussian_filter(x, WINDOW) ** 2, 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="run directories holding ceiling.ome.zarr")
    ap.add_argument("--work", type=Path, default=Path("/tmp/compare_seamless"), help="the demo-budget data (compare_budget.py's --work)")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (default: print only)")
    args = ap.parse_args()

    from wsi_damm.evaluation.metrics import ssim_map, whole_slide_metrics
    from wsi_damm.stages.evaluate import Companion, load_truth
    from wsi_damm.stitching.slide_map import open_map
    from wsi_damm.tiling.plan import TileConfig
    from wsi_damm.workflows.dataset import synthetic_data
    from wsi_damm.workflows.demo import FULL

    data = synthetic_data(
        args.work / "data", FULL.size, FULL.train_slides, 1, TileConfig(patch_size=FULL.patch, overlap=FULL.overlap), False, print
    )
    held = data.heldout[0]
    rows = []
    reference = None
    for run in args.runs:
        m = open_map(run / "ceiling.ome.zarr")
        truth = load_truth(held.spec, m)
        h, w = truth.shape
        meas = truth.normalised("target", 0, 0, h, w).astype(np.float64)
        clean = Companion.open(held.clean, truth).normalised(0, 0, h, w).astype(np.float64)
        tissue = truth.tissue(0, 0, h, w).astype(bool)
        pred = np.asarray(m.level0[0, :h, :w], np.float64)
        cfg = json.loads((run / "config.json").read_text())

        def score(a: np.ndarray, b: np.ndarray) -> dict:
            r = whole_slide_metrics(da.from_array(a, chunks=1024), da.from_array(b, chunks=1024), da.from_array(tissue, chunks=1024))
            return {"ssim": r["ssim_tissue"], "psnr": r["psnr_tissue"]}

        noise = (meas - clean)[tissue]
        if reference is None:
            reference = {"noiseless_vs_measured": score(clean, meas), "noise_sd": float(noise.std())}
        err = (pred - clean)[tissue]
        s_map = ssim_map(pred, clean)
        bright = ndimage.gaussian_filter(clean, WINDOW)
        edges = np.quantile(bright[tissue], [0, 0.25, 0.5, 0.75, 1])
        quarters = []
        for q, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            sel = tissue & (bright >= a) & (bright <= b)
            quarters.append(
                {
                    "quarter": q + 1,
                    "local_mean_from": float(a),
                    "ssim_vs_noiseless": float(np.nanmean(s_map[sel])),
                    "map_mean": float(pred[sel].mean()),
                    "noiseless_mean": float(clean[sel].mean()),
                    "map_black_share": float((pred[sel] <= BLACK).mean()),
                    "noiseless_black_share": float((clean[sel] <= BLACK).mean()),
                }
            )
        rows.append(
            {
                "run": str(run),
                "autoencoder_steps": cfg["autoencoder"]["steps"],
                "seed": cfg["train"]["seed"],
                "ssim_weight": cfg["autoencoder"].get("ssim_weight", 0.0),
                "local_norm": cfg["autoencoder"].get("local_norm", "pixel"),
                "vs_measured": score(pred, meas),
                "vs_noiseless": score(pred, clean),
                "noise_reproduced": float((err * noise).mean() / (noise * noise).mean()),
                "error_sd_vs_noiseless": float(err.std()),
                "contrast_kept": float(local_sd(pred)[tissue].mean() / local_sd(clean)[tissue].mean()),
                "by_brightness": quarters,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {"reference": reference, "runs": rows}
    print(json.dumps(reference))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
