"""Whole-slide prediction, independent, canvas and shifted-grid sampling: batch-size and rank invariance, nuclei-free slides,
what prediction reads (kill + resume: `test_predict_resume.py`)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import tifffile
import zarr

from wsi_damm.tiling.store import PredictionStore

from .conftest import free_port, predict_store, run_cli, run_for_sampling, second_slide


@pytest.mark.parametrize("sampling", ["canvas", "independent", "shifted"])
def test_batch_size_does_not_change_the_prediction(request, synth_dir, tmp_path, sampling):
    tiny_run = run_for_sampling(request, sampling)
    a = predict_store(tiny_run, second_slide(synth_dir), tmp_path / "a.zarr", "--batch-size", "4", "--no-stitch", "--sampling", sampling)
    b = predict_store(tiny_run, second_slide(synth_dir), tmp_path / "b.zarr", "--batch-size", "32", "--no-stitch", "--sampling", sampling)
    np.testing.assert_array_equal(a.coords, b.coords)
    pa, pb = np.asarray(a.pred[:]), np.asarray(b.pred[:])
    assert len(pa) > 20 and 0 <= pa.min() and pa.max() <= 1 and a.attrs["predict"]["sampling"] == sampling
    np.testing.assert_array_equal(pa, pb)  # noise keyed by position (canvas) or patch (independent), never by batch
    np.testing.assert_array_equal(np.asarray(a.root["divergence"][:]), np.asarray(b.root["divergence"][:]))
    assert not (tmp_path / "a.zarr.conditions.zarr").exists()  # inputs cleaned up once complete
    assert "canvas" not in a.root  # sampling state is not part of the store


def test_each_run_refuses_the_sampling_it_was_not_trained_for(tiny_run, canvas_run, synth_dir, tmp_path):
    for run, sampling, word in ((tiny_run, "shifted", "--latents canvas"), (canvas_run, "independent", "--sampling shifted")):
        out = tmp_path / f"{sampling}.zarr"
        res = run_cli("predict", str(run), second_slide(synth_dir), "--out", str(out), "--sampling", sampling, "--quiet")
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and word in res.stderr, res.stderr
        assert not out.exists() and not list(tmp_path.glob(f"{sampling}*"))


@pytest.mark.parametrize("sampling", ["independent", "canvas", "shifted"])
def test_slide_without_nuclei_predicts_uni_modal(request, synth_dir, tmp_path, sampling):
    tiny_run = run_for_sampling(request, sampling)
    full = tifffile.imread(second_slide(synth_dir))
    path = tmp_path / "no_dapi.ome.tif"
    tifffile.imwrite(
        path,
        full[[0, 2]],
        ome=True,
        metadata={"axes": "CYX", "Channel": {"Name": ["CD31", "NP"]}, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
        tile=(256, 256),
        compression="zlib",
    )
    store = predict_store(tiny_run, str(path), tmp_path / "u.zarr", "--sampling", sampling, "--samples", "2")
    assert store.attrs["nuclei"] is False and store.roles == ["vessels"]  # the measured NP channel is never read
    assert float(np.asarray(store.root["pred_sd"][:]).astype(np.float32).max()) > 0  # two draws (two canvases) that differ
    assert np.isnan(np.asarray(store.root["divergence"][:])).all()
    assert (np.asarray(store.root["multimodal_fraction"][:]) == 0).all()
    m = zarr.open_group(str(tmp_path / "u.ome.zarr"), mode="r")
    assert m.attrs["wsi_damm"]["nuclei"] is False


def test_prediction_reads_only_its_inputs(tiny_run, synth_dir, tmp_path):
    """The measured NP channel must not change anything (mask, normalisation, patches, map), and `--no-nuclei`
    must predict the same patches: every row of a comparison is then scored on the same pixels."""
    full = tifffile.imread(second_slide(synth_dir))
    rng = np.random.default_rng(0)
    targets = {
        "measured": full[2],
        "zeros": np.zeros_like(full[2]),
        "noise": rng.integers(0, np.iinfo(full.dtype).max, full[2].shape, dtype=full.dtype),
    }
    stores = {}
    for name, target in targets.items():
        (tmp_path / name).mkdir()
        path = tmp_path / name / "slide.ome.tif"  # one slide id: the noise is keyed by it
        tifffile.imwrite(
            path,
            np.stack([full[0], full[1], target]),
            ome=True,
            tile=(256, 256),
            compression="zlib",
            metadata={"axes": "CYX", "Channel": {"Name": ["CD31", "DAPI", "NP"]}, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
        )
        stores[name] = predict_store(tiny_run, str(path), tmp_path / f"{name}.zarr", "--no-stitch")
    ref = stores["measured"]
    assert ref.roles == ["vessels", "nuclei"] and len(ref.coords) > 20
    for name in ("zeros", "noise"):
        np.testing.assert_array_equal(ref.coords, stores[name].coords)
        np.testing.assert_array_equal(np.asarray(ref.pred[:]), np.asarray(stores[name].pred[:]))
        assert ref.slides[0]["normalisation"] == stores[name].slides[0]["normalisation"]
    uni = predict_store(tiny_run, str(tmp_path / "measured" / "slide.ome.tif"), tmp_path / "uni.zarr", "--no-stitch", "--no-nuclei")
    np.testing.assert_array_equal(ref.coords, uni.coords)  # the same tissue mask and patches as with nuclei
    assert uni.attrs["nuclei"] is False and np.isnan(np.asarray(uni.root["divergence"][:])).all()
    # … by the uni-modal branch: patches on which the gate never chose the multi-modal branch agree bitwise, the others not
    same = (np.asarray(ref.pred[:]) == np.asarray(uni.pred[:])).all(axis=(1, 2, 3))
    np.testing.assert_array_equal(same, np.asarray(ref.root["multimodal_fraction"][:]) == 0)


@pytest.mark.slow(adds="two torchrun ranks sharing a prediction, per sampling, equal to one process bit for bit")
@pytest.mark.parametrize("sampling", ["canvas", "independent", "shifted"])
def test_two_ranks_share_the_work_and_give_the_same_result(request, synth_dir, tmp_path, sampling):
    import subprocess as sp

    tiny_run = run_for_sampling(request, sampling)
    slide = second_slide(synth_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # the same kernels in every process
    args = [
        "predict",
        str(tiny_run),
        slide,
        "--steps",
        "4",
        "--eta",
        "1",
        "--sampler",
        "ddim",
        "--shard-patches",
        "8",
        "--no-stitch",
        "--sampling",
        sampling,
        "--quiet",
    ]
    res = sp.run(
        [sys.executable, "-m", "wsi_damm_cli.main", *args, "--out", str(tmp_path / "one.zarr")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "wsi_damm_cli.main",
        *args,
        "--out",
        str(tmp_path / "two.zarr"),
    ]
    res = sp.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = PredictionStore.open(tmp_path / "one.zarr"), PredictionStore.open(tmp_path / "two.zarr")
    np.testing.assert_array_equal(np.asarray(one.pred[:]), np.asarray(two.pred[:]))
    np.testing.assert_array_equal(np.asarray(one.root["multimodal_fraction"][:]), np.asarray(two.root["multimodal_fraction"][:]))


def test_several_samples_give_their_mean_and_sd(tiny_run, synth_dir, tmp_path):
    import torch

    from wsi_damm.diffusion.noise import draw_keys
    from wsi_damm.stages.predict import PredictConfig, Predictor

    store = predict_store(tiny_run, second_slide(synth_dir), tmp_path / "k.zarr", "--samples", "3")
    sd = np.asarray(store.root["pred_sd"][:]).astype(np.float32)
    assert sd.shape == store.pred.shape and (sd >= 0).all() and sd.max() > 0
    m = zarr.open_group(str(tmp_path / "k.ome.zarr"), mode="r")
    labels = [c["label"] for c in m.attrs["ome"]["omero"]["channels"]]
    assert labels == ["NP (predicted)", "NP sd over samples", "NP interval low", "NP interval high"]
    assert float(np.asarray(m["0"][1]).max()) > 0
    assert store.attrs["interval"] == {"requested": 0.8, "draws": 3, "rank": 1, "nominal": 0.5, "scale": 1.0}  # 3 draws: their range, 50 %

    # reference: the three draws one by one, with the keys the batched path derives
    images = torch.rand(6, 3, 64, 64) * 2 - 1
    keys = torch.arange(6, dtype=torch.int64) * 7919 + 11
    ctx = np.random.default_rng(0).random((6, 2, 16, 16)).astype(np.float32)  # the run conditions on context windows too
    one = Predictor(tiny_run, torch.device("cpu"), PredictConfig(steps=4))
    three = Predictor(tiny_run, torch.device("cpu"), PredictConfig(steps=4, samples=3))
    stats, _, _ = three.predict(images, ["vessels", "nuclei", "target"], keys, ctx)
    draws = np.stack([one.predict(images, ["vessels", "nuclei", "target"], draw_keys(keys, i), ctx)[0]["pred"] for i in range(3)])
    np.testing.assert_allclose(stats["pred"], draws.mean(0), atol=2e-3)
    np.testing.assert_allclose(stats["pred_sd"], draws.std(0), atol=2e-3)
    np.testing.assert_allclose(stats["pred_lo"], draws.min(0), atol=2e-3)  # the interval of 3 draws is their range
    np.testing.assert_allclose(stats["pred_hi"], draws.max(0), atol=2e-3)
    np.testing.assert_array_equal(one.predict(images, ["vessels", "nuclei", "target"], keys, ctx)[0]["pred"], draws[0])
