"""`train --model regression`: the L1 U-Net as a model of ours — trained into a run directory like DAMM's,
resumed on the same curve, and read unchanged by predict, stitch, evaluate, export, info and the API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from tests.conftest import TINY_TOML, run_cli
from wsi_damm.training.run_dir import RunDir


@pytest.fixture(scope="module")
def regression_run(small_store, tmp_path_factory):
    d = tmp_path_factory.mktemp("regression")
    (d / "tiny.toml").write_text(TINY_TOML)
    r = run_cli("train", str(small_store), "--out", str(d / "run"), "--model", "regression", "--config", str(d / "tiny.toml"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "regression_ema.safetensors" in r.stdout
    return d / "run"


def test_the_run_directory_holds_the_model_its_metrics_and_loss_plot(regression_run):
    run = RunDir(regression_run)
    assert run.regression.exists() and not run.unet.exists() and not run.autoencoder("target").exists()
    rows = (regression_run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,lr,loss,val_loss") and len(rows) == 1 + 6  # log_every 1, 6 steps
    assert (regression_run / "loss.png").stat().st_size > 0
    info = run_cli("info", str(regression_run))
    assert info.returncode == 0 and "regression U-Net" in info.stdout and "finished: True" in info.stdout


def test_a_killed_run_resumes_on_the_same_curve(small_store, regression_run, tmp_path):
    from wsi_damm.stages.train import run_training
    from wsi_damm.training.config import resolve

    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    cfg = resolve("tiny", tmp_path / "tiny.toml", {"model": {"kind": "regression"}})
    run_training(small_store, tmp_path / "run", cfg, progress=False, stop_after=4)  # a checkpoint at 3, killed after 4
    assert not RunDir(tmp_path / "run").regression.exists()
    run_training(small_store, tmp_path / "run", cfg, resume=True, progress=False)
    from safetensors.torch import load_file

    a, b = load_file(RunDir(tmp_path / "run").regression), load_file(RunDir(regression_run).regression)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:] != []


def test_predict_stitch_evaluate_and_export_read_it_unchanged(regression_run, synth_dir, tmp_path):
    slide = sorted(synth_dir.glob("*.ome.tif"))[1]
    r = run_cli("predict", str(regression_run), str(slide), "--out", str(tmp_path / "p.zarr"), "--quiet")
    assert r.returncode == 0, r.stderr
    store = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    assert store.attrs["model"] == {"kind": "regression"} and "pred_sd" not in store
    pred = np.asarray(store["pred"][:], np.float32)
    assert 0 <= pred.min() and pred.max() <= 1 and pred.std() > 0
    r = run_cli("evaluate", str(tmp_path / "p.ome.zarr"), "--truth", str(slide), "--out", str(tmp_path / "report"), "--no-viewer")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert np.isfinite(metrics["slides"][0]["wsi"]["ssim_tissue"]) and (tmp_path / "report" / "report.html").exists()
    r = run_cli("export", str(tmp_path / "p.ome.zarr"), "--truth", str(slide), "--out", str(tmp_path / "qupath"))
    assert r.returncode == 0, r.stderr


def test_what_a_regression_run_cannot_do_is_one_clear_line(regression_run, synth_dir, tmp_path):
    slide = sorted(synth_dir.glob("*.ome.tif"))[1]
    for extra, words in ((["--samples", "4"], "one map, not 4 draws"), (["--sampling", "shifted"], "predicted one by one")):
        r = run_cli("predict", str(regression_run), str(slide), "--out", str(tmp_path / "p.zarr"), "--quiet", *extra)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "p.zarr").exists()


def test_the_api_trains_it_too(small_store, tmp_path):
    import wsi_damm

    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    got = wsi_damm.train(small_store, out=tmp_path / "run", model="regression", config=tmp_path / "tiny.toml", quiet=True)
    assert got.weights == RunDir(tmp_path / "run").regression and got.weights.exists()


def test_each_patch_is_predicted_from_its_window_with_a_margin_and_cropped_to_its_centre(regression_run, small_map):
    """With the U-Net replaced by a model that returns its first input channel, the map of each patch is that patch's
    own vessels channel: the window the predictor is given holds the patch at its centre, and the crop takes that centre."""
    from wsi_damm.sampling.predictor import PredictConfig
    from wsi_damm.sampling.regression import MARGIN, RegressionPredictor
    from wsi_damm.tiling.store import PatchStore, to_model_range

    store = PatchStore.open(small_map / "c.zarr")
    predictor = RegressionPredictor(regression_run, torch.device("cpu"), PredictConfig())
    predictor.model = lambda x: x[:, :1]
    rows = np.arange(0, len(store), 9)
    images = predictor.inputs(store, rows)
    p = int(store.attrs["patch_size"])
    assert MARGIN > 0 and images.shape[-1] == p + 2 * MARGIN
    pred = predictor.predict(images, store.roles, torch.zeros(len(rows), dtype=torch.int64))[0]["pred"]
    vessels = to_model_range(np.asarray(store.images[:])[rows])[:, store.roles.index("vessels") : store.roles.index("vessels") + 1]
    np.testing.assert_allclose(pred, ((vessels + 1) / 2).clamp(0, 1).numpy(), atol=1e-6)
