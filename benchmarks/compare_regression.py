"""The regression U-Net (L1, the pix2pix generator without its GAN) at the demo's training budget, on
the demo's patch store, scored on the demo's held-out slide like the demo's DAMM map.

Run `wsi-damm demo --out DEMO` first, then `python benchmarks/compare_regression.py DEMO --out
benchmarks/results/regression`. Same store, steps, batch size, batch order, learning-rate schedule,
clipping and EMA as the demo's DAMM run (its `config.json`); prints and writes `regression.json`.
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
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/regression"))
    args = ap.parse_args()

    from wsi_damm.inputs import resolve_slides
    from wsi_damm.run_dir import RunDir, load_run_config
    from wsi_damm.stages.evaluate import run_evaluate
    from wsi_damm.workflows.regression import regression_map, train_regression
    from wsi_damm.workflows.synth import DIVERGENCE_LABELS

    demo, work = args.demo, args.out / "work"
    rc = load_run_config(RunDir(demo / "run"))
    t0 = time.perf_counter()
    run = train_regression(demo / "patches.zarr", work / "run", rc, progress=False)
    t1 = time.perf_counter()
    held = demo / "slides" / "heldout"
    spec = resolve_slides([held / "heldout_000.ome.tif"])[0]
    m = regression_map(run, spec, work / "map.ome.zarr", progress=False)
    res = run_evaluate([(m, spec)], work / "report", [held / "truth" / "heldout_000.np_clean.ome.tif"], progress=False,
                       regions=[held / "truth" / "heldout_000.divergence.ome.tif"], region_names=DIVERGENCE_LABELS)
    s = res["slides"][0]
    row = {"train_seconds": round(t1 - t0, 1), "steps": rc.train.steps, "batch": rc.train.batch_size,
           "wsi_ssim_tissue": s["wsi"]["ssim_tissue"], "wsi_psnr_tissue": s["wsi"]["psnr_tissue"],
           "regions": {k: (v["ssim"], v["psnr"]) for k, v in s["regions"].items()},
           "pixels_tissue": s["wsi"]["pixels_tissue"], "seam": s["seams"]["map"]}
    print(json.dumps(row))
    shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "regression.json").write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
