"""SSIM / PSNR against scikit-image, in memory and streamed through dask with small chunks."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from wsi_damm.metrics import psnr, ssim, whole_slide_metrics


def _sk_ssim(a, b):
    return structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def _pairs():
    rng = np.random.default_rng(0)
    a = rng.random((1000, 1357))
    yield "random", a, np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    yy, xx = np.mgrid[0:1000, 0:1357] / 100.0
    s = 0.5 + 0.4 * np.sin(yy) * np.cos(1.3 * xx)
    s[300:400, 200:900] = 0.9  # edges
    yield "structured", s, np.clip(s + 0.05 * np.sin(7 * xx) + rng.normal(0, 0.02, s.shape), 0, 1)


@pytest.mark.parametrize("name,a,b", list(_pairs()), ids=["random", "structured"])
def test_ssim_and_psnr_equal_scikit_image(name, a, b):
    want_ssim, want_psnr = _sk_ssim(a, b), peak_signal_noise_ratio(a, b, data_range=1.0)
    assert ssim(a, b) == pytest.approx(want_ssim, abs=1e-4)
    assert psnr(a, b) == pytest.approx(want_psnr, abs=1e-9)
    streamed = whole_slide_metrics(da.from_array(a, chunks=(256, 300)), da.from_array(b, chunks=(256, 300)))
    assert streamed["ssim"] == pytest.approx(want_ssim, abs=1e-4)
    assert streamed["psnr"] == pytest.approx(want_psnr, abs=1e-9)


def test_identical_images_give_ssim_one_and_infinite_psnr():
    a = np.random.default_rng(1).random((64, 80))
    assert ssim(a, a) == pytest.approx(1.0)
    assert psnr(a, a) == math.inf
    m = whole_slide_metrics(da.from_array(a, chunks=32), da.from_array(a, chunks=32))
    assert m["psnr"] == math.inf and m["ssim"] == pytest.approx(1.0)


def test_masked_metrics_use_only_mask_pixels():
    rng = np.random.default_rng(2)
    a = rng.random((200, 220))
    b = a.copy()
    b[:, 110:] = rng.random((200, 110))  # right half is wrong
    mask = np.zeros_like(a, bool)
    mask[:, :100] = True
    m = whole_slide_metrics(da.from_array(a, chunks=64), da.from_array(b, chunks=64), da.from_array(mask, chunks=64))
    assert m["mse_tissue"] == 0 and m["psnr_tissue"] == math.inf and m["ssim_tissue"] == pytest.approx(1.0)
    assert m["pixels_tissue"] == mask.sum()
    smap_mean = _sk_ssim(a, b)
    assert m["ssim"] == pytest.approx(smap_mean, abs=1e-4)
