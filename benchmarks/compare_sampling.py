"""Canvas (fused or shifted grid) vs independent sampling on the demo's held-out slide: seam score, WSI SSIM / PSNR over
tissue, wall time — same run, slide, sampler, steps, draws and batch, scored on the same pixels.

Run `wsi-damm demo --out DEMO` first (it trains the run and writes the held-out slide), then
`python benchmarks/compare_sampling.py DEMO --out benchmarks/results/sampling`. Writes
`sampling.json` (and keeps each row's report folder under OUT/reports/ unless --no-reports).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("demo", type=Path, help="output folder of `wsi-damm demo`")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sampling"))
    ap.add_argument("--run", type=Path, help="the run to sample from (default: the demo's own run)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 4], help="draws per patch; one row per value and sampling")
    ap.add_argument("--sampling", nargs="+", default=["independent", "canvas", "shifted"], help="the rows, per value of --samples")
    ap.add_argument("--no-reports", action="store_true")
    args = ap.parse_args()

    from wsi_damm.stages.evaluate import run_evaluate
    from wsi_damm.stages.predict import PredictConfig, predict_maps
    from wsi_damm.tiling.inputs import resolve_slides
    from wsi_damm.util.files import write_json
    from wsi_damm.workflows.simulator import DIVERGENCE_LABELS

    held = args.demo / "slides" / "heldout"
    spec = resolve_slides([held / "heldout_000.ome.tif"])[0]
    work = args.out / "work"
    rows = []
    for k in args.samples:
        for sampling in args.sampling:
            name = f"{sampling}_k{k}"
            t0 = time.perf_counter()
            done = predict_maps(
                args.run or args.demo / "run",
                [spec],
                work / f"{name}.zarr",
                PredictConfig(sampling=sampling, steps=args.steps, batch_size=32, samples=k),
                overwrite=True,
                progress=False,
            )
            seconds = time.perf_counter() - t0
            m = run_evaluate(
                [(done.maps[0], spec)],
                args.out / "reports" / name,
                [held / "truth" / "heldout_000.np_clean.ome.tif"],
                progress=False,
                regions=[held / "truth" / "heldout_000.divergence.ome.tif"],
                region_names=DIVERGENCE_LABELS,
            )
            r = m["slides"][0]
            rows.append(
                {
                    "sampling": sampling,
                    "samples": k,
                    "steps": args.steps,
                    "sampler": "dpm++",
                    "predict_and_stitch_seconds": round(seconds, 1),
                    "wsi_ssim_tissue": r["wsi"]["ssim_tissue"],
                    "wsi_psnr_tissue": r["wsi"]["psnr_tissue"],
                    "pixels_tissue": r["wsi"]["pixels_tissue"],
                    "seam_score": r["seams"]["map"],
                    "seam_score_measured": r["seams"]["measured"],
                    "seam_pairs": r["seams"]["pairs"],
                    "patch_ssim_percent": r["patches"]["ssim_percent"]["mean"],
                    "patches": r["patches"]["ssim_percent"]["n"],
                }
            )
            print(json.dumps(rows[-1]))
    shutil.rmtree(work, ignore_errors=True)
    if args.no_reports:
        shutil.rmtree(args.out / "reports", ignore_errors=True)
    write_json(
        args.out / "sampling.json",
        {"demo": str(args.demo), "run": str(args.run or args.demo / "run"), "slide": spec.slide_id, "rows": rows},
    )


if __name__ == "__main__":
    main()
