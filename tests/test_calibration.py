"""Calibration of the draws' spread: the needed stretch by its definition, the streamed quantile against numpy's,
an overconfident toy brought to its nominal coverage on held-out pixels, and the command on a trained run."""

from __future__ import annotations

import json
import math

import dask.array as da
import numpy as np
import pytest

from wsi_damm.evaluation.calibration import ScaleHistogram, needed_scale
from wsi_damm.evaluation.intervals import coverage
from wsi_damm.sampling.draws import widened

from .conftest import run_cli, second_slide


def test_the_needed_stretch_just_holds_the_measured_value():
    rng = np.random.default_rng(0)
    mean = rng.uniform(0.2, 0.8, 5000)
    low, high = mean - rng.uniform(0.01, 0.2, 5000), mean + rng.uniform(0.01, 0.2, 5000)
    measured = rng.uniform(0, 1, 5000)
    s = needed_scale(mean, low, high, measured)
    for k in (s, s * (1 - 1e-6)):  # at s the stretched interval holds the value; any less and it does not
        lo, hi = mean - k * (mean - low), mean + k * (high - mean)
        inside = (measured >= lo - 1e-12) & (measured <= hi + 1e-12)
        assert inside.all() if k is s else not inside[s > 1e-3].any()
    assert needed_scale([0.5], [0.5], [0.5], [0.5])[0] == 0 and math.isinf(needed_scale([0.5], [0.5], [0.5], [0.6])[0])


def test_the_streamed_quantile_matches_numpys_within_a_bin():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.lognormal(0, 1, 200_000), np.zeros(1000), np.full(10, np.inf)])
    hist = ScaleHistogram()
    for part in np.array_split(rng.permutation(values), 7):
        hist.add(part)
    assert hist.n == len(values) and hist.within_one == int((values <= 1).sum())
    for q in (0.5, 0.8, 0.95):
        got = hist.quantile(q)
        assert (values <= got).mean() >= q  # the upper edge of its bin: never under-covers
        assert got == pytest.approx(np.quantile(values, q), rel=0.006)  # one bin is 0.46 % wide
        assert hist.share_within(got) == pytest.approx((values < got).mean(), abs=1e-4)


@pytest.mark.parametrize("scale", [1 / 3, 1.0, 3.0])
def test_a_scale_fitted_on_validation_pixels_brings_held_out_coverage_to_the_nominal_level(scale):
    """Draws from N(μ, (scale·σ)²), measured values from N(μ, σ²): fitted on one set of pixels, the stretch restores
    80 % coverage of 9 draws' range on another; an honest toy needs no stretch."""
    k, n = 9, 40_000
    rng = np.random.default_rng(2)

    def toy():
        mu, sigma = rng.uniform(0.3, 0.7, n), rng.uniform(0.01, 0.05, n)
        draws = rng.normal(mu, scale * sigma, (k, n))
        return {"pred": draws.mean(0), "pred_sd": draws.std(0), "pred_lo": draws.min(0), "pred_hi": draws.max(0)}, rng.normal(mu, sigma)

    fit, measured = toy()
    hist = ScaleHistogram()
    hist.add(needed_scale(fit["pred"], fit["pred_lo"], fit["pred_hi"], measured))
    s = hist.quantile(0.8)
    held, truth = toy()
    after = widened(held, s)
    chunks = 10_000
    ones = da.ones(n, dtype=bool, chunks=chunks)
    got = coverage(*(da.from_array(a, chunks=chunks) for a in (after["pred_lo"], after["pred_hi"], truth)), ones)
    before = coverage(*(da.from_array(a, chunks=chunks) for a in (held["pred_lo"], held["pred_hi"], truth)), ones)
    se = math.sqrt(0.8 * 0.2 / n)
    assert abs(got["coverage"] - 0.8) < 5 * se, (scale, s, before, got)
    if scale == 1.0:
        assert s == pytest.approx(1.0, abs=0.1) and abs(before["coverage"] - 0.8) < 5 * se
    else:
        assert abs(before["coverage"] - 0.8) > 0.1 and (s > 1) == (scale < 1)
    np.testing.assert_allclose(after["pred_sd"], held["pred_sd"] * s)


def test_calibrate_then_predict_calibrated_on_a_trained_run(tiny_run, small_store, synth_dir, tmp_path):
    """The command fits on the run's validation slide and writes calibration.json; predict --calibrated stores the
    draws' bounds stretched by it about the mean, and evaluate reports the coverage before and after."""
    import shutil

    import zarr

    from wsi_damm import api

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    res = run_cli("predict", str(run), second_slide(synth_dir), "--out", str(tmp_path / "p.zarr"), "--samples", "3", "--calibrated")
    assert res.returncode == 2 and "has no calibration.json" in res.stderr and "wsi-damm calibrate" in res.stderr
    fitted = api.calibrate(run, store=small_store, samples=3, steps=4, out=tmp_path / "cal", quiet=True)
    assert json.loads((run / "calibration.json").read_text()) == json.loads(json.dumps(fitted))
    assert fitted["pixels"] > 0 and fitted["coverage_after"] >= fitted["interval"]["nominal"] - 1e-9
    assert [f["part"] for f in fitted["fitted_on"]] == ["whole slide"]  # two slides: the run validated on one of them
    res = run_cli("predict", str(run), second_slide(synth_dir), "--out", str(tmp_path / "p.zarr"), "--samples", "4", "--calibrated")
    assert res.returncode == 2 and "was fitted for 3 draws" in res.stderr

    plain = api.predict(run, second_slide(synth_dir), out=tmp_path / "raw.zarr", steps=4, samples=3, quiet=True)
    cal = api.predict(run, second_slide(synth_dir), out=tmp_path / "cal.zarr", steps=4, samples=3, calibrated=True, quiet=True)
    s = fitted["scale"]
    raw_root, cal_root = (zarr.open_group(str(p.store), mode="r") for p in (plain, cal))
    assert cal_root.attrs["interval"]["scale"] == s and raw_root.attrs["interval"]["scale"] == 1.0
    mean = np.asarray(raw_root["pred"][:]).astype(np.float64)
    np.testing.assert_array_equal(mean, np.asarray(cal_root["pred"][:]).astype(np.float64))  # the same draws
    for name in ("pred_lo", "pred_hi"):
        raw = np.asarray(raw_root[name][:]).astype(np.float64)
        want = mean + s * (raw - mean)
        np.testing.assert_allclose(np.asarray(cal_root[name][:]).astype(np.float64), want, atol=2e-3 * max(1.0, s))
    metrics = api.evaluate(cal.maps, truth=second_slide(synth_dir), out=tmp_path / "rep", viewer=False, quiet=True).metrics
    u = metrics["slides"][0]["uncertainty"]
    raw_u = api.evaluate(plain.maps, truth=second_slide(synth_dir), out=tmp_path / "rep0", viewer=False, quiet=True).metrics
    assert u["scale"] == s and u["before_calibration"]["coverage"] == pytest.approx(raw_u["slides"][0]["uncertainty"]["coverage"], abs=0.01)


def test_a_region_split_calibrates_on_the_part_past_the_cut(tmp_path):
    """The validation region of a one-slide run, as the GeoJSON ROI predict reads: level-0 pixels past the cut."""
    from wsi_damm.slides.annotations import read_regions
    from wsi_damm.stages.calibrate import validation_roi

    entry = {"shape": [100, 200], "downsample": 2.0}  # the store's resolution is half the slide's
    for cut, box in ((("x", 150), (300, 0, 400, 200)), (("y", 40), (0, 80, 400, 200))):
        regions = read_regions(validation_roi(entry, cut, tmp_path / f"{cut[0]}.geojson"), (400, 200))
        assert regions.regions[0].geometry.bounds == box
