"""Tiling: stored patches equal the slide regions they claim (re-read independently), the grid, level choice, options."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import given
from hypothesis import strategies as st

from wsi_damm.slides import open_file
from wsi_damm.tiling.grid import choose_level, grid_positions, read_scaled, tissue_fractions
from wsi_damm.tiling.store import PatchStore
from wsi_damm.util.errors import InputError

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
    # on a latent canvas 4× smaller every origin is a multiple of 4: the last one as near the border as that allows
    assert grid_positions(1001, 256, 192, align=4).tolist() == [0, 192, 384, 576, 744]
    assert grid_positions(1003, 256, 192, align=4).tolist() == [0, 192, 384, 576, 744]
    assert grid_positions(1004, 256, 192, align=4).tolist() == [0, 192, 384, 576, 748]
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


@given(length=st.integers(1, 3000), patch=st.integers(1, 300), overlap_frac=st.floats(0, 0.9))
def test_grid_covers_every_pixel_and_stays_inside(length, patch, overlap_frac):
    overlap = min(patch - 1, int(patch * overlap_frac))
    pos = grid_positions(length, patch, patch - overlap)
    if length < patch:
        assert len(pos) == 0
        return
    covered = np.zeros(length, bool)
    for p in pos:
        covered[p : p + patch] = True
    assert covered.all() and pos[0] == 0 and pos[-1] == length - patch
    assert (np.diff(pos) > 0).all() and (np.diff(pos) <= patch - overlap).all()


def test_mpp_picks_a_level_or_resamples(small):
    with open_file(small) as s:
        c = choose_level(s, mpp=1.02)  # level 1 is 1.0 µm/px: within 5 %
        assert (c.level, c.factor) == (1, 1.0)
        c = choose_level(s, mpp=1.5)  # between levels: read level 1, shrink by 1.5
        assert c.level == 1 and c.factor == pytest.approx(1.5) and c.shape == (341, 341)
        region = read_scaled(s, c, 100, 100, 50, 60)
        lvl1 = s.read_region(1, 0, 0, 512, 512).astype(float)
        # independent check: a pixel is a local average of the finer level around its centre
        y, x = 120, 130
        cy, cx = (y + 0.5) * 1.5 - 0.5, (x + 0.5) * 1.5 - 0.5
        window = lvl1[:, int(cy) - 1 : int(cy) + 3, int(cx) - 1 : int(cx) + 3].mean(axis=(1, 2))
        assert np.all(np.abs(region[:, y - 100, x - 100] - window) <= 0.25 * window + 20)
        c = choose_level(s, mpp=2.0)  # the pyramid stops at 1 µm/px: integer shrink = block mean
        assert (c.level, c.factor, c.shape) == (1, 2.0, (256, 256))
        want = np.rint(lvl1[:, 40:80, 60:100].reshape(3, 20, 2, 20, 2).mean(axis=(2, 4)))
        np.testing.assert_array_equal(read_scaled(s, c, 20, 30, 20, 20), want)
        with pytest.raises(InputError, match="upsampling"):
            choose_level(s, mpp=0.25)


def test_processes_scheduler_gives_the_same_store(small, tmp_path):
    digests = []
    for sched in ("threads", "processes"):
        out = tmp_path / f"{sched}.zarr"
        res = run_cli(
            "tile",
            str(small),
            "--out",
            str(out),
            "--patch-size",
            "128",
            "--overlap",
            "32",
            "--shard-patches",
            "8",
            "--scheduler",
            sched,
            "--workers",
            "2",
            "--quiet",
        )
        assert res.returncode == 0, res.stderr
        digests.append(hashlib.sha256(np.asarray(PatchStore.open(out).images[:]).tobytes()).hexdigest())
    assert digests[0] == digests[1]


def test_bad_options_exit_2(small, tmp_path):
    for args, text in (
        (["--patch-size", "0"], "--patch-size"),
        (["--overlap", "256"], "--overlap"),
        (["--min-tissue", "2"], "--min-tissue"),
    ):
        res = run_cli("tile", str(small), "--out", str(tmp_path / "x.zarr"), *args)
        assert res.returncode == 2 and text in res.stderr, res.stderr
        assert not (tmp_path / "x.zarr").exists()


def test_tissue_mask_reads_the_inputs_only(small):
    """CD31 and DAPI decide where tissue is; the measured NP channel (present or not, bright or blank) does not."""
    from wsi_damm.slides import specs_from_paths
    from wsi_damm.tiling.plan import TileConfig, plan_slide

    (spec,) = specs_from_paths([small], {})
    cfg = TileConfig(patch_size=64, overlap=16)
    with_np, without_np = plan_slide(spec, cfg), plan_slide(spec.without("target"), cfg)
    np.testing.assert_array_equal(with_np.mask, without_np.mask)
    np.testing.assert_array_equal(with_np.ys, without_np.ys)
    np.testing.assert_array_equal(with_np.xs, without_np.xs)
    assert with_np.lo[:2] == without_np.lo and with_np.hi[:2] == without_np.hi  # input normalisation unchanged
    assert spec.mask_channels == [0, 1] and spec.without("vessels").without("nuclei").mask_channels == [0]


def test_the_store_records_its_slides_by_absolute_path(small, tmp_path, monkeypatch):
    """Tiled with a path relative to the working directory, the store still finds its slide from elsewhere (what
    `calibrate` and the retile hint read)."""
    from click.testing import CliRunner

    from wsi_damm_cli.main import cli

    monkeypatch.chdir(small.parent)
    res = CliRunner().invoke(cli, ["tile", small.name, "--out", str(tmp_path / "s.zarr"), "--patch-size", "128", "--quiet"])
    assert res.exit_code == 0, res.output
    monkeypatch.chdir(tmp_path)
    [entry] = zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs["slides"]
    path = Path(entry["channels"]["vessels"]["path"])
    assert path.is_absolute() and path.samefile(small)
