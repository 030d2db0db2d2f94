"""SSIM and PSNR, in memory and out of core, defined exactly as scikit-image defines them.

SSIM (Wang et al. 2004) as `skimage.metrics.structural_similarity(a, b, data_range=R,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`: Gaussian window σ = 1.5
truncated at 3.5σ (11 × 11), K1 = 0.01, K2 = 0.03, population covariance, float64, and the mean
taken after cropping (win − 1)/2 = 5 pixels at every border. Whole-slide SSIM runs on dask with
`map_overlap` (halo 5): every SSIM value inside the crop depends only on real pixels within its
halo, so block-wise sums equal the in-memory mean. PSNR = 10·log10(R² / MSE), ∞ when MSE = 0.
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
from scipy import ndimage

from wsi_damm.evaluation.spectrum import spectral_fidelity, spectrum_sums

SIGMA = 1.5
TRUNCATE = 3.5
RADIUS = int(TRUNCATE * SIGMA + 0.5)  # 5: the filter's half width, the crop and the dask halo
K1, K2 = 0.01, 0.03


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-pixel SSIM (float64) before cropping; edges use scipy's 'reflect' like scikit-image."""
    a = a.astype(np.float64, copy=False)
    b = b.astype(np.float64, copy=False)
    f = lambda x: ndimage.gaussian_filter(x, SIGMA, truncate=TRUNCATE, mode="reflect")  # noqa: E731
    ux, uy = f(a), f(b)
    vx = f(a * a) - ux * ux
    vy = f(b * b) - uy * uy
    vxy = f(a * b) - ux * uy
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM of two 2-D images (border of 5 px excluded), equal to scikit-image's."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if min(a.shape) < 2 * RADIUS + 1:
        raise ValueError(f"images must be at least {2 * RADIUS + 1} px on each side, got {a.shape}")
    s = ssim_map(a, b, data_range)
    return float(s[RADIUS:-RADIUS, RADIUS:-RADIUS].mean())


def psnr_from_mse(mse: float, data_range: float = 1.0) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    return psnr_from_mse(float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)), data_range)


def _block_ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> np.ndarray:
    return ssim_map(a, b, data_range)


def ssim_field(a: da.Array, b: da.Array, data_range: float = 1.0) -> da.Array:
    """Lazy per-pixel SSIM of two 2-D dask arrays, same chunks; values within 5 px of the border are NaN."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    b = b.rechunk(a.chunks)
    s = da.map_overlap(
        _block_ssim, a, b, depth=RADIUS, boundary="none", trim=True, dtype=np.float64, data_range=data_range, align_arrays=False
    )
    h, w = a.shape
    ys = da.arange(h, chunks=a.chunks[0])[:, None]
    xs = da.arange(w, chunks=a.chunks[1])[None, :]
    inside = (ys >= RADIUS) & (ys < h - RADIUS) & (xs >= RADIUS) & (xs < w - RADIUS)
    return da.where(inside, s, np.nan)


MOMENTS = ("a", "b", "aa", "bb", "ab")  # the sums Pearson's r, the means and the spreads are read from


def _moment_sums(a: da.Array, b: da.Array, where: da.Array | None) -> dict[str, da.Array]:
    """Lazy Σa, Σb, Σa², Σb², Σab (over `where` only, if given), each shifted by 0.5 to keep float64 sums exact
    enough for maps in [0, 1] (the shift cancels in every statistic read from them)."""
    a, b = a - 0.5, b - 0.5
    terms = {"a": a, "b": b, "aa": a * a, "bb": b * b, "ab": a * b}
    return {k: (da.where(where, v, 0) if where is not None else v).sum() for k, v in terms.items()}


def agreement(sums: dict[str, float], n: int) -> dict:
    """Pearson's r of a map with the measured channel, and each one's mean and spread (population sd), from the
    moment sums of `_moment_sums`: what shows a map that is nearly constant or unrelated to the measurement,
    which SSIM does not on a sparse target. r is NaN when either image is constant."""
    if n == 0:
        return {"pearson_r": math.nan, "mean": math.nan, "mean_measured": math.nan, "sd": math.nan, "sd_measured": math.nan}
    ma, mb = sums["a"] / n, sums["b"] / n
    va, vb = max(sums["aa"] / n - ma * ma, 0.0), max(sums["bb"] / n - mb * mb, 0.0)
    cov = sums["ab"] / n - ma * mb
    r = cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan
    return {
        "pearson_r": float(min(1.0, max(-1.0, r))) if not math.isnan(r) else math.nan,
        "mean": float(ma + 0.5),
        "mean_measured": float(mb + 0.5),
        "sd": math.sqrt(va),
        "sd_measured": math.sqrt(vb),
    }


def nrmse(mse: float, sd_measured: float) -> float:
    """Root mean squared error normalised by the measured channel's spread (NaN when it has none)."""
    return math.sqrt(mse) / sd_measured if sd_measured > 0 and not math.isnan(mse) else math.nan


def whole_slide_metrics(
    a: da.Array, b: da.Array, mask: da.Array | None = None, data_range: float = 1.0, scheduler: str = "threads"
) -> dict:
    """SSIM / PSNR, Pearson's r, both images' means and spreads, NRMSE (the RMSE over the measured channel's sd:
    1 is what a constant map at the measured mean scores) and spectral fidelity (`spectrum`) over the whole image
    and, if `mask` is given, over mask pixels only (keys suffixed `_tissue`); streamed. `a` is the map, `b` the
    measurement."""
    s = ssim_field(a, b, data_range)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    diff2 = (a64 - b64) ** 2
    valid = ~da.isnan(s)
    parts = {
        "ssim_sum": da.nansum(s),
        "ssim_n": valid.sum(),
        "sq_sum": diff2.sum(),
        "n": diff2.size,
        "moments": _moment_sums(a64, b64, None),
        "spectrum": spectrum_sums(a, b),
    }
    if mask is not None:
        m = mask.astype(bool).rechunk(a.chunks)
        parts.update(
            ssim_sum_mask=da.nansum(da.where(m, s, np.nan)),
            ssim_n_mask=(valid & m).sum(),
            sq_sum_mask=da.where(m, diff2, 0).sum(),
            n_mask=m.sum(),
            moments_mask=_moment_sums(a64, b64, m),
            spectrum_mask=spectrum_sums(a, b, m),
        )
    (vals,) = da.compute(parts, scheduler=scheduler)
    out = {
        "ssim": float(vals["ssim_sum"] / vals["ssim_n"]),
        "mse": float(vals["sq_sum"] / vals["n"]),
        "pixels": int(vals["n"]),
    }
    out["psnr"] = psnr_from_mse(out["mse"], data_range)
    out.update(agreement({k: float(v) for k, v in vals["moments"].items()}, int(vals["n"])))
    out["nrmse"] = nrmse(out["mse"], out["sd_measured"])
    out.update(spectral_fidelity(vals["spectrum"]))
    if mask is not None:
        n = int(vals["n_mask"])
        out["ssim_tissue"] = float(vals["ssim_sum_mask"] / vals["ssim_n_mask"]) if vals["ssim_n_mask"] else math.nan
        out["mse_tissue"] = float(vals["sq_sum_mask"] / n) if n else math.nan
        out["psnr_tissue"] = psnr_from_mse(out["mse_tissue"], data_range) if n else math.nan
        out["pixels_tissue"] = n
        out.update({f"{k}_tissue": v for k, v in agreement({k: float(v) for k, v in vals["moments_mask"].items()}, n).items()})
        out["nrmse_tissue"] = nrmse(out["mse_tissue"], out["sd_measured_tissue"])
        out.update({f"{k}_tissue": v for k, v in spectral_fidelity(vals["spectrum_mask"]).items()})
    return out


# A map is flagged when it spreads less than this share of the measured channel's spread, or when its Pearson's r
# with the measured channel is below MIN_PEARSON_R: on a sparse target such a map can still score a high SSIM.
MIN_SPREAD_RATIO = 0.2
MIN_PEARSON_R = 0.2


def map_check(numbers: dict, suffix: str = "_tissue") -> dict:
    """The verdict on one map from `whole_slide_metrics` (over tissue by default): Pearson's r, the ratio of its
    spread and of its mean to the measured channel's, and a warning when the map is nearly constant or
    uncorrelated (None when neither)."""
    get = lambda k: numbers.get(f"{k}{suffix}", numbers.get(k, math.nan))  # noqa: E731
    r, sd, sd_m, mean, mean_m = get("pearson_r"), get("sd"), get("sd_measured"), get("mean"), get("mean_measured")
    spread = sd / sd_m if sd_m > 0 else math.nan
    ratio = mean / mean_m if mean_m > 0 else math.nan
    problems = []
    if not spread >= MIN_SPREAD_RATIO:
        problems.append(f"nearly constant (its spread is {spread:.2f} of the measured channel's)")
    if not r >= MIN_PEARSON_R:
        problems.append(f"uncorrelated with the measured channel (Pearson's r {r:.2f})")
    warning = ("the map is " + " and ".join(problems) + ": do not trust its SSIM") if problems else None
    return {"pearson_r": r, "spread_ratio": spread, "mean_ratio": ratio, "warning": warning}


def seam_sums(img: np.ndarray, covered: np.ndarray, stride: int, y0: int = 0, x0: int = 0, axes: tuple[int, ...] = (0, 1)) -> np.ndarray:
    """(2, stride): Σ |difference| and the number of pairs of adjacent covered pixels, by phase of the
    patch stride, for the region of `img` whose first pixel sits at (y0, x0) of the map. A pair
    (i − 1, i) along an axis has phase i mod stride; sums of regions add up."""
    out = np.zeros((2, stride), np.float64)
    img = img.astype(np.float64, copy=False)
    for axis, origin in ((0, y0), (1, x0)):
        if axis not in axes or img.shape[axis] < 2:
            continue
        diff = np.abs(np.diff(img, axis=axis))
        pair = np.logical_and(covered[1:], covered[:-1]) if axis == 0 else np.logical_and(covered[:, 1:], covered[:, :-1])
        phase = (origin + 1 + np.arange(diff.shape[axis])) % stride
        per_line = (np.where(pair, diff, 0).sum(axis=1 - axis), pair.sum(axis=1 - axis))
        for k, values in enumerate(per_line):
            out[k] += np.bincount(phase, weights=values, minlength=stride)
    return out


def seam_score(sums: np.ndarray) -> float:
    """Seams at the patch grid as one number: the mean adjacent-pixel difference of the worst phase of
    the stride over the median phase's (1 for a map without a grid; NaN without pairs)."""
    means = sums[0][sums[1] > 0] / sums[1][sums[1] > 0]
    if not len(means) or np.median(means) == 0:
        return math.nan
    return float(means.max() / np.median(means))
