"""Whole-slide prediction: batch-size invariance, kill + resume, nuclei-free slides."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import tifffile
import zarr

from wsi_damm.config import resolve
from wsi_damm.store import PredictionStore
from wsi_damm.train import run_training

from .conftest import TINY_TOML, count_files, kill_when, run_cli


@pytest.fixture(scope="module")
def tiny_run(small_store, tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    (d / "tiny.toml").write_text(TINY_TOML)
    return run_training(small_store, d / "run", resolve("tiny", d / "tiny.toml"), progress=False).path


def _slide(synth_dir):
    return str(sorted(synth_dir.glob("*.ome.tif"))[1])


def _predict(run, slide, out, *extra):
    res = run_cli("predict", str(run), slide, "--out", str(out), "--steps", "4", "--quiet", *extra)
    assert res.returncode == 0, res.stderr
    return PredictionStore.open(out)


def test_batch_size_does_not_change_the_prediction(tiny_run, synth_dir, tmp_path):
    a = _predict(tiny_run, _slide(synth_dir), tmp_path / "a.zarr", "--batch-size", "4", "--no-stitch")
    b = _predict(tiny_run, _slide(synth_dir), tmp_path / "b.zarr", "--batch-size", "32", "--no-stitch")
    np.testing.assert_array_equal(a.coords, b.coords)
    pa, pb = np.asarray(a.pred[:]).astype(np.float32), np.asarray(b.pred[:]).astype(np.float32)
    assert len(pa) > 20 and 0 <= pa.min() and pa.max() <= 1
    assert np.abs(pa - pb).max() <= 2e-3  # identical noise per patch; only kernel rounding may differ
    np.testing.assert_allclose(np.asarray(a.root["divergence"][:]), np.asarray(b.root["divergence"][:]), atol=1e-4)
    assert not (tmp_path / "a.zarr.conditions.zarr").exists()  # inputs cleaned up once complete


def test_kill_and_resume_gives_the_identical_map(tiny_run, synth_dir, tmp_path):
    slide = _slide(synth_dir)
    common = ["--sampler", "ddim", "--steps", "40", "--batch-size", "4", "--shard-patches", "4", "--quiet"]
    ref = tmp_path / "ref.zarr"
    assert run_cli("predict", str(tiny_run), slide, "--out", str(ref), *common).returncode == 0
    out = tmp_path / "k.zarr"
    partial = out.with_name(out.name + ".partial")
    kill_when(["predict", str(tiny_run), slide, "--out", str(out), *common], lambda: count_files(partial / "shard_done" / "c") >= 3)
    assert not out.exists()
    res = run_cli("predict", str(tiny_run), slide, "--out", str(out), "--resume", *common)
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.asarray(PredictionStore.open(ref).pred[:]), np.asarray(PredictionStore.open(out).pred[:]))
    ma = np.asarray(zarr.open_group(str(tmp_path / "ref.ome.zarr"), mode="r")["0"][:])
    mb = np.asarray(zarr.open_group(str(tmp_path / "k.ome.zarr"), mode="r")["0"][:])
    np.testing.assert_array_equal(ma, mb)


def test_slide_without_nuclei_predicts_uni_modal(tiny_run, synth_dir, tmp_path):
    full = tifffile.imread(_slide(synth_dir))
    path = tmp_path / "no_dapi.ome.tif"
    tifffile.imwrite(path, full[[0, 2]], ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["CD31", "NP"]},
                     "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}, tile=(256, 256), compression="zlib")
    store = _predict(tiny_run, str(path), tmp_path / "u.zarr")
    assert store.attrs["nuclei"] is False and store.roles == ["vessels", "target"]
    assert np.isnan(np.asarray(store.root["divergence"][:])).all()
    assert (np.asarray(store.root["multimodal_fraction"][:]) == 0).all()
    m = zarr.open_group(str(tmp_path / "u.ome.zarr"), mode="r")
    assert m.attrs["wsi_damm"]["nuclei"] is False


def test_two_ranks_predict_disjoint_shards_and_the_same_result(tiny_run, synth_dir, tmp_path):
    import subprocess as sp

    slide = _slide(synth_dir)
    one = _predict(tiny_run, slide, tmp_path / "one.zarr", "--shard-patches", "8", "--no-stitch")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
           "-m", "wsi_damm_cli.main", "predict", str(tiny_run), slide, "--out", str(tmp_path / "two.zarr"),
           "--steps", "4", "--shard-patches", "8", "--no-stitch", "--quiet"]
    res = sp.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    two = PredictionStore.open(tmp_path / "two.zarr")
    np.testing.assert_allclose(np.asarray(one.pred[:]).astype(np.float32), np.asarray(two.pred[:]).astype(np.float32), atol=2e-3)


def test_several_samples_give_their_mean_and_sd(tiny_run, synth_dir, tmp_path):
    import torch

    from wsi_damm.diffusion.noise import draw_keys
    from wsi_damm.predict import PredictConfig, Predictor

    store = _predict(tiny_run, _slide(synth_dir), tmp_path / "k.zarr", "--samples", "3")
    sd = np.asarray(store.root["pred_sd"][:]).astype(np.float32)
    assert sd.shape == store.pred.shape and (sd >= 0).all() and sd.max() > 0
    m = zarr.open_group(str(tmp_path / "k.ome.zarr"), mode="r")
    labels = [c["label"] for c in m.attrs["ome"]["omero"]["channels"]]
    assert labels == ["NP (predicted)", "NP sd over samples"] and float(np.asarray(m["0"][1]).max()) > 0

    # reference: the three draws one by one, with the keys the batched path derives
    images = torch.rand(6, 3, 64, 64) * 2 - 1
    keys = torch.arange(6, dtype=torch.int64) * 7919 + 11
    one = Predictor(tiny_run, torch.device("cpu"), PredictConfig(steps=4))
    three = Predictor(tiny_run, torch.device("cpu"), PredictConfig(steps=4, samples=3))
    mean, sd3, _, _ = three.predict(images, ["vessels", "nuclei", "target"], keys)
    draws = np.stack([one.predict(images, ["vessels", "nuclei", "target"], draw_keys(keys, i))[0] for i in range(3)])
    np.testing.assert_allclose(mean, draws.mean(0), atol=2e-3)
    np.testing.assert_allclose(sd3, draws.std(0), atol=2e-3)
    np.testing.assert_array_equal(one.predict(images, ["vessels", "nuclei", "target"], keys)[0], draws[0])
