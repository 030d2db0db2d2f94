"""Whole-slide maps from any per-patch function, on `predict`'s patches and through `stitch`.

The study's non-diffusion rows (the autoencoder ceiling, the regression U-Net) go through the same
tiling (tissue mask from CD31 and DAPI), the same blending and the same scoring as a prediction, so
a difference between rows is a difference between models, not between pipelines.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from wsi_damm.slides import SlideSpec
from wsi_damm.stages.predict import PredictConfig, condition_config
from wsi_damm.stages.stitch import run_stitch
from wsi_damm.stages.tile import run_tile
from wsi_damm.tiling.plan import TileConfig
from wsi_damm.tiling.store import PatchStore, create_prediction_store, read_rows, to_model_range
from wsi_damm.training.config import RunConfig
from wsi_damm.util.files import partial_path, publish

# (patches (B, C, P, P) in [-1, 1] with the store's roles, their coords (B, 3), their context windows in [0, 1] when the
# run conditions on context, else None) → NP (B, 1, P, P) in [0, 1]
PatchFunction = Callable[[torch.Tensor, np.ndarray, np.ndarray | None], torch.Tensor]


def tiling(rc: RunConfig) -> TileConfig:
    """The tiling `predict` would use for this run (default overlap and tissue threshold)."""
    return condition_config(rc, PredictConfig())


@torch.inference_mode()
def patch_function_map(
    rc: RunConfig,
    spec: SlideSpec,
    out: Path,
    fn: PatchFunction,
    attrs: dict,
    progress: bool = True,
    tiff: Path | None = None,
    tiff_units: str = "normalised",
) -> Path:
    """Tile `spec` as `predict` would, apply `fn` shard by shard, stitch the map `out` (and `tiff`, as
    `stitch` writes it). Returns the map path."""
    out = Path(out)
    work = out.with_name(out.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        tiles = work / "patches.zarr"
        run_tile([spec], tiles, tiling(rc), progress=progress)
        store = PatchStore.open(tiles)
        pred_path = work / "pred.zarr"
        partial = partial_path(pred_path)
        root = create_prediction_store(partial, store, {"nuclei": False, "np_normalisation": rc.np_scale.attrs(), **attrs})
        s, n = int(store.attrs["shard_patches"]), len(store)
        for a in range(0, n, s):
            rows = np.arange(a, min(a + s, n))
            context = store.context_windows(rows, rc.model.context_span) if rc.model.context_span else None
            pred = fn(to_model_range(read_rows(store.images, rows)), store.coords[rows], context)
            root["pred"][a : a + len(rows)] = pred.float().clamp(0, 1).numpy().astype(np.float16)
            root["multimodal_fraction"][a : a + len(rows)] = 0.0
            root["shard_done"][a // s] = 1
        root.attrs["complete"] = True
        publish(partial, pred_path)
        (made,) = run_stitch(pred_path, out, tiff=tiff, progress=progress, tiff_units=tiff_units)
        return made
    finally:
        shutil.rmtree(work, ignore_errors=True)
