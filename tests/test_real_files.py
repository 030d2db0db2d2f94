"""Real slides from other projects tile; broken ones fail with one clear line and leave nothing."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from wsi_damm.slides import open_file
from wsi_damm.tiling.store import PatchStore

from .conftest import fixture, run_cli


def _tile(tmp_path, *args):
    out = tmp_path / "st.zarr"
    res = run_cli("tile", *args, "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    return PatchStore.open(out)


def test_qptiff_channel_names_from_xml(tmp_path):
    path = fixture("fluorescence/pathml_small_vectra.qptiff")
    with open_file(path) as s:
        assert s.channel_names == ["DAPI", "FITC", "Cy3"]
        assert s.mpp == pytest.approx(0.5)
    store = _tile(tmp_path, str(path), "--channels", "vessels=FITC,nuclei=DAPI,target=Cy3")
    entry = store.slides[0]
    assert [entry["channels"][r]["channel"] for r in store.roles] == ["FITC", "DAPI", "Cy3"]
    assert len(store) > 0
    raw = tifffile.imread(path)  # (3, H, W): DAPI, FITC, Cy3
    _, y, x = store.coords[0]
    lo, hi = entry["normalisation"]["low"][0], entry["normalisation"]["high"][0]
    want = np.rint(np.clip((raw[1, y : y + 256, x : x + 256] - lo) / (hi - lo), 0, 1) * 255)
    assert np.abs(np.asarray(store.images[0, 0]).astype(int) - want).max() <= 1  # vessels = FITC


def test_minerva_pyramid_by_index(tmp_path):
    path = fixture("fluorescence/minerva_2048x2048_ome6_tiled.ome.tif")
    with open_file(path) as s:
        assert [lv.shape for lv in s.levels] == [(3, 2048, 2048), (3, 1024, 1024)]
        assert s.dtype == np.uint16  # big-endian file, native values
        raw = tifffile.imread(path, level=1)
        np.testing.assert_array_equal(s.read_region(1, 100, 200, 64, 80), raw[:, 100:164, 200:280])
    store = _tile(tmp_path, str(path), "--channels", "vessels=0,nuclei=1,target=2", "--min-tissue", "0")
    assert len(store) == 121  # 11 × 11 grid positions at stride 192


def test_svs_rgb_roles(tmp_path):
    path = fixture("wsi/CMU-1-Small-Region.svs")
    store = _tile(tmp_path, str(path), "--channels", "vessels=R,nuclei=B", "--min-tissue", "0")
    entry = store.slides[0]
    assert store.roles == ["vessels", "nuclei"]
    assert entry["channels"]["vessels"]["index"] == 0 and entry["channels"]["nuclei"]["index"] == 2
    assert entry["mpp"] == pytest.approx(0.499)


def test_z_axis_refused_unless_plane_chosen(tmp_path):
    path = fixture("fluorescence/ome_multi-channel-z-series.ome.tif")
    res = run_cli(
        "tile", str(path), "--channels", "vessels=0,nuclei=1", "--out", str(tmp_path / "z.zarr"), "--patch-size", "64", "--overlap", "0"
    )
    assert res.returncode == 2 and "Z axis" in res.stderr and "--plane Z=" in res.stderr
    out = tmp_path / "z2.zarr"
    res = run_cli(
        "tile",
        str(path),
        "--channels",
        "vessels=0,nuclei=1",
        "--plane",
        "Z=2",
        "--out",
        str(out),
        "--patch-size",
        "64",
        "--overlap",
        "0",
        "--min-tissue",
        "0",
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    store = PatchStore.open(out)
    assert store.images.dtype == np.uint8 and len(store) > 0


def test_measured_np_channel_does_not_change_the_patches_of_a_real_image():
    """On a real fluorescence image the NP channel used to change the tissue mask (and so which patches
    `predict` sampled); the mask now comes from CD31 and DAPI alone."""
    from wsi_damm.slides import parse_channel_map, specs_from_paths
    from wsi_damm.tiling.plan import TileConfig, plan_slide

    path = fixture("fluorescence/pathml_small_vectra.qptiff")
    (spec,) = specs_from_paths([path], parse_channel_map("vessels=FITC,nuclei=DAPI,target=Cy3"))
    cfg = TileConfig(patch_size=64, overlap=16)
    with_np, inputs_only = plan_slide(spec, cfg), plan_slide(spec.without("target"), cfg)
    assert len(with_np.ys) > 0
    np.testing.assert_array_equal(with_np.mask, inputs_only.mask)
    np.testing.assert_array_equal(np.stack([with_np.ys, with_np.xs]), np.stack([inputs_only.ys, inputs_only.xs]))
