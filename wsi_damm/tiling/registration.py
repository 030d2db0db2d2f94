"""Channel registration: align nuclei and target channels to the vessels channel (`--register`).

Separately scanned stains share little at the level of pixel values, so each stage aligns what
they do share, by cross-correlation (scikit-image `phase_cross_correlation` without spectral
whitening, sub-pixel by upsampled DFT; its peak is taken by magnitude, so a structure that is
bright in one stain and dark in the other — nuclei avoid vessel lumens — counts too):

1. coarse shift, on a whole-slide view of ≤ 1024 px: the tissue outline (each channel smoothed
   past its cells, thresholded at the foot of its background peak — the triangle rule); outlines
   of different stains agree to tens of µm, too loosely to fix an angle;
2. fine, on a ≤ 2048² window near level 0 where the tissue outline is longest, read through the
   coarse shift: band-passed log intensity at the scale of capillaries and nuclei (2–8 µm). For
   `rigid` the angle is searched there first (0.5° grid over ±5°, then a bounded 1-D search on
   the correlation peak); the shift is then measured with weights on the window centre. Both
   windows are tapered at their border by at least the current shift (a moved channel shows
   nothing, or other tissue, in a strip that wide along the slide edge, and that strip's step
   pulled the peak by up to 1.8 px; a hard crop, by 2 px), and the shift is re-measured through
   each new estimate until the residual is below 0.02 px — at the fixed point what differs at
   the edges cannot bias it.

The transform is stored in the slide spec and applied lazily when patches are read (no slide
is resampled as a whole). Its quality score is the normalised cross-correlation of the
band-passed fine windows after alignment (its magnitude); near zero the channels do not show
the same tissue, and registration is refused.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import fft as sfft
from scipy import ndimage, optimize
from skimage.registration import phase_cross_correlation

from wsi_damm.slides.roles import SlideSpec, Transform
from wsi_damm.tiling.grid import low_resolution, tissue_mask
from wsi_damm.util.errors import InputError

METHODS = ("none", "translation", "rigid")
COARSE_SIDE = 1024
FINE_SIDE = 2048
MAX_DEGREES = 5.0
MIN_SCORE = 0.05  # refuse below: no shared structure
WARN_SCORE = 0.1


def _outline(img: np.ndarray, smooth_px: float) -> np.ndarray:
    """What stains of one section share: where the tissue is. The channel is smoothed past its
    cellular texture and thresholded; the soft-edged mask is what is aligned. The triangle rule puts
    the threshold at the foot of the dark background peak — Otsu would split bright from dim tissue."""
    from skimage.filters import threshold_triangle

    smooth = ndimage.gaussian_filter(img.astype(np.float32), smooth_px)
    threshold = float(threshold_triangle(smooth))
    # the outline itself (edge strength of the mask): a thin ridge gives a sharp correlation peak
    # and no wrap-around bias where a window cuts through tissue
    return ndimage.gaussian_gradient_magnitude((smooth > threshold).astype(np.float32), 1.5, mode="nearest")


def _rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """Resample so that pixel p shows img at R(θ)(p − c) + c (the Transform convention)."""
    if degrees == 0:
        return img
    rot = _rotation(degrees)
    c = (np.array(img.shape) - 1) / 2
    return ndimage.affine_transform(img, rot, offset=c - rot @ c, order=1, mode="constant", cval=0.0)


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> tuple[np.ndarray, int]:
    """The sampled, normalised kernel `ndimage.gaussian_filter` uses (radius ⌊truncate·σ + ½⌋)."""
    r = int(truncate * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return k / k.sum(), r


@lru_cache(maxsize=8)
def _band_transfer(shape: tuple[int, int], fine_px: float, coarse_px: float) -> np.ndarray:
    """Frequency response of (fine − coarse) Gaussian on a padded window, one per window shape: the
    fine search band-passes the moved window once per iteration, and both Gaussians at once in the
    Fourier domain cost a fifth of four 1-D passes of a 129-tap kernel."""

    def axis(sigma: float, n: int, half: bool) -> np.ndarray:
        k, r = _gaussian_kernel(sigma)
        centred = np.roll(np.pad(k, (0, n - len(k))), -r)
        return np.fft.rfft(centred) if half else np.fft.fft(centred)

    (h, w) = shape
    return (
        np.outer(axis(fine_px, h, False), axis(fine_px, w, True)) - np.outer(axis(coarse_px, h, False), axis(coarse_px, w, True))
    ).astype(np.complex64)


def _band(img: np.ndarray, fine_px: float, coarse_px: float) -> np.ndarray:
    """gaussian(log1p x, fine) − gaussian(log1p x, coarse), identical to `ndimage.gaussian_filter`
    with its default mirror boundary: the window is mirrored by the coarse kernel's radius, so the
    circular convolution never wraps into what is kept."""
    x = np.log1p(np.maximum(img.astype(np.float32), 0))
    r = _gaussian_kernel(coarse_px)[1]
    padded = np.pad(x, r, mode="symmetric")
    spectrum = sfft.rfft2(padded, workers=-1)
    spectrum *= _band_transfer(padded.shape, fine_px, coarse_px)
    return sfft.irfft2(spectrum, s=padded.shape, workers=-1)[r : r + x.shape[0], r : r + x.shape[1]]


def _taper(shape: tuple[int, int], margin: float) -> np.ndarray:
    """Weights 0 at the window border rising smoothly (raised cosine) to 1 at `margin` px inside."""

    def ramp(n: int) -> np.ndarray:
        d = np.minimum(np.arange(n), np.arange(n)[::-1]) / max(min(margin, n / 4), 1.0)
        return 0.5 - 0.5 * np.cos(np.pi * np.clip(d, 0, 1))

    return np.outer(ramp(shape[0]), ramp(shape[1])).astype(np.float32)


def _shift(ref: np.ndarray, mov: np.ndarray, ref_spectrum: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Shift s with ref(p) ≈ mov(p − s), and the correlation peak magnitude (for angle searches). `ref_spectrum`
    (`fft2(ref)`) spares recomputing it when one reference meets many moved windows."""
    if ref_spectrum is None:
        s, _, _ = phase_cross_correlation(ref, mov, upsample_factor=50, normalization=None)
    else:
        s, _, _ = phase_cross_correlation(ref_spectrum, sfft.fft2(mov, workers=-1), upsample_factor=50, normalization=None, space="fourier")
    shifted = ndimage.shift(mov, s, order=1, mode="constant")
    return s, abs(float(np.sum(ref * shifted)))


def _integer_peak(ref_spectrum: np.ndarray, mov: np.ndarray) -> float:
    """The cross-correlation's largest magnitude at whole-pixel shifts (`ref_spectrum` = `rfft2(ref)`): ranks
    candidate angles at a fraction of the sub-pixel search's cost."""
    product = ref_spectrum * np.conj(sfft.rfft2(mov, workers=-1))
    return float(np.abs(sfft.irfft2(product, s=mov.shape, workers=-1)).max())


def _best_angle(ref: np.ndarray, mov: np.ndarray, centre: float, half_range: float, tol: float) -> float:
    ref_spectrum = sfft.fft2(ref, workers=-1)
    res = optimize.minimize_scalar(
        lambda d: -_shift(ref, _rotate(mov, d), ref_spectrum)[1],
        bounds=(centre - half_range, centre + half_range),
        method="bounded",
        options={"xatol": tol},
    )
    return float(res.x)


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float(np.sum(a * b) / max(math.sqrt(float(np.sum(a * a) * np.sum(b * b))), 1e-12))


def _rotation(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def _coarse(ref: np.ndarray, mov: np.ndarray) -> np.ndarray:
    """Translation t (coarse px) with ref(p) ≈ mov(p + t)."""
    return -_shift(ref, mov)[0]


def _fine_angle(ref: np.ndarray, mov: np.ndarray) -> float:
    """Residual angle about the window centre, on half-size windows (0.1° moves their rim by a
    pixel): a 0.5° grid over ±MAX_DEGREES ranked by the whole-pixel correlation peak (the peak-height
    curve has side lobes), then a bounded sub-pixel search around the best grid point."""
    half_r, half_m = ref[::2, ::2], mov[::2, ::2]
    grid = np.arange(-MAX_DEGREES, MAX_DEGREES + 1e-9, 0.5)
    ref_spectrum = sfft.rfft2(half_r, workers=-1)
    best = grid[int(np.argmax([_integer_peak(ref_spectrum, _rotate(half_m, d)) for d in grid]))]
    return _best_angle(half_r, half_m, float(best), 0.5, 0.005)


def _fine_window(mask: np.ndarray, mask_ds: float, side: int, shape0: tuple[int, int]) -> tuple[int, int, int, int]:
    """A side² level-0 window (clipped to the slide) holding the most tissue outline."""
    edge = mask ^ ndimage.binary_erosion(mask)
    k = max(1, int(side / mask_ds))
    density = ndimage.uniform_filter(edge.astype(np.float32), k, mode="constant")
    cy, cx = np.unravel_index(np.argmax(density), density.shape)
    h, w = min(side, shape0[0]), min(side, shape0[1])
    y = int(np.clip((cy + 0.5) * mask_ds - h / 2, 0, shape0[0] - h))
    x = int(np.clip((cx + 0.5) * mask_ds - w / 2, 0, shape0[1] - w))
    return y, x, h, w


def estimate(spec: SlideSpec, role: str, method: str) -> Transform:
    """The transform of `role` relative to the vessels channel of `spec`."""
    plain = replace(spec, transforms=tuple((r, t) for r, t in spec.transforms if r != role))
    roles = plain.roles
    kr, km = roles.index("vessels"), roles.index(role)
    with plain.open() as slide:
        low, ds = low_resolution(slide, COARSE_SIDE)
        um = slide.mpp or 0.5
        mask = tissue_mask(low, um * ds)
        shape0 = slide.levels[0].shape[1:]
    smooth_um = 12.0  # past nuclei and capillaries
    ref, mov = (_outline(low[k], max(1.0, smooth_um / (um * ds))) for k in (kr, km))
    t = _coarse(ref, mov) * ds  # the outline fixes position to within tens of µm, not the angle
    first = Transform(float(t[0]), float(t[1]))

    # fine: windows read through the current transform; a residual shift s updates t (t' = t − R s)
    with plain.open() as slide:
        level = slide.best_level_for(max(1.0, max(shape0) / 16384))
        f = slide.levels[level].downsample
    y, x, h, w = _fine_window(mask, ds, int(FINE_SIDE * f), shape0)
    y, x, h, w = int(y / f), int(x / f), max(8, int(h / f)), max(8, int(w / f))
    band_px = (2.0 / (um * f), 8.0 / (um * f))  # capillaries and nuclei

    with plain.open() as slide:
        ref_band = _band(slide.read_region(level, y, x, h, w, (kr,))[0], *band_px)  # the reference never moves

    read: dict = {}  # the moved channel's band-passed window, read through one transform of each angle

    def moved_band(t: Transform) -> np.ndarray:
        """The moved channel's band-passed window through `t`: resampled from the slide once per angle; a
        transform that differs only in its shift moves that window by the difference instead (a Fourier shift:
        exact for the band-passed signal, and the wrapped strip lies under the taper)."""
        if t.degrees not in read:
            with replace(plain, transforms=plain.transforms + ((role, t),)).open() as slide:
                mov = slide.read_region(level, y, x, h, w, (km,))[0]
            read[t.degrees] = (t, _band(mov, *band_px))
        t0, band = read[t.degrees]
        # window pixel p shows the channel at R(p − c) + c + t: moving t by Δ is the window moved by −Rᵀ Δ
        d = -_rotation(t.degrees).T @ np.array([t.dy - t0.dy, t.dx - t0.dx]) / f
        if not d.any():
            return band
        spectrum = ndimage.fourier_shift(sfft.rfft2(band, workers=-1), d, n=band.shape[1])
        return sfft.irfft2(spectrum, s=band.shape, workers=-1).astype(band.dtype)

    def windows(t: Transform, centre: bool = False) -> tuple[np.ndarray, np.ndarray]:
        # a moved channel shows nothing (or other tissue) in a strip as wide as its shift along the
        # slide edge; where the window meets that edge the strip's step would pull the peak. With
        # `centre`, the weights rise over the outer quarter: a cut-off crop biased the peak by 2 px
        edge = math.hypot(t.dy, t.dx) + abs(math.sin(math.radians(t.degrees))) * math.hypot(*shape0) / 2  # level-0 px
        taper = _taper((h, w), max(edge / f + 3 * band_px[1], min(h, w) / 4 if centre else 0))
        return ref_band * taper, moved_band(t) * taper

    ref_f, mov_f = windows(first)
    degrees = 0.0
    if method == "rigid":
        degrees = _fine_angle(ref_f, mov_f)
        # rotate about the slide centre c but keep the window centre w where it was: t += (I − R)(w − c)
        off = np.array([(y + h / 2) * f - shape0[0] / 2, (x + w / 2) * f - shape0[1] / 2])
        t = np.array([first.dy, first.dx]) + off - _rotation(degrees) @ off
        first = Transform(float(t[0]), float(t[1]), degrees)
    # a small angle error moves structure by δ·r around the window centre: weight the centre
    centre = method == "rigid"
    ref_f, mov_f = windows(first, centre) if centre else (ref_f, mov_f)
    # iterate to the fixed point: a residual of zero is measured without bias from what differs at
    # the window's edges; one step leaves up to ~0.9 px, the second ~0.1, the third < 0.05
    best = first
    for _ in range(4):
        s, _ = _shift(ref_f, mov_f)
        if np.hypot(*s) < 0.02:
            break
        step = _rotation(degrees) @ s * f
        best = Transform(float(best.dy - step[0]), float(best.dx - step[1]), degrees)
        ref_f, mov_f = windows(best, centre)
    ref_a, mov_a = windows(best) if centre else (ref_f, mov_f)
    inner = np.zeros(ref_a.shape, bool)
    inner[h // 8 : h - h // 8, w // 8 : w - w // 8] = True
    before = abs(ncc(*windows(Transform()), inner))
    after = abs(ncc(ref_a, mov_a, inner))
    return replace(best, score=round(after, 4), score_before=round(before, 4))


def register_specs(specs: list[SlideSpec], method: str, qc_dir: Path | None = None, log=None) -> list[SlideSpec]:
    """Each slide's nuclei and target channels aligned to its vessels channel (`method` translation | rigid)."""
    if method not in METHODS:
        raise InputError("--register", f"must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "none":
        return specs
    out = []
    for spec in specs:
        moved = []
        for role in (r for r in spec.roles if r != "vessels"):
            t = estimate(spec, role, method)
            if t.score is None or t.score < MIN_SCORE:
                raise InputError(
                    spec.paths[0],
                    f"{role} channel does not overlap the vessels channel after registration (correlation {t.score:.2f} < {MIN_SCORE})",
                    "check that both files show the same section",
                )
            if t.score < WARN_SCORE:
                warnings.warn(f"{spec.slide_id}: {role} registration is doubtful (correlation {t.score:.2f})", stacklevel=2)
            if log:
                log(
                    f"{spec.slide_id}: {role} → vessels: dy {t.dy:+.2f} px, dx {t.dx:+.2f} px, {t.degrees:+.3f}°, "
                    f"correlation {t.score_before:.3f} → {t.score:.3f}"
                )
            moved.append((role, t))
        registered = replace(spec, transforms=tuple(moved))
        if qc_dir is not None:
            qc_figure(spec, registered, Path(qc_dir) / f"{spec.slide_id}_registration.png")
        out.append(registered)
    return out


def qc_figure(before: SlideSpec, after: SlideSpec, path: Path) -> None:
    """Low-resolution overlays before and after: vessels magenta, each other channel green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [r for r in before.roles if r != "vessels"]
    views = []
    for spec in (before, after):
        with spec.open() as slide:
            low, _ = low_resolution(slide, COARSE_SIDE)
        views.append(low)
    fig, axes = plt.subplots(len(others), 2, figsize=(10, 5 * len(others)), squeeze=False)
    moved = dict(after.transforms)
    for i, role in enumerate(others):
        for j, (low, title) in enumerate(zip(views, ("before", "after"))):
            v, o = (_display(low[before.roles.index(r)]) for r in ("vessels", role))
            axes[i, j].imshow(np.stack([v, o, v], -1))
            t = moved.get(role)
            extra = f"\ndy {t.dy:+.1f} px, dx {t.dx:+.1f} px, {t.degrees:+.2f}°, r = {t.score:.3f}" if (t and j == 1) else ""
            axes[i, j].set_title(f"{before.slide_id}: vessels (magenta) vs {role} (green), {title}{extra}", fontsize=9)
            axes[i, j].axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _display(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99.5])
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
