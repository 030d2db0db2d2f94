"""The draws' interval and the checks of their spread, on toys whose draws come from a known distribution:
an honest toy covers at its nominal level, an overconfident or underconfident one is called so."""

from __future__ import annotations

import json
import math

import dask.array as da
import numpy as np
import pytest
import tifffile
import torch

from wsi_damm.evaluation.intervals import calibration_check, coverage, expected_rmse, spread_error
from wsi_damm.sampling.draws import draw_stats, draws_for, interval_rank, nominal_level

from .conftest import predict_store, second_slide


def test_interval_rank_is_the_largest_order_statistic_that_reaches_the_level():
    for k in range(2, 40):
        assert nominal_level(k, 1) == pytest.approx((k - 1) / (k + 1))
        for level in np.linspace(0.05, 0.95, 19):
            j = interval_rank(k, level)
            reaching = [i for i in range(1, (k + 1) // 2 + 1) if nominal_level(k, i) >= level - 1e-12]
            assert j == (max(reaching) if reaching else 1), (k, level)
    for level in (0.5, 0.6, 0.8, 0.9, 0.95):  # the fewest draws whose range reaches the level, by brute force
        assert draws_for(level) == min(k for k in range(2, 100) if nominal_level(k, 1) >= level - 1e-12)


def test_draw_stats_are_the_order_statistics_of_the_draws():
    g = torch.Generator().manual_seed(0)
    k, b = 9, 3
    img = torch.rand(k * b, 1, 8, 8, generator=g) * 2 - 1  # draw-major, as the sampler returns them
    got = draw_stats(img, k, 0.6)  # j = 2 of 9 draws: nominal 0.6
    draws = ((img.numpy() + 1) / 2).reshape(k, b, 1, 8, 8)
    ordered = np.sort(draws, 0)
    np.testing.assert_allclose(got["pred"], draws.mean(0), atol=1e-6)
    np.testing.assert_allclose(got["pred_sd"], draws.std(0), atol=1e-6)
    np.testing.assert_array_equal(got["pred_lo"], ordered[1])
    np.testing.assert_array_equal(got["pred_hi"], ordered[k - 2])
    assert set(draw_stats(img[:b], 1)) == {"pred"}  # one draw: no spread, no interval


def _toy(k: int, scale: float, n: int = 40_000, seed: int = 0):
    """Measured values and K draws per pixel from N(μ, σ²) (σ varying over pixels); the draws' sd is `scale` × σ."""
    rng = np.random.default_rng(seed)
    mu, sigma = rng.uniform(0.3, 0.7, n), rng.uniform(0.01, 0.1, n)
    measured = rng.normal(mu, sigma)
    draws = rng.normal(mu, scale * sigma, (k, n))
    return measured, draws


@pytest.mark.parametrize("k, level", [(9, 0.8), (19, 0.8), (4, 0.8)])
def test_an_honest_toy_covers_at_its_nominal_level(k, level):
    measured, draws = _toy(k, 1.0)
    j = interval_rank(k, level)
    ordered = np.sort(draws, 0)
    lo, hi, meas = (da.from_array(a, chunks=10_000) for a in (ordered[j - 1], ordered[k - j], measured))
    got = coverage(lo, hi, meas, da.ones(len(measured), dtype=bool, chunks=10_000))
    nominal = nominal_level(k, j)
    se = math.sqrt(nominal * (1 - nominal) / len(measured))
    assert abs(got["coverage"] - nominal) < 4 * se, (got, nominal)
    assert got["below"] + got["above"] == pytest.approx(1 - got["coverage"])
    assert abs(got["below"] - got["above"]) < 8 * se  # symmetric toy: as many misses on each side
    assert calibration_check(got["coverage"], nominal) is None


@pytest.mark.parametrize("scale, word", [(0.3, "overconfident"), (3.0, "underconfident")])
def test_a_dishonest_toy_is_called_so(scale, word):
    measured, draws = _toy(9, scale)
    ordered = np.sort(draws, 0)
    lo, hi, meas = (da.from_array(a, chunks=10_000) for a in (ordered[0], ordered[-1], measured))
    got = coverage(lo, hi, meas, da.ones(len(measured), dtype=bool, chunks=10_000))
    assert word in calibration_check(got["coverage"], nominal_level(9, 1))


def test_spread_against_error_and_reliability_on_toy_patches():
    """Patches of 256 pixels whose σ varies: an honest spread ranks the errors (Spearman, checked by hand) and its
    expected RMSE, sd·√((K+1)/(K−1)), matches the observed RMSE bin by bin; an overconfident one is three times off."""
    rng = np.random.default_rng(1)
    k, patches, px = 4, 400, 256
    sigma = rng.uniform(0.01, 0.2, patches)[:, None]
    for scale, ratio in ((1.0, 1.0), (1 / 3, 3.0)):
        measured = rng.normal(0.5, sigma, (patches, px))
        draws = rng.normal(0.5, scale * sigma, (k, patches, px))
        spread = np.sqrt((draws.std(0) ** 2).mean(1))  # RMS of the population sd over the patch, as evaluate computes it
        rmse = np.sqrt(((draws.mean(0) - measured) ** 2).mean(1))
        got = spread_error(spread, rmse, k)
        ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731 (no ties in continuous toys)
        assert got["spearman"] == pytest.approx(np.corrcoef(ranks(spread), ranks(rmse))[0, 1], abs=1e-12)
        assert got["spearman"] > 0.8
        assert sum(b["patches"] for b in got["bins"]) == patches
        for b in got["bins"]:
            assert b["observed_rmse"] / b["expected_rmse"] == pytest.approx(ratio, rel=0.15), (scale, b)
        np.testing.assert_allclose(expected_rmse([2.0], 3), [2.0 * math.sqrt(2)])


def test_evaluate_checks_the_interval_of_a_predicted_map(tiny_run, synth_dir, tmp_path):
    """predict --samples 3, then evaluate: coverage and the patches' spread recomputed by brute force from the
    map's channels and the measured channel as evaluate normalises it."""
    from wsi_damm.evaluation.viewer import layer_sources
    from wsi_damm.stages.evaluate import evaluate_slide
    from wsi_damm.stages.export import export_for_qupath
    from wsi_damm.tiling.inputs import resolve_slides

    predict_store(tiny_run, second_slide(synth_dir), tmp_path / "k.zarr", "--samples", "3")
    [spec] = resolve_slides([second_slide(synth_dir)])
    ev = evaluate_slide(tmp_path / "k.ome.zarr", spec, None, True, False)
    u = ev.result["uncertainty"]
    assert (u["draws"], u["rank"], u["nominal"]) == (3, 1, 0.5)
    h, w = ev.truth.shape
    values = np.asarray(ev.map.level0[:, :h, :w]).astype(np.float64)
    meas = ev.truth.normalised("target", 0, 0, h, w)
    where = ev.map.covered(0, 0, h, w) & ev.truth.tissue(0, 0, h, w)
    inside = (meas >= values[2]) & (meas <= values[3])
    assert u["pixels"] == int(where.sum()) > 0
    assert u["coverage"] == pytest.approx(inside[where].mean(), abs=1e-12)
    assert ((values[2] <= values[0] + 1e-3) & (values[0] <= values[3] + 1e-3)).all()  # the mean lies inside the range
    row = ev.rows[0]
    p = ev.map.patch_size
    sl = np.s_[row["y"] : row["y"] + p, row["x"] : row["x"] + p]
    assert row["spread"] == pytest.approx(np.sqrt((values[1][sl] ** 2).mean()), rel=1e-9)
    assert row["rmse"] == pytest.approx(np.sqrt(((values[0][sl] - meas[sl]) ** 2).mean()), rel=1e-9)
    assert u["spread_error"]["patches"] == len(ev.rows)
    json.dumps(u)  # what metrics.json holds

    # the viewer's and the export's "outside the interval" layer, against the same brute force
    side = np.where(meas > values[3], 1.0, np.where(meas < values[2], -1.0, 0.0))
    full = ev.map.covered(0, 0, h, w)
    shown = layer_sources(ev.map, ev.truth)["outside"].region(1.0, 0, 0, h, w)
    np.testing.assert_array_equal(shown[full], side[full])
    written = export_for_qupath(tmp_path / "k.ome.zarr", spec, tmp_path / "export")
    assert written["channels"][-3:] == ["NP interval low", "NP interval high", "NP outside interval"]
    exported = tifffile.imread(written["tiff"], level=0)
    np.testing.assert_array_equal(exported[-1][full], side[full])
    np.testing.assert_array_equal(exported[-3][full], values[2][full].astype(np.float32))
