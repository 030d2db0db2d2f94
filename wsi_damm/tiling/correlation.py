"""Windows of two stains compared: their band-pass, taper, sub-pixel shift and correlation — the measurements
registration (`tiling/registration.py`) is built from, each a pure function of arrays."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import fft as sfft

UPSAMPLE = 50  # sub-pixel shifts to 1/50 px


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> tuple[np.ndarray, int]:
    """The sampled, normalised kernel `ndimage.gaussian_filter` uses (radius ⌊truncate·σ + ½⌋)."""
    r = int(truncate * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return k / k.sum(), r


def _gaussian_response(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Frequency response (half spectrum) of `ndimage.gaussian_filter`'s kernel on a padded window of `shape`: a
    Gaussian in the Fourier domain costs a fraction of two 1-D passes of its (8σ + 1)-tap kernel."""

    def axis(n: int, half: bool) -> np.ndarray:
        k, r = _gaussian_kernel(sigma)
        centred = np.roll(np.pad(k, (0, n - len(k))), -r)
        return np.fft.rfft(centred) if half else np.fft.fft(centred)

    (h, w) = shape
    return np.outer(axis(h, False), axis(w, True)).astype(np.complex64)


@lru_cache(maxsize=4)
def _gaussian_transfer(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """One response per window shape and σ (the tissue outlines of one slide share theirs)."""
    return _gaussian_response(shape, sigma)


@lru_cache(maxsize=8)
def _band_transfer(shape: tuple[int, int], fine_px: float, coarse_px: float) -> np.ndarray:
    """(fine − coarse) Gaussian, one per window shape: the fine search band-passes the moved window once per
    iteration, both Gaussians at once."""
    return _gaussian_response(shape, fine_px) - _gaussian_response(shape, coarse_px)


def _filtered(x: np.ndarray, transfer: np.ndarray, pad: int) -> np.ndarray:
    """x mirrored by `pad` px (scipy's default boundary) and multiplied by `transfer` (of the padded shape) in the
    Fourier domain, cropped back: the circular convolution never wraps into what is kept while `pad` ≥ the kernel's
    radius."""
    spectrum = sfft.rfft2(x, workers=-1)
    spectrum *= transfer
    return sfft.irfft2(spectrum, s=x.shape, workers=-1)[pad : -pad or None, pad : -pad or None]


def _mirrored(x: np.ndarray, pad: int) -> np.ndarray:
    return np.pad(x, pad, mode="symmetric")


def gaussian(img: np.ndarray, sigma: float) -> np.ndarray:
    """`ndimage.gaussian_filter(img, sigma)` in float32 with its mirror boundary, computed in the Fourier domain."""
    r = _gaussian_kernel(sigma)[1]
    padded = _mirrored(img.astype(np.float32), r)
    return _filtered(padded, _gaussian_transfer(padded.shape, sigma), r)


def band_radius(coarse_px: float) -> int:
    """How far in from a window's edge `band_pass(…, coarse_px)` still sees the edge: pixels further in than this are
    the same whichever larger window of the slide they were band-passed in."""
    return _gaussian_kernel(coarse_px)[1]


def band_pass(img: np.ndarray, fine_px: float, coarse_px: float) -> np.ndarray:
    """gaussian(log1p x, fine) − gaussian(log1p x, coarse), identical to `ndimage.gaussian_filter`
    with its default mirror boundary: the window is mirrored by the coarse kernel's radius, so the
    circular convolution never wraps into what is kept."""
    r = _gaussian_kernel(coarse_px)[1]
    padded = _mirrored(np.log1p(np.maximum(img.astype(np.float32), 0)), r)
    return _filtered(padded, _band_transfer(padded.shape, fine_px, coarse_px), r)


def taper(shape: tuple[int, int], margin: float) -> np.ndarray:
    """Weights 0 at the window border rising smoothly (raised cosine) to 1 at `margin` px inside."""

    def ramp(n: int) -> np.ndarray:
        d = np.minimum(np.arange(n), np.arange(n)[::-1]) / max(min(margin, n / 4), 1.0)
        return 0.5 - 0.5 * np.cos(np.pi * np.clip(d, 0, 1))

    return np.outer(ramp(shape[0]), ramp(shape[1])).astype(np.float32)


def phase_shift(ref: np.ndarray, mov: np.ndarray, ref_spectrum: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Shift s with ref(p) ≈ mov(p − s), to 1/UPSAMPLE px, and the correlation's magnitude there (what angle
    searches maximise). `ref_spectrum` (`rfft2(ref)`) spares recomputing it when one reference meets many
    moved windows.

    scikit-image's `phase_cross_correlation` (normalization None) on real windows' half spectra: the whole-pixel
    peak of the circular cross-correlation, then the correlation on a 1/UPSAMPLE px grid 1.5 px wide around it by
    matrix DFT (Guizar-Sicairos et al. 2008). The magnitude at s is the whole-pixel correlation bilinearly
    interpolated, which is Σ ref · (mov moved by s, linear interpolation)."""
    shape = np.array(mov.shape)
    product, cc = _cross_correlation(sfft.rfft2(ref, workers=-1) if ref_spectrum is None else ref_spectrum, mov)
    whole = np.array(np.unravel_index(np.argmax(np.abs(cc)), cc.shape), float)
    whole[whole > np.trunc(shape / 2)] -= shape[whole > np.trunc(shape / 2)]
    region = math.ceil(1.5 * UPSAMPLE)
    steps = (np.arange(region) - np.trunc(region / 2)) / UPSAMPLE
    fy = sfft.fftfreq(int(shape[0]))
    fx = sfft.fftfreq(int(shape[1]))[: product.shape[1]]
    weight = np.full(product.shape[1], 2.0)  # each half-spectrum column stands for itself and its mirror...
    weight[0] = 1.0
    if shape[1] % 2 == 0:
        weight[-1] = 1.0  # ...except the constant column and, for even widths, the Nyquist column
    ey = np.exp(2j * np.pi * np.outer(whole[0] + steps, fy)).astype(product.dtype)
    ex = np.exp(2j * np.pi * np.outer(whole[1] + steps, fx)).astype(product.dtype) * weight.astype(np.float32)
    fine = np.abs((ey @ product @ ex.T).real)
    iy, ix = np.unravel_index(np.argmax(fine), fine.shape)
    s = whole + np.array([steps[iy], steps[ix]])
    return s, _interpolated(cc, s)


def _interpolated(cc: np.ndarray, s: np.ndarray) -> float:
    """|cc| at a fractional lag s, bilinearly from its whole-pixel lags (circular)."""
    base = np.floor(s).astype(int)
    w = s - base
    total = 0.0
    for dy, wy in ((0, 1 - w[0]), (1, w[0])):
        for dx, wx in ((0, 1 - w[1]), (1, w[1])):
            total += wy * wx * float(cc[(base[0] + dy) % cc.shape[0], (base[1] + dx) % cc.shape[1]])
    return abs(total)


def _cross_correlation(ref_spectrum: np.ndarray, mov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cross-power half spectrum of ref (`ref_spectrum` = `rfft2(ref)`) and mov, and the circular
    cross-correlation at whole-pixel lags it gives."""
    product = ref_spectrum * np.conj(sfft.rfft2(mov, workers=-1))
    return product, sfft.irfft2(product, s=mov.shape, workers=-1)


def integer_peak(ref_spectrum: np.ndarray, mov: np.ndarray) -> float:
    """The cross-correlation's largest magnitude at whole-pixel shifts (`ref_spectrum` = `rfft2(ref)`): ranks
    candidate angles at a fraction of the sub-pixel search's cost."""
    return float(np.abs(_cross_correlation(ref_spectrum, mov)[1]).max())


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float(np.sum(a * b) / max(math.sqrt(float(np.sum(a * a) * np.sum(b * b))), 1e-12))


def fourier_moved(band: np.ndarray, d: np.ndarray) -> np.ndarray:
    """`band` moved by d px (window pixel p then shows what p − d showed), in Fourier space: the half spectrum times
    the shift's phase ramp, which is separable — one ramp per axis (`ndimage.fourier_shift`'s, at a fraction of its
    cost: it evaluates the exponential at every frequency)."""
    if not d.any():
        return band
    spectrum = sfft.rfft2(band, workers=-1)
    h, w = band.shape
    ramp = np.exp(-2j * np.pi * d[0] * sfft.fftfreq(h))[:, None] * np.exp(-2j * np.pi * d[1] * sfft.rfftfreq(w))[None, :]
    spectrum *= ramp
    return sfft.irfft2(spectrum, s=band.shape, workers=-1).astype(band.dtype)
