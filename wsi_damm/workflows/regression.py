"""The study's regression row: `train --model regression` at the diffusion run's budget, then `predict` and `stitch`.

Same patch store, steps, batch size, batch order, learning-rate schedule, gradient clipping and EMA as the
diffusion run it is compared with (its `RunConfig.train`); only the model and the loss differ. It runs the
code a user runs (`training/regression.py`, `sampling/regression.py`), so the row is the product's U-Net.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from wsi_damm.slides import SlideSpec
from wsi_damm.stages.predict import PredictConfig, predict_maps
from wsi_damm.stages.train import run_training
from wsi_damm.training.config import RunConfig
from wsi_damm.training.regression import build_regression
from wsi_damm.training.run_dir import RunDir

build = build_regression  # the row's model, as `train --model regression` builds it


def train_regression(store_path: Path, run_dir: Path, rc: RunConfig, progress: bool = True) -> Path:
    """Train on the patches a DAMM run with the same settings learns from (its validation split held out: like with
    like; the study sets no validation, so every patch) into the run directory `run_dir`; a finished run is kept."""
    run = RunDir(run_dir)
    if run.regression.exists():
        return run.path
    cfg = replace(rc, model=replace(rc.model, kind="regression"))
    return run_training(Path(store_path), run.path, cfg, resume=True, progress=progress).path


def regression_map(run_dir: Path, spec: SlideSpec, out: Path, progress: bool = True) -> Path:
    """The regression run's whole-slide map of one slide (needs CD31 and DAPI), predicted and stitched as `predict` does."""
    out = Path(out)
    store = out.with_name(out.name.removesuffix(".ome.zarr") + ".pred.zarr")
    (made,) = predict_maps(Path(run_dir), [spec], store, PredictConfig(), map_path=out, overwrite=True, progress=progress).maps
    return made
