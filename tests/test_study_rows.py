"""The study's non-diffusion rows go through predict's tiling and stitch: checked against the slide itself."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import tifffile
import torch
import zarr

from wsi_damm.models.regression import RegressionUNet
from wsi_damm.slides import specs_from_paths
from wsi_damm.stages.predict import PredictConfig, condition_config
from wsi_damm.tiling.plan import plan_slide
from wsi_damm.tiling.store import PatchStore
from wsi_damm.training.config import RunConfig, resolve
from wsi_damm.training.data import split_validation
from wsi_damm.workflows.patch_maps import patch_function_map
from wsi_damm.workflows.regression import build, regression_map, train_regression

from .conftest import TINY_TOML


def test_a_patch_function_map_is_predicts_grid_stitched(small, tmp_path):
    """fn = the CD31 patch itself: the map must be the normalised CD31 channel wherever a patch landed."""
    rc = RunConfig(patch_size=128, mpp=None, level=0)
    (spec,) = specs_from_paths([small], {})
    path = patch_function_map(
        rc, spec, tmp_path / "vessels.ome.zarr", lambda images, coords, context: (images[:, :1] + 1) / 2, {}, progress=False
    )
    m = np.asarray(zarr.open_group(str(path), mode="r")["0"][0]).astype(np.float64)
    plan = plan_slide(spec.without("target"), condition_config(rc, PredictConfig()))
    raw = tifffile.imread(small)[0].astype(np.float64)
    want = np.clip((raw - plan.lo[0]) / (plan.hi[0] - plan.lo[0]), 0, 1)
    covered = np.zeros(raw.shape, bool)
    for y, x in zip(plan.ys, plan.xs):
        covered[y : y + 128, x : x + 128] = True
    assert 0.3 < covered.mean() and (m[~covered] == 0).all()
    # stored as 8-bit patches, then a float16 map: within one 8-bit step
    assert np.abs(m[covered] - want[covered]).max() <= 1 / 255 + 1e-3


def test_regression_unet_shapes_and_range():
    net = RegressionUNet(2, channels=(8, 16, 32))
    y = net(torch.randn(3, 2, 64, 64) * 3)
    assert y.shape == (3, 1, 64, 64) and y.abs().max() <= 1


@pytest.mark.parametrize("span", [0, 4])
def test_regression_row_trains_at_the_runs_budget_and_maps_predicts_patches(small_store, synth_dir, tmp_path, span):
    """With the run's context (span 4) the regression U-Net gets the same surroundings as the diffusion model."""
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    rc = replace(
        resolve("tiny", tmp_path / "tiny.toml", {"model": {"context_span": span}}),
        patch_size=64,
        mpp=2.0,
        roles=tuple(PatchStore.open(small_store).roles),
    )
    run = train_regression(small_store, tmp_path / "reg", rc, progress=False)
    assert build(rc).stem.in_channels == (4 if span else 2)
    trained = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert trained.model.kind == "regression" and trained.train.steps == rc.train.steps
    validation = json.loads((run / "validation.json").read_text())
    split = split_validation(PatchStore.open(small_store), rc.train.val_fraction, (), rc.train.seed, rc.train.val_split)
    assert 0 < validation["train_patches"] == len(split.train) < len(PatchStore.open(small_store))  # what a DAMM run of rc learns from
    slide = sorted(synth_dir.glob("*.ome.tif"))[1]
    (spec,) = specs_from_paths([slide], {})
    path = regression_map(run, spec, tmp_path / "reg.ome.zarr", progress=False)
    m = np.asarray(zarr.open_group(str(path), mode="r")["0"][0]).astype(np.float32)
    plan = plan_slide(spec.without("target"), condition_config(rc, PredictConfig()))
    covered = np.zeros(m.shape, bool)
    for y, x in zip(plan.ys, plan.xs):
        covered[y : y + 64, x : x + 64] = True
    assert (m[~covered] == 0).all() and 0 <= m.min() and m.max() <= 1 and m[covered].std() > 0
    assert train_regression(small_store, run, rc, progress=False) == run  # a finished run is kept, not retrained
