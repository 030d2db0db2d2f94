"""`wsi-damm demo`: the whole job on synthetic slides, end to end, with a non-learned reference.

train slides → tile → train (tiny) → predict a held-out slide → stitch → evaluate, plus the
blurred-vessel baseline and the noiseless oracle on the same held-out slide.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .config import resolve
from .predict import PredictConfig, run_predict
from .report import run_evaluate
from .slides import specs_from_paths
from .stitch import run_stitch
from .synth import SynthConfig, write_slides
from .tile import TileConfig, run_tile
from .train import run_training


@dataclass(frozen=True)
class DemoPlan:
    size: int
    train_slides: int
    ae_steps: int
    steps: int
    sample_steps: int
    patch: int = 128
    overlap: int = 32


FULL = DemoPlan(size=2048, train_slides=2, ae_steps=300, steps=1000, sample_steps=20)
QUICK = DemoPlan(size=1024, train_slides=2, ae_steps=60, steps=150, sample_steps=10)


def run_demo(out: Path, preset: str = "tiny", quick: bool = False, progress: bool = True, log=print) -> dict:
    from . import baseline

    plan = QUICK if quick else FULL
    out = Path(out)
    t0 = time.perf_counter()
    stamp = lambda: f"[{time.perf_counter() - t0:6.1f} s]"  # noqa: E731
    log(f"{stamp()} synthetic slides ({plan.train_slides} for training, 1 held out, {plan.size}² px at 0.5 µm/px) → {out / 'slides'}")
    train = write_slides(out / "slides" / "train", plan.train_slides, SynthConfig(size=plan.size, seed=1), progress=progress)
    held = write_slides(out / "slides" / "heldout", 1, SynthConfig(size=plan.size, seed=1001), progress=progress, prefix="heldout")[0]
    train_specs = specs_from_paths([r["slide"] for r in train], {})
    held_spec = specs_from_paths([held["slide"]], {})[0]

    tile_cfg = TileConfig(patch_size=plan.patch, overlap=plan.overlap)
    log(f"{stamp()} tiling → {out / 'patches.zarr'}")
    store = run_tile(train_specs, out / "patches.zarr", tile_cfg, overwrite=True, progress=progress)
    log(f"{stamp()} {len(store)} patches; training the {preset} preset → {out / 'run'}")
    cfg = resolve(preset)
    cfg = replace(cfg, autoencoder=replace(cfg.autoencoder, steps=plan.ae_steps),
                  train=replace(cfg.train, steps=plan.steps, val_every=max(10, plan.steps // 10), checkpoint_every=plan.steps))
    run = run_training(out / "patches.zarr", out / "run", cfg, progress=progress)
    log(f"{stamp()} predicting the held-out slide (DPM-Solver++, {plan.sample_steps} steps) → {out / 'prediction.zarr'}")
    run_predict(run.path, [held_spec], out / "prediction.zarr", PredictConfig(steps=plan.sample_steps, batch_size=32),
                overwrite=True, progress=progress)
    [map_path] = run_stitch(out / "prediction.zarr", out / "prediction.ome.zarr", tiff=out / "prediction.ome.tif", progress=progress)

    log(f"{stamp()} blurred-vessel baseline fitted on the training slides")
    fitted = baseline.fit(train_specs, tile_cfg)
    base_map = baseline.write_map(held_spec, tile_cfg, fitted, out / "baseline.ome.zarr")

    log(f"{stamp()} evaluating → {out / 'report'}")
    clean = [held["clean"]]
    damm = run_evaluate([(map_path, held_spec)], out / "report", clean, progress=progress)
    ref = run_evaluate([(base_map, held_spec)], out / "report_baseline", clean, progress=progress)
    d, b = damm["slides"][0], ref["slides"][0]
    summary = {
        "seconds": round(time.perf_counter() - t0, 1),
        "damm": {"wsi_ssim": d["wsi"]["ssim_tissue"], "wsi_psnr": d["wsi"]["psnr_tissue"],
                 "patch_ssim_percent": d["patches"]["ssim_percent"]["mean"], "patch_psnr": d["patches"]["psnr"]["mean"]},
        "blurred_vessel_baseline": {"wsi_ssim": b["wsi"]["ssim_tissue"], "wsi_psnr": b["wsi"]["psnr_tissue"],
                                    "patch_ssim_percent": b["patches"]["ssim_percent"]["mean"], "patch_psnr": b["patches"]["psnr"]["mean"],
                                    "sigma_um": fitted.sigma_um, "r2_train": fitted.r2},
        "oracle": {"wsi_ssim": d["oracle_wsi"]["ssim_tissue"], "wsi_psnr": d["oracle_wsi"]["psnr_tissue"]},
        "outputs": {"map": str(map_path), "tiff": str(out / "prediction.ome.tif"), "report": str(out / "report" / "report.html"),
                    "baseline_report": str(out / "report_baseline" / "report.html"), "run": str(run.path)},
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
