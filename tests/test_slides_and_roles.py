"""Readers, roles, manifests, level choice and the simulator, on small generated files."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tifffile

from wsi_damm.errors import InputError
from wsi_damm.slides import open_file, parse_channel_map, specs_from_manifest, specs_from_paths
from wsi_damm.store import PatchStore
from wsi_damm.synth import SynthConfig, make_layout, write_slides
from wsi_damm.tiling import choose_level, read_scaled

from .conftest import run_cli


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    write_slides(out, 1, SynthConfig(size=1024, seed=7), progress=False)
    return out / "synth_000.ome.tif"


def test_synth_is_deterministic_and_described(small, tmp_path):
    write_slides(tmp_path, 1, SynthConfig(size=1024, seed=7), progress=False)
    a, b = tifffile.imread(small), tifffile.imread(tmp_path / "synth_000.ome.tif")
    np.testing.assert_array_equal(a, b)
    with tifffile.TiffFile(small) as tif:
        assert tif.is_ome and tif.series[0].axes == "CYX" and len(tif.series[0].levels) >= 2
        assert a.dtype == np.uint16
    with open_file(small) as s:
        assert s.channel_names == ["CD31", "DAPI", "NP"] and s.mpp == pytest.approx(0.5)
    assert (small.parent / "truth" / "synth_000.np_clean.ome.tif").exists()
    assert (small.parent / "synth_000.preview.png").read_bytes()[:4] == b"\x89PNG"


def test_synth_np_follows_leaky_vessels_and_density():
    """NP field is causal: high next to leaky vessels, spreading less where cells are dense."""
    lay = make_layout(SynthConfig(size=2048, seed=2), 0)
    tissue = lay.tissue > 0.5
    dense, sparse = tissue & (lay.density > 0.8), tissue & (lay.density < 0.2)
    assert dense.sum() > 100 and sparse.sum() > 100
    # far from vessels NP is lower in dense tissue: compare the 30th percentiles
    assert np.percentile(lay.np_field[dense], 30) < np.percentile(lay.np_field[sparse], 30)
    assert 0.05 < lay.divergent[tissue].mean() < 0.6


def test_tiling_is_independent_of_tile_size_in_the_simulator():
    from wsi_damm.synth import render_window

    cfg = SynthConfig(size=1024, seed=4)
    lay = make_layout(cfg, 0)
    big = render_window(cfg, lay, 0, 0, 0, 1024, 1024)
    part = render_window(cfg, lay, 0, 200, 300, 400, 500)
    inner = (slice(264, 536), slice(364, 736))  # ≥ MARGIN inside the small window
    for name in ("CD31", "DAPI", "NP"):
        np.testing.assert_allclose(part[name][64:-64, 64:-64], big[name][inner], rtol=1e-5, atol=1e-3)


def test_channel_map_parsing_and_errors():
    assert parse_channel_map("vessels=CD31, nuclei=1,target=R") == {"vessels": "CD31", "nuclei": "1", "target": "R"}
    with pytest.raises(InputError, match="unknown role"):
        parse_channel_map("vesels=CD31")
    with pytest.raises(InputError, match="given twice"):
        parse_channel_map("vessels=0,vessels=1")


def test_role_errors_list_the_channels(small):
    with pytest.raises(InputError, match="channels are: CD31, DAPI, NP"):
        specs_from_paths([small], {"vessels": "PECAM"})
    with pytest.raises(InputError, match="both point to channel"):
        specs_from_paths([small], {"vessels": "0", "nuclei": "CD31"})
    with pytest.raises(InputError, match="missing role"):
        specs_from_paths([small], {"nuclei": "DAPI"})


def _write_single(path, plane, mpp=0.5):
    tifffile.imwrite(path, plane, tile=(128, 128), compression="zlib", photometric="minisblack",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")


def test_manifest_assembles_per_channel_files(small, tmp_path):
    full = tifffile.imread(small)
    for i, name in enumerate(("cd31", "dapi", "np")):
        _write_single(tmp_path / f"s_{name}.tif", full[i])
    (tmp_path / "m.csv").write_text("slide_id,vessels,nuclei,target\nS1,s_cd31.tif,s_dapi.tif,s_np.tif\n")
    specs = specs_from_manifest(tmp_path / "m.csv")
    with specs[0].open() as s:
        assert s.channel_names == ["vessels", "nuclei", "target"] and s.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(s.read_region(0, 10, 20, 30, 40), full[:, 10:40, 20:60])
    out = tmp_path / "st.zarr"
    res = run_cli("tile", "--manifest", str(tmp_path / "m.csv"), "--out", str(out), "--patch-size", "128", "--overlap", "32", "--quiet")
    assert res.returncode == 0, res.stderr
    assert PatchStore.open(out).slides[0]["slide_id"] == "S1"


def test_manifest_with_mismatched_shapes_is_refused(small, tmp_path):
    full = tifffile.imread(small)
    _write_single(tmp_path / "a.tif", full[0])
    _write_single(tmp_path / "b.tif", full[1, :1000, :1000])
    (tmp_path / "m.csv").write_text("slide_id,vessels,nuclei\nS1,a.tif,b.tif\n")
    res = run_cli("tile", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o.zarr"))
    assert res.returncode == 2 and "b.tif" in res.stderr and "same height and width" in res.stderr
    assert not (tmp_path / "o.zarr").exists()


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
        res = run_cli("tile", str(small), "--out", str(out), "--patch-size", "128", "--overlap", "32",
                      "--shard-patches", "8", "--scheduler", sched, "--workers", "2", "--quiet")
        assert res.returncode == 0, res.stderr
        digests.append(hashlib.sha256(np.asarray(PatchStore.open(out).images[:]).tobytes()).hexdigest())
    assert digests[0] == digests[1]


def test_bad_options_exit_2(small, tmp_path):
    for args, text in ((["--patch-size", "0"], "--patch-size"), (["--overlap", "256"], "--overlap"), (["--min-tissue", "2"], "--min-tissue")):
        res = run_cli("tile", str(small), "--out", str(tmp_path / "x.zarr"), *args)
        assert res.returncode == 2 and text in res.stderr, res.stderr
        assert not (tmp_path / "x.zarr").exists()
