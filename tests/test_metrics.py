"""SSIM / PSNR against scikit-image, in memory and streamed through dask with small chunks."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from wsi_damm.evaluation.metrics import psnr, ssim, whole_slide_metrics


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


def _seam_brute(img: np.ndarray, covered: np.ndarray, stride: int) -> np.ndarray:
    sums = np.zeros((2, stride))
    for y in range(img.shape[0]):
        for x in range(img.shape[1]):
            for dy, dx, i in ((1, 0, y), (0, 1, x)):
                if i > 0 and covered[y, x] and covered[y - dy, x - dx]:
                    sums[0, i % stride] += abs(img[y, x] - img[y - dy, x - dx])
                    sums[1, i % stride] += 1
    return sums


def test_seam_sums_equal_brute_force_and_add_up_over_bands():
    from wsi_damm.evaluation.metrics import seam_score, seam_sums

    rng = np.random.default_rng(3)
    img, covered = rng.random((37, 45)), rng.random((37, 45)) > 0.2
    np.testing.assert_allclose(seam_sums(img, covered, 12), _seam_brute(img, covered, 12))
    bands = seam_sums(img[:20], covered[:20], 12) + seam_sums(img[20:], covered[20:], 12, y0=20)
    bands += seam_sums(img[19:21], covered[19:21], 12, y0=19, axes=(0,))  # the pairs across the band edge
    np.testing.assert_allclose(bands, seam_sums(img, covered, 12))
    smooth = np.add.outer(np.arange(96.0), np.arange(96.0)) / 96
    assert seam_score(seam_sums(smooth, np.ones_like(smooth, bool), 24)) == pytest.approx(1.0)
    steps = smooth + (np.arange(96) // 24)[None, :] * 0.5  # a jump at every 24th column
    assert seam_score(seam_sums(steps, np.ones_like(steps, bool), 24)) > 10


def _sparse_pair(rng):
    """A sparse 'measured' channel (bright blobs on a few per cent of the pixels over a dim floor) and a fair
    guess of it: blurred and on a raised floor, as a blurred vessel channel is."""
    from scipy import ndimage

    blobs = ndimage.gaussian_filter((rng.random((300, 340)) < 0.004).astype(float), 2.0) > 0.01
    meas = np.clip(0.02 + rng.normal(0, 0.01, blobs.shape) + 0.8 * blobs, 0, 1)
    return meas, np.clip(0.15 + 0.6 * ndimage.gaussian_filter(meas, 3.0), 0, 1)


def test_pearson_r_means_and_spreads_equal_numpy_streamed_and_masked():
    rng = np.random.default_rng(3)
    meas, pred = _sparse_pair(rng)
    mask = np.zeros(meas.shape, bool)
    mask[40:260, 30:300] = True
    m = whole_slide_metrics(
        da.from_array(pred, chunks=(70, 90)), da.from_array(meas, chunks=(70, 90)), da.from_array(mask, chunks=(70, 90))
    )
    for sfx, a, b in (("", pred, meas), ("_tissue", pred[mask], meas[mask])):
        assert m[f"pearson_r{sfx}"] == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-9)
        assert m[f"mean{sfx}"] == pytest.approx(a.mean(), abs=1e-12) and m[f"mean_measured{sfx}"] == pytest.approx(b.mean(), abs=1e-12)
        assert m[f"sd{sfx}"] == pytest.approx(a.std(), rel=1e-9) and m[f"sd_measured{sfx}"] == pytest.approx(b.std(), rel=1e-9)


def test_map_check_flags_a_black_map_that_ssim_scores_high():
    """On a sparse channel a black map beats a fair blurred guess on SSIM; the check reads r and spread instead."""
    from wsi_damm.evaluation.metrics import map_check

    rng = np.random.default_rng(4)
    meas, guess = _sparse_pair(rng)
    black = np.full_like(meas, 0.02) + rng.normal(0, 1e-4, meas.shape)
    chunks = (100, 100)
    score = lambda p: whole_slide_metrics(da.from_array(p, chunks=chunks), da.from_array(meas, chunks=chunks))  # noqa: E731
    m_black, m_guess = score(black), score(guess)
    assert m_black["ssim"] > m_guess["ssim"]  # the trap this check exists for
    flagged, fair = map_check(m_black, ""), map_check(m_guess, "")
    assert flagged["warning"] and "nearly constant" in flagged["warning"] and "uncorrelated" in flagged["warning"]
    assert flagged["spread_ratio"] < 0.01
    assert fair["warning"] is None and fair["pearson_r"] > 0.5
    shuffled = rng.permutation(guess.ravel()).reshape(guess.shape)  # right spread, no relation
    assert "uncorrelated" in map_check(score(shuffled), "")["warning"]
    constant = np.full_like(meas, 0.3)  # r undefined: flagged, not an error
    assert "nearly constant" in map_check(score(constant), "")["warning"]
