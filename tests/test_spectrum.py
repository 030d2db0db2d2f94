"""NRMSE and spectral fidelity, streamed, against numpy on in-memory arrays and against Parseval's theorem."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage

from wsi_damm.evaluation.metrics import whole_slide_metrics
from wsi_damm.evaluation.spectrum import BANDS, WINDOW, spectral_fidelity, spectrum_sums, window_power


def _tiles(x: np.ndarray, w: int) -> np.ndarray:
    ny, nx = x.shape[0] // w, x.shape[1] // w
    return x[: ny * w, : nx * w].reshape(ny, w, nx, w).swapaxes(1, 2).reshape(-1, w, w)


def test_white_noise_has_the_power_parseval_gives_in_every_band():
    """A periodogram of unit-variance white noise tapered by w has expected power Σw² in every bin."""
    noise = np.random.default_rng(0).normal(size=(256, WINDOW, WINDOW))
    ratio = window_power(noise).mean(0) / (np.hanning(WINDOW) ** 2).sum() ** 2
    # the lowest band holds few bins and feels the removed mean; the others average thousands of bins
    assert abs(ratio[0] - 1) < 0.1 and np.allclose(ratio[1:], 1, atol=0.03), ratio


def test_streamed_sums_equal_numpy_over_the_same_windows_with_and_without_a_mask():
    rng = np.random.default_rng(1)
    a, b = rng.random((1100, 1300)), ndimage.gaussian_filter(rng.random((1100, 1300)), 2)
    mask = np.zeros(a.shape, bool)
    mask[100:900, 200:1250] = True
    for m in (None, mask):
        got = spectrum_sums(da.from_array(a, chunks=333), da.from_array(b, chunks=333), None if m is None else da.from_array(m)).compute()
        # the streamed windows sit on a grid of whole windows inside blocks of 1792 px (7 windows): here the first
        ta, tb = _tiles(a, WINDOW), _tiles(b, WINDOW)
        keep = np.ones(len(ta), bool) if m is None else _tiles(m.astype(float), WINDOW).mean(axis=(1, 2)) >= 0.9
        assert got[2, 0] == keep.sum() > 0
        assert np.allclose(got[0], window_power(ta[keep]).sum(0)) and np.allclose(got[1], window_power(tb[keep]).sum(0))


def test_a_map_shows_its_texture_against_the_measured_one():
    rng = np.random.default_rng(2)
    measured = ndimage.gaussian_filter(rng.random((1024, 1024)), 1.0)
    same = spectral_fidelity(spectrum_sums(da.from_array(measured), da.from_array(measured)).compute())
    assert same["spectral_error"] == 0 and all(b["log10_power_ratio"] == 0 for b in same["spectral_bands"])
    smooth = spectral_fidelity(spectrum_sums(da.from_array(ndimage.gaussian_filter(measured, 4)), da.from_array(measured)).compute())
    ratios = [b["log10_power_ratio"] for b in smooth["spectral_bands"]]
    assert ratios[-1] < -1 and ratios[0] > -0.1 and smooth["spectral_error"] > 0.3  # too smooth: power lost at high frequency
    noisy = measured + rng.normal(0, 0.2, measured.shape)
    loud = spectral_fidelity(spectrum_sums(da.from_array(noisy), da.from_array(measured)).compute())
    assert loud["spectral_bands"][-1]["log10_power_ratio"] > 0.5  # too noisy: power gained at high frequency
    assert len(loud["spectral_bands"]) == BANDS and loud["spectral_windows"] == 16


def test_nrmse_is_the_rmse_over_the_measured_spread():
    rng = np.random.default_rng(3)
    b = rng.random((600, 700)) ** 3
    a = np.clip(b + rng.normal(0, 0.1, b.shape), 0, 1)
    mask = np.zeros(b.shape, bool)
    mask[50:500, 100:650] = True
    got = whole_slide_metrics(da.from_array(a, chunks=256), da.from_array(b, chunks=256), da.from_array(mask, chunks=256))
    assert got["nrmse"] == pytest.approx(np.sqrt(np.mean((a - b) ** 2)) / b.std(), rel=1e-9)
    assert got["nrmse_tissue"] == pytest.approx(np.sqrt(np.mean((a[mask] - b[mask]) ** 2)) / b[mask].std(), rel=1e-9)
    flat = whole_slide_metrics(da.from_array(np.full(b.shape, b.mean())), da.from_array(b))
    assert flat["nrmse"] == pytest.approx(1.0, rel=1e-9)
    assert math.isnan(whole_slide_metrics(da.from_array(a), da.from_array(np.full(b.shape, 0.5)))["nrmse"])
