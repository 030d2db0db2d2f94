"""The simulator: deterministic, described, causal, and independent of its rendering tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from wsi_damm.slides import open_file
from wsi_damm.workflows.simulator import SIMULATOR_VERSION, SynthConfig, make_layout, render_window
from wsi_damm.workflows.synth import simulator_version, write_slides


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


@pytest.mark.parametrize("density, length_um", [(1.0, 8.0), (0.0, 60.0)])
def test_np_spreads_from_a_point_as_a_gaussian_of_the_penetration_length(density, length_um):
    """Closed form: one point source in uniform density spreads as the normalised Gaussian of that density's
    penetration length (8 µm dense, 60 µm sparse) — the physics `fov_bound` relies on, linear in the sources."""
    from wsi_damm.workflows.simulator import np_spread

    cfg, c, n = SynthConfig(), 4, 257
    src = np.zeros((n, n))
    src[n // 2, n // 2] = 1.0
    field = np_spread(cfg, c, src, np.full((n, n), density))
    sigma = length_um / (c * cfg.mpp)  # coarse px
    r2 = (np.arange(n) - n // 2)[:, None] ** 2 + (np.arange(n) - n // 2)[None, :] ** 2
    expected = np.exp(-r2 / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    near = r2 < (3.5 * sigma) ** 2  # scipy truncates its Gaussians at 4 σ
    np.testing.assert_allclose(field[near], expected[near], rtol=0.02, atol=1e-4 * expected.max())
    assert field.sum() == pytest.approx(1.0, abs=1e-3)  # what leaks out stays in the tissue
    other = np.zeros((n, n))
    other[n // 2 + 5, n // 2 - 9] = 0.5
    other_field = np_spread(cfg, c, other, np.full((n, n), density))
    # linear: two sources give the sum of their fields
    np.testing.assert_allclose(np_spread(cfg, c, src + other, np.full((n, n), density)), field + other_field, rtol=1e-9, atol=1e-15)


def test_coarse_fields_are_read_as_bilinear_interpolation_of_the_whole_grid():
    """`_sample` reads only the coarse pixels a window needs; brute-force reference: map_coordinates on the whole grid."""
    from scipy import ndimage

    from wsi_damm.workflows.simulator import _sample

    field = np.random.default_rng(0).random((64, 80))
    for c in (4, 8):
        for y0, x0, h, w in ((0, 0, 40, 50), (37, 101, 97, 33), (c * 64 - 30, c * 80 - 20, 30, 20), (5, 3, c * 64 - 5, c * 80 - 3)):
            ys = (np.arange(y0, y0 + h) + 0.5) / c - 0.5
            xs = (np.arange(x0, x0 + w) + 0.5) / c - 0.5
            expected = ndimage.map_coordinates(field, np.meshgrid(ys, xs, indexing="ij"), order=1, mode="nearest")
            np.testing.assert_allclose(_sample(field, c, y0, x0, h, w), expected, rtol=0, atol=1e-12)


def test_version_2_renders_the_np_slides_of_version_1():
    """Version 2 adds the perfusion target only: a window of NP slides sums as version 1's code summed it (its
    figures recorded from version 1, commit 8b1feed)."""
    cfg = SynthConfig(size=1024, seed=4)
    w = render_window(cfg, make_layout(cfg, 0), 0, 100, 200, 300, 260)
    version_1 = {
        "CD31": (29535174.578485124, 11944862423.511398),
        "DAPI": (88391723.2962577, 263605610353.44824),
        "NP": (43338079.313968465, 32511843923.070774),
    }
    for name, (total, squares) in version_1.items():
        assert float(w[name].sum()) == pytest.approx(total, rel=1e-9)
        assert float((w[name] ** 2).sum()) == pytest.approx(squares, rel=1e-9)


def test_the_perfusion_target_is_sparse_and_fills_only_perfused_lumens(tmp_path):
    """`target="perfusion"`: the third channel is a tracer in the lumens of vessels that carry flow (leakiness under
    PERFUSION_LEAK_LIMIT), by that flow; a few per cent of the pixels after the slide's own percentile normalisation."""
    from wsi_damm.workflows.simulator import PERFUSION_LEAK_LIMIT

    cfg = SynthConfig(size=1024, seed=5, target="perfusion")
    [paths] = write_slides(tmp_path, 1, cfg, progress=False)
    with open_file(paths["slide"]) as s:
        assert s.channel_names == ["CD31", "DAPI", "Perfusion"]
    assert paths["clean"].name == "synth_000.perfusion_clean.ome.tif" and simulator_version(paths["clean"]) == SIMULATOR_VERSION
    target = tifffile.imread(paths["slide"])[2].astype(float)
    lo, hi = np.percentile(target, [0.5, 99.8])
    norm = np.clip((target - lo) / (hi - lo), 0, 1)
    assert 0.002 < (norm > 0.25).mean() < 0.10 and np.median(norm) < 0.05
    # the expected signal: background where no perfused lumen is near, brighter only inside lumens
    lay = make_layout(cfg, 0)
    w = render_window(cfg, lay, 0, 0, 0, 1024, 1024)
    background = 100 + 60 * _sample_tissue(lay, 1024)
    tracer = w["Perfusion"] - background
    assert tracer.min() > -1e-6 and (tracer > 1).mean() < 0.1
    assert (lay.leak < PERFUSION_LEAK_LIMIT).any() and (lay.leak >= PERFUSION_LEAK_LIMIT).any()
    with pytest.raises(ValueError, match="target"):
        SynthConfig(target="dense")


def _sample_tissue(lay, size: int) -> np.ndarray:
    from wsi_damm.workflows.simulator import _sample

    return _sample(lay.tissue, lay.c, 0, 0, size, size)
