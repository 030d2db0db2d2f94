"""What the benchmarks that train at the demo's budget share: its synthetic data, the blurred-vessel
baseline on the held-out slide, and scores of a map over tissue and per simulator region."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class DemoBudget:
    plan: object  # workflows.demo.FULL
    data: object  # workflows.dataset.SyntheticData
    held: object  # its held-out slide
    scoring: dict  # run_evaluate keywords: the simulator's regions
    blur: dict  # the baseline's scores, with its fitted σ
    simulator_version: int


def scores(result: dict) -> dict:
    """Pearson's r, the map's mean and spread against the measured channel's (`check`), WSI SSIM / PSNR over tissue,
    seam score, and per region (with the gate's multi-modal share)."""
    s = result["slides"][0]
    return {
        "check": s.get("check"),
        "mean": s["wsi"].get("mean_tissue"),
        "mean_measured": s["wsi"].get("mean_measured_tissue"),
        "ssim": s["wsi"]["ssim_tissue"],
        "psnr": s["wsi"]["psnr_tissue"],
        "seam_score": s.get("seams", {}).get("map"),
        "regions": {
            k: {"ssim": v["ssim"], "psnr": v["psnr"], "multimodal_share": v.get("multimodal_share")}
            for k, v in s.get("regions", {}).items()
        },
    }


def summary(values: list[float]) -> dict:
    a = np.asarray(values, float)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else None, "n": len(a)}


def demo_budget(work: Path, target: str = "np") -> DemoBudget:
    """The demo's data under `work/data` (reused if there) and the blurred-vessel baseline scored on its held-out slide;
    `target`: the simulator's target kind (`SynthConfig.target`)."""
    from wsi_damm.stages.evaluate import run_evaluate
    from wsi_damm.tiling.plan import TileConfig
    from wsi_damm.workflows import baseline
    from wsi_damm.workflows.dataset import synthetic_data
    from wsi_damm.workflows.demo import FULL
    from wsi_damm.workflows.simulator import DIVERGENCE_LABELS, SIMULATOR_VERSION

    tile_cfg = TileConfig(patch_size=FULL.patch, overlap=FULL.overlap)
    data = synthetic_data(work / "data", FULL.size, FULL.train_slides, 1, tile_cfg, False, print, target=target)
    held = data.heldout[0]
    scoring = dict(regions=[held.divergence], region_names=DIVERGENCE_LABELS, progress=False)
    fitted = baseline.fit(data.train_specs, tile_cfg)
    blur = scores(
        run_evaluate(
            [(baseline.write_map(held.spec, tile_cfg, fitted, work / "blur.ome.zarr"), held.spec)],
            work / "blur_report",
            [held.clean],
            **scoring,
        )
    )
    return DemoBudget(FULL, data, held, scoring, blur | {"sigma_um": fitted.sigma_um}, SIMULATOR_VERSION)


def budget_config(plan, seed: int, autoencoder: dict | None = None, model: dict | None = None, train: dict | None = None):
    """The tiny preset at the demo's budget and loss (`plan`: workflows.demo.FULL; `demo_config`) with training seed `seed`."""
    from wsi_damm.training.config import merge
    from wsi_damm.workflows.demo import demo_config

    return merge(
        demo_config(plan), {"autoencoder": autoencoder or {}, "model": model or {}, "train": {"seed": seed, **(train or {})}}, "benchmark"
    )


def predict_and_score(
    demo: DemoBudget,
    run_dir: Path,
    draws: int,
    seed: int,
    sampling: str = "auto",
    steps: int | None = None,
    name: str | None = None,
    sampler: str = "dpm++",
    eta: float = 0.0,
) -> dict:
    """The held-out slide predicted by `run_dir` (`sampler`, DPM++ by default, at the demo's steps or `steps`, `draws`
    draws) and scored; with its seconds. Maps and report are named `name` (default pred{draws}, report{draws})."""
    import time

    from wsi_damm.stages.evaluate import run_evaluate
    from wsi_damm.stages.predict import PredictConfig, predict_maps

    t = time.perf_counter()
    pred, report = (f"pred{draws}", f"report{draws}") if name is None else (name, f"{name}_report")
    maps = predict_maps(
        run_dir,
        [demo.held.spec],
        run_dir / f"{pred}.zarr",
        PredictConfig(
            sampler=sampler, eta=eta, sampling=sampling, steps=steps or demo.plan.sample_steps, batch_size=32, samples=draws, seed=seed
        ),
        map_path=run_dir / f"{pred}.ome.zarr",
        overwrite=True,
        progress=False,
    ).maps
    seconds = round(time.perf_counter() - t, 1)
    return scores(run_evaluate([(maps[0], demo.held.spec)], run_dir / report, [demo.held.clean], **demo.scoring)) | {
        "predict_seconds": seconds
    }
