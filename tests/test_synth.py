"""The simulator: deterministic, described, causal, and independent of its rendering tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from wsi_damm.slides import open_file
from wsi_damm.workflows.synth import SIMULATOR_VERSION, SynthConfig, make_layout, render_window, simulator_version, write_slides


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
    # every image says which simulator wrote it (the yardstick's version), and so does the config beside them
    for path in (small, small.parent / "truth" / "synth_000.np_clean.ome.tif", small.parent / "truth" / "synth_000.divergence.ome.tif"):
        assert simulator_version(path) == SIMULATOR_VERSION
    assert json.loads((small.parent / "truth" / "synth_config.json").read_text())["simulator_version"] == SIMULATOR_VERSION


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
    cfg = SynthConfig(size=1024, seed=4)
    lay = make_layout(cfg, 0)
    big = render_window(cfg, lay, 0, 0, 0, 1024, 1024)
    part = render_window(cfg, lay, 0, 200, 300, 400, 500)
    inner = (slice(264, 536), slice(364, 736))  # ≥ MARGIN inside the small window
    for name in ("CD31", "DAPI", "NP"):
        np.testing.assert_allclose(part[name][64:-64, 64:-64], big[name][inner], rtol=1e-5, atol=1e-3)
