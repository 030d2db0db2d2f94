"""The context around a patch: the stored image is the slide's block mean normalised like the patches
(checked against the file itself), windows are cut where the patches sit (brute force), the measured
target never enters, and runs conditioned on context train, predict and refuse a store without it."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from wsi_damm.stages.train import run_training
from wsi_damm.tiling.context import CONTEXT_DOWNSAMPLE, _resample, cut_windows, to_latent_grid, window_side
from wsi_damm.tiling.store import PatchStore
from wsi_damm.training.config import RunConfig, resolve
from wsi_damm.training.run_dir import build_unet, condition_channels
from wsi_damm.util.errors import InputError

from .conftest import TINY_TOML, run_cli


def test_the_stored_context_is_the_slides_block_mean_normalised_like_its_patches(small, tmp_path):
    out = tmp_path / "s.zarr"
    r = run_cli("tile", str(small), "--out", str(out), "--patch-size", "128", "--overlap", "32", "--quiet")
    assert r.returncode == 0, r.stderr
    store = PatchStore.open(out)
    assert store.roles == ["vessels", "nuclei", "target"] and store.context_roles == ["vessels", "nuclei"]  # never the target
    full = tifffile.imread(small).astype(np.float64)  # (3, 1024, 1024) at 0.5 µm/px: the tiled grid itself
    norm = store.slides[0]["normalisation"]
    d = CONTEXT_DOWNSAMPLE
    for k, role in enumerate(store.context_roles):
        c = store.roles.index(role)
        block = full[c].reshape(1024 // d, d, 1024 // d, d).mean(axis=(1, 3))
        want = np.clip((block - norm["low"][c]) / (norm["high"][c] - norm["low"][c]), 0, 1)
        got = np.asarray(store.root["context"]["0"][k], np.float64)
        np.testing.assert_allclose(got, want, atol=1e-3)  # float16 storage
    # the windows the store hands out are cut from that image
    rows = np.arange(len(store))[:: max(1, len(store) // 7)]
    image = np.asarray(store.root["context"]["0"][:], np.float32)
    np.testing.assert_array_equal(store.context_windows(rows, 4), cut_windows(image, store.coords[rows, 1:], 128, 4))


def test_windows_are_centred_on_their_patches_and_zero_beyond_the_slide():
    rng = np.random.default_rng(1)
    image = rng.random((2, 20, 30)).astype(np.float32)
    patch, span = 64, 4
    s = window_side(patch, span)
    yx = np.array([[0, 0], [96, 160], [256, 400], [300, 7], [-64, 460]])
    got = cut_windows(image, yx, patch, span)
    assert got.shape == (len(yx), 2, s, s)
    for b, (y, x) in enumerate(yx):
        top, left = (int(np.rint((v + patch / 2) / CONTEXT_DOWNSAMPLE - s / 2)) for v in (y, x))
        for i in range(s):
            for j in range(s):
                yy, xx = top + i, left + j
                want = image[:, yy, xx] if 0 <= yy < 20 and 0 <= xx < 30 else np.zeros(2, np.float32)
                np.testing.assert_array_equal(got[b, :, i, j], want)


def test_resampling_is_a_block_mean_at_whole_ratios_and_exact_on_ramps_otherwise():
    rng = np.random.default_rng(2)
    ch = rng.random((50, 37)).astype(np.float32)
    got = _resample(ch, 16.0, 4, 3)  # ragged edge: the last blocks hold 2 rows and 5 columns of the image
    for i in range(4):
        for j in range(3):
            assert got[i, j] == pytest.approx(ch[16 * i : 16 * i + 16, 16 * j : 16 * j + 16].mean(), rel=1e-5)
    yy, xx = np.mgrid[0:200, 0:200].astype(np.float32)
    ramp = 0.01 * yy + 0.02 * xx  # blur and bilinear sampling keep a linear function (away from the border)
    got = _resample(ramp, 2.5, 80, 80)
    cy = (np.arange(80) + 0.5) * 2.5 - 0.5
    want = 0.01 * cy[:, None] + 0.02 * cy[None, :]
    np.testing.assert_allclose(got[10:-10, 10:-10], want[10:-10, 10:-10], atol=1e-4)


def test_context_reaches_the_latent_grid_in_model_range():
    w = np.full((2, 2, 16, 16), 0.25, np.float32)
    z = to_latent_grid(w, 8)
    assert z.shape == (2, 2, 8, 8) and torch.allclose(z, torch.full_like(z, -0.5))


def test_a_context_run_widens_each_branchs_input_and_refuses_a_store_without_context(small_store, tmp_path):
    cfg = RunConfig.from_dict({"model": {"context_span": 4}})
    net = build_unet(cfg)
    assert condition_channels(cfg) == 5 and net.uni.inp.in_channels == net.multi.inp.in_channels == 2 * 4 + 1
    with pytest.raises(InputError, match="context-span"):
        resolve("tiny", flags={"model": {"context_span": -1}})
    old = tmp_path / "old.zarr"  # a store tiled before there was context
    import shutil

    import zarr

    shutil.copytree(small_store, old)
    root = zarr.open_group(str(old), mode="r+")
    del root["context"]
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    with pytest.raises(InputError, match="tile the slides again"):
        run_training(old, tmp_path / "run", resolve("tiny", tmp_path / "tiny.toml", {"model": {"context_span": 4}}), progress=False)
    assert not (tmp_path / "run" / "unet_ema.safetensors").exists()


@pytest.mark.parametrize("uni_branch", ["vessels", "nuclei"])
def test_each_branch_gets_the_context_of_its_own_channel(uni_branch):
    """`with_context` puts each branch's context channel right after its latent, whichever role the
    uni-modal branch reads (the paper's Tab. 4 swaps them)."""
    from wsi_damm.stages.predict import PredictConfig, Predictor

    rc = RunConfig.from_dict({"model": {"context_span": 4, "uni_branch": uni_branch}})
    pred = object.__new__(Predictor)
    pred.rc, pred.cfg, pred.device = rc, PredictConfig(), torch.device("cpu")
    c, p = rc.autoencoder.latent_channels, 8
    latents = torch.cat([torch.full((1, c, p, p), 10.0), torch.full((1, c, p, p), 20.0)], 1)  # uni, then multi
    context = np.stack([np.full((1, 16, 16), 0.25, np.float32), np.full((1, 16, 16), 0.75, np.float32)], 1)  # vessels, nuclei
    got = pred.with_context(latents, ["vessels", "nuclei"], context)
    uni_ctx, multi_ctx = (-0.5, 0.5) if uni_branch == "vessels" else (0.5, -0.5)
    assert got.shape == (1, 2 * (c + 1), p, p)
    assert (got[:, :c] == 10).all() and torch.allclose(got[:, c], torch.full((1, p, p), uni_ctx))
    assert (got[:, c + 1 : 2 * c + 1] == 20).all() and torch.allclose(got[:, 2 * c + 1], torch.full((1, p, p), multi_ctx))
