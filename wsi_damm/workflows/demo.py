"""`wsi-damm demo`: the whole job on synthetic slides, end to end, with a non-learned reference.

train slides → tile → train (tiny) → predict a held-out slide → stitch → evaluate, plus the
blurred-vessel baseline and the noiseless oracle on the same held-out slide.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from wsi_damm.stages.evaluate import run_evaluate
from wsi_damm.stages.predict import PredictConfig, predict_maps, resolve_sampling
from wsi_damm.stages.train import run_training
from wsi_damm.tiling.plan import TileConfig
from wsi_damm.tiling.store import PatchStore
from wsi_damm.training.config import RunConfig, resolve
from wsi_damm.util.files import read_json, write_json
from wsi_damm.workflows import baseline
from wsi_damm.workflows.dataset import synthetic_data
from wsi_damm.workflows.simulator import DIVERGENCE_LABELS, SIMULATOR_VERSION


@dataclass(frozen=True)
class DemoPlan:
    size: int
    train_slides: int
    ae_steps: int
    steps: int
    sample_steps: int
    samples: int  # draws per patch; the map is their mean — the posterior mean SSIM / PSNR reward
    patch: int = 128
    overlap: int = 32
    on_collapse: str = "stop"  # what the autoencoder guard does: the quick plan checks the pipeline, not the model


# 500 diffusion, 150 autoencoder and 10 DPM-Solver++ steps and one draw: the budget that keeps the full demo within
# 10 minutes on 2 cores (the budget's measurements: docs/results.md, benchmarks/results/budget/).
FULL = DemoPlan(size=2048, train_slides=2, ae_steps=150, steps=500, sample_steps=10, samples=1)
# The quick plan is a check that every stage runs; 60 autoencoder steps are too few for them to learn, so its guard warns
# (the warning and the map check's flag are in its summary) instead of stopping.
QUICK = DemoPlan(size=1024, train_slides=2, ae_steps=60, steps=150, sample_steps=10, samples=2, on_collapse="warn")


def demo_config(plan: DemoPlan, preset: str = "tiny") -> RunConfig:
    """`preset` at the plan's budget: five validations (each a forward pass over the held-out training slide's
    patches) and one checkpoint, at the end. Both branches learn from every sample after the warm-up
    (`damm.multi_loss = "always"`): at this budget the paper's gated loss can leave the gate locked on the vessel
    branch, a map blind to DAPI (benchmarks/results/budget/multi_loss_500_avx512.json)."""
    cfg = resolve(preset)
    return replace(
        cfg,
        autoencoder=replace(cfg.autoencoder, steps=plan.ae_steps, on_collapse=plan.on_collapse),
        damm=replace(cfg.damm, multi_loss="always"),
        train=replace(cfg.train, steps=plan.steps, val_every=max(10, plan.steps // 5), checkpoint_every=plan.steps),
    )


def run_demo(out: Path, preset: str = "tiny", quick: bool = False, progress: bool = True, log=print) -> dict:
    plan = QUICK if quick else FULL
    out = Path(out)
    t0 = time.perf_counter()
    stamp = lambda: f"[{time.perf_counter() - t0:6.1f} s]"  # noqa: E731
    tile_cfg = TileConfig(patch_size=plan.patch, overlap=plan.overlap)
    data = synthetic_data(out, plan.size, plan.train_slides, 1, tile_cfg, progress, lambda m: log(f"{stamp()} {m}"))
    train_specs, held = data.train_specs, data.heldout[0]
    held_spec, store = held.spec, PatchStore.open(data.store)
    log(f"{stamp()} {len(store)} patches; training the {preset} preset → {out / 'run'}")
    cfg = demo_config(plan, preset)
    run = run_training(out / "patches.zarr", out / "run", cfg, progress=progress)
    draws = f"mean of {plan.samples} draws" if plan.samples > 1 else "one draw"
    log(
        f"{stamp()} predicting the held-out slide (DPM-Solver++, {plan.sample_steps} steps, {draws}, "
        f"{resolve_sampling(cfg, 'auto')} sampling) → {out / 'prediction.zarr'}"
    )
    predicted = predict_maps(
        run.path,
        [held_spec],
        out / "prediction.zarr",
        PredictConfig(steps=plan.sample_steps, batch_size=32, samples=plan.samples),
        map_path=out / "prediction.ome.zarr",
        tiff=out / "prediction.ome.tif",
        overwrite=True,
        progress=progress,
    )
    [map_path] = predicted.maps

    log(f"{stamp()} blurred-vessel baseline fitted on the training slides")
    fitted = baseline.fit(train_specs, tile_cfg)
    base_map = baseline.write_map(held_spec, tile_cfg, fitted, out / "baseline.ome.zarr")

    log(f"{stamp()} evaluating → {out / 'report'}")
    clean = [held.clean]
    regions = dict(regions=[held.divergence], region_names=DIVERGENCE_LABELS)
    damm = run_evaluate([(map_path, held_spec)], out / "report", clean, progress=progress, **regions)
    ref = run_evaluate([(base_map, held_spec)], out / "report_baseline", clean, progress=progress, **regions)
    d, b = damm["slides"][0], ref["slides"][0]
    summary = {
        "seconds": round(time.perf_counter() - t0, 1),
        "simulator_version": SIMULATOR_VERSION,
        "damm": {
            "pearson_r": d["check"]["pearson_r"],
            "spread_ratio": d["check"]["spread_ratio"],
            "mean_ratio": d["check"]["mean_ratio"],
            "warning": d["check"]["warning"],
            "wsi_ssim": d["wsi"]["ssim_tissue"],
            "wsi_psnr": d["wsi"]["psnr_tissue"],
            "nrmse": d["wsi"]["nrmse_tissue"],
            "spectral_error": d["wsi"]["spectral_error_tissue"],
            "patch_ssim_percent": d["patches"]["ssim_percent"]["mean"],
            "patch_psnr": d["patches"]["psnr"]["mean"],
            "seam_score": d["seams"]["map"],
            "sampling": d["sampling"],
        },
        "measured_seam_score": d["seams"]["measured"],
        "blurred_vessel_baseline": {
            "pearson_r": b["check"]["pearson_r"],
            "spread_ratio": b["check"]["spread_ratio"],
            "wsi_ssim": b["wsi"]["ssim_tissue"],
            "wsi_psnr": b["wsi"]["psnr_tissue"],
            "nrmse": b["wsi"]["nrmse_tissue"],
            "spectral_error": b["wsi"]["spectral_error_tissue"],
            "patch_ssim_percent": b["patches"]["ssim_percent"]["mean"],
            "patch_psnr": b["patches"]["psnr"]["mean"],
            "sigma_um": fitted.sigma_um,
            "r2_train": fitted.r2,
        },
        "autoencoders_collapsed": read_json(run.ae_ceiling)["collapsed"],
        "oracle": {"wsi_ssim": d["oracle_wsi"]["ssim_tissue"], "wsi_psnr": d["oracle_wsi"]["psnr_tissue"]},
        "outputs": {
            "map": str(map_path),
            "tiff": str(out / "prediction.ome.tif"),
            "report": str(out / "report" / "report.html"),
            "baseline_report": str(out / "report_baseline" / "report.html"),
            "run": str(run.path),
        },
    }
    write_json(out / "demo_summary.json", summary)
    return summary
