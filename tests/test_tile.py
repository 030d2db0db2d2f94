"""Tiling acceptance: stored patches equal the slide regions they claim, re-read independently."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import zarr

from wsi_damm.store import PatchDataset, PatchStore
from wsi_damm.tiling import grid_positions, tissue_fractions

from .conftest import run_cli


def _independent_normalise(raw: np.ndarray, lo: float, hi: float, top: int) -> np.ndarray:
    return np.rint(np.clip((raw.astype(np.float64) - lo) / (hi - lo), 0, 1) * top)


@pytest.fixture(scope="module")
def store_path(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tile") / "st.zarr"
    slides = sorted(str(p) for p in synth_dir.glob("*.ome.tif"))
    res = run_cli("tile", *slides, "--out", str(out), "--patch-size", "256", "--overlap", "64", "--quiet")
    assert res.returncode == 0, res.stderr
    return out


def test_every_patch_equals_its_slide_region(store_path, synth_dir):
    root = zarr.open_group(str(store_path), mode="r")
    attrs = dict(root.attrs)
    assert attrs["roles"] == ["vessels", "nuclei", "target"]  # auto roles from CD31 / DAPI / NP
    images = np.asarray(root["images"][:])
    coords = np.asarray(root["coords"][:])
    assert len(coords) > 20 and images.dtype == np.uint8
    p = attrs["patch_size"]
    for si, entry in enumerate(attrs["slides"]):
        path = entry["channels"]["vessels"]["path"]
        raw = tifffile.imread(path)  # level 0, whole, independent of our readers
        lo, hi = entry["normalisation"]["low"], entry["normalisation"]["high"]
        order = [entry["channels"][r]["index"] for r in attrs["roles"]]
        assert order == [0, 1, 2]
        sel = np.nonzero(coords[:, 0] == si)[0]
        assert len(sel) == entry["patches"] > 0
        for k in sel:
            _, y, x = coords[k]
            for c, ch in enumerate(order):
                want = _independent_normalise(raw[ch, y : y + p, x : x + p], lo[c], hi[c], 255)
                diff = np.abs(images[k, c].astype(np.int64) - want)
                assert diff.max() <= 1  # float32 vs float64 rounding at exact .5 ties
                assert (diff == 0).mean() > 0.999


def test_grid_is_regular_and_flush(store_path):
    store = PatchStore.open(store_path)
    a = store.attrs
    h, w = a["slides"][0]["shape"]
    ys = set(store.coords[store.coords[:, 0] == 0][:, 1])
    allowed = set(grid_positions(h, a["patch_size"], a["stride"]).tolist())
    assert ys <= allowed
    assert grid_positions(2048, 256, 192).tolist()[-1] == 2048 - 256
    assert grid_positions(1000, 256, 192).tolist() == [0, 192, 384, 576, 744]
    assert len(store.coords) == len(np.unique(store.coords, axis=0))


def test_tissue_fraction_matches_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) > 0.5
    ys, xs = np.array([0, 48, 96]), np.array([0, 64, 136])
    frac = tissue_fractions(mask, 4.0, ys, xs, 64)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            want = mask[y // 4 : (y + 64) // 4, x // 4 : (x + 64) // 4].mean()
            assert frac[i, j] == pytest.approx(want)


def test_dataset_gives_minus_one_to_one_per_role(store_path):
    ds = PatchDataset(store_path)
    mem = PatchDataset(store_path, in_memory=True)
    item, item_mem = ds[3], mem[3]
    assert set(item) == {"vessels", "nuclei", "target", "index"}
    for role in ("vessels", "nuclei", "target"):
        t = item[role]
        assert t.shape == (1, 256, 256) and t.dtype == torch.float32
        assert -1.0 <= float(t.min()) and float(t.max()) <= 1.0
        assert torch.equal(t, item_mem[role])
    raw = np.asarray(PatchStore.open(store_path).images[3, 0]).astype(np.float32)
    assert torch.allclose(item["vessels"][0], torch.from_numpy(raw / 127.5 - 1), atol=1e-6)


def test_info_reports_the_store(store_path):
    res = run_cli("info", str(store_path), "--json")
    assert res.returncode == 0, res.stderr
    import json

    info = json.loads(res.stdout)
    assert info["patch_size"] == 256 and info["stride"] == 192 and info["complete"]
    assert sum(info["patches_per_slide"].values()) == info["patches"]


def test_existing_store_is_not_overwritten(store_path, synth_dir):
    slide = str(sorted(synth_dir.glob("*.ome.tif"))[0])
    res = run_cli("tile", slide, "--out", str(store_path), "--quiet")
    assert res.returncode == 2 and "already exists" in res.stderr
