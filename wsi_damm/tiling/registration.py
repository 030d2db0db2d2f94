"""Channel registration: align nuclei and target channels to the vessels channel (`--register`).

Separately scanned stains share little at the level of pixel values, so each stage aligns what
they do share, by cross-correlation (scikit-image's `phase_cross_correlation` without spectral
whitening, on real windows' half spectra: sub-pixel by upsampled DFT; its peak is taken by magnitude,
so a structure that is bright in one stain and dark in the other — nuclei avoid vessel lumens —
counts too):

1. coarse shift, on a whole-slide view of ≤ 1024 px: the tissue outline (each channel smoothed
   past its cells, thresholded at the foot of its background peak — the triangle rule); outlines
   of different stains agree to tens of µm, too loosely to fix an angle;
2. fine, on a ≤ 2048² window near level 0 where the tissue outline is longest: band-passed log
   intensity at the scale of capillaries and nuclei (2–8 µm). The vessels window and the whole-slide
   view are computed once per slide; the moved channel is read as scanned (through whole-pixel shifts,
   and once with a margin for turns) and every later window is resampled from it in memory — band-
   passing commutes with moving and turning. For `rigid` the angle is searched first (0.5° grid over
   ±5° ranked by the whole-pixel correlation peak, then a bounded 1-D search on the sub-pixel peak);
   the shift is then measured with weights on the window centre. Both windows are tapered at their
   border by at least the current shift (a moved channel shows nothing, or other tissue, in a strip
   that wide along the slide edge, and that strip's step pulled the peak by up to 1.8 px; a hard crop,
   by 2 px), and the shift is re-measured through each new estimate until the residual is below
   0.02 px — at the fixed point what differs at the edges cannot bias it.

The moved channels of one slide are measured side by side, one thread each, against the shared reference.

The transform is stored in the slide spec and applied lazily when patches are read (no slide
is resampled as a whole). Its quality score is the normalised cross-correlation of the
band-passed fine windows after alignment (its magnitude); near zero the channels do not show
the same tissue, and registration is refused.
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import fft as sfft
from scipy import ndimage, optimize

from wsi_damm.slides.roles import SlideSpec, Transform
from wsi_damm.tiling.correlation import band_pass, band_radius, fourier_moved, gaussian, integer_peak, ncc, phase_shift, taper
from wsi_damm.tiling.grid import low_resolution, tissue_mask
from wsi_damm.util.errors import InputError

METHODS = ("none", "translation", "rigid")
COARSE_SIDE = 1024
FINE_SIDE = 2048
MAX_DEGREES = 5.0
MIN_SCORE = 0.05  # refuse below: no shared structure
WARN_SCORE = 0.1
SMOOTH_UM = 12.0  # the tissue outline: past nuclei and capillaries
REUSE_PX = 2.0  # a window resampled through one rotation serves shifts this close (window px), moved in Fourier space
MARGIN_PX = 128  # what the fine window's moved channel is read with on each side: a 5° turn of a 2048² window, and shifts


def _outline(img: np.ndarray, smooth_px: float) -> np.ndarray:
    """What stains of one section share: where the tissue is. The channel is smoothed past its
    cellular texture and thresholded; the soft-edged mask is what is aligned. The triangle rule puts
    the threshold at the foot of the dark background peak — Otsu would split bright from dim tissue."""
    from skimage.filters import threshold_triangle

    smooth = gaussian(img, smooth_px)
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


def _best_angle(ref: np.ndarray, mov: np.ndarray, centre: float, half_range: float, tol: float) -> float:
    ref_spectrum = sfft.rfft2(ref, workers=-1)
    res = optimize.minimize_scalar(
        lambda d: -phase_shift(ref, _rotate(mov, d), ref_spectrum)[1],
        bounds=(centre - half_range, centre + half_range),
        method="bounded",
        options={"xatol": tol},
    )
    return float(res.x)


def _rotation(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def _offset(t0: Transform, t: Transform, f: float) -> np.ndarray:
    """How far (window px at downsample `f`) a window read through `t0` must move to show what `t` shows, for two
    transforms of one angle: window pixel p shows the channel at R(p − c) + c + t, so t − t0 = Δ moves it by −Rᵀ Δ."""
    return -_rotation(t.degrees).T @ np.array([t.dy - t0.dy, t.dx - t0.dx]) / f


def _coarse(ref: np.ndarray, mov: np.ndarray) -> np.ndarray:
    """Translation t (coarse px) with ref(p) ≈ mov(p + t)."""
    return -phase_shift(ref, mov)[0]


def _fine_angle(ref: np.ndarray, mov: np.ndarray) -> float:
    """Residual angle about the window centre: a 0.5° grid over ±MAX_DEGREES ranked by the whole-pixel correlation
    peak on quarter-size windows (the peak-height curve has side lobes; 0.5° moves their rim by two pixels), then a
    bounded sub-pixel search on half-size windows (0.1° moves their rim by a pixel) within a grid step of the best."""
    grid = np.arange(-MAX_DEGREES, MAX_DEGREES + 1e-9, 0.5)
    quarter_r, quarter_m = ref[::4, ::4], mov[::4, ::4]
    ref_spectrum = sfft.rfft2(quarter_r, workers=-1)
    best = grid[int(np.argmax([integer_peak(ref_spectrum, _rotate(quarter_m, d)) for d in grid]))]
    return _best_angle(ref[::2, ::2], mov[::2, ::2], float(best), 0.5, 0.005)


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


@dataclass(frozen=True)
class _Reference:
    """What every moved channel of one slide is aligned to, computed once per slide: the whole-slide view, the
    vessels channel's tissue outline there, and its fine window band-passed (the reference never moves)."""

    spec: SlideSpec  # as scanned: no transform
    low: np.ndarray
    ds: float  # the whole-slide view's downsample from level 0
    um: float
    shape0: tuple[int, int]
    outline: np.ndarray
    level: int  # where the fine window is read, and its downsample
    f: float
    window: tuple[int, int, int, int]  # y, x, h, w at `level`
    band_px: tuple[float, float]
    band: np.ndarray


def _reference(spec: SlideSpec) -> _Reference:
    plain = replace(spec, transforms=())
    kr = plain.roles.index("vessels")
    with plain.open() as slide:
        low, ds = low_resolution(slide, COARSE_SIDE)
        um = slide.mpp or 0.5
        shape0 = slide.levels[0].shape[1:]
        level = slide.best_level_for(max(1.0, max(shape0) / 16384))
        f = slide.levels[level].downsample
        y, x, h, w = _fine_window(tissue_mask(low, um * ds), ds, int(FINE_SIDE * f), shape0)
        y, x, h, w = int(y / f), int(x / f), max(8, int(h / f)), max(8, int(w / f))
        band_px = (2.0 / (um * f), 8.0 / (um * f))  # capillaries and nuclei
        band = band_pass(slide.read_region(level, y, x, h, w, (kr,))[0], *band_px)
    outline = _outline(low[kr], max(1.0, SMOOTH_UM / (um * ds)))
    return _Reference(plain, low, ds, um, shape0, outline, level, f, (y, x, h, w), band_px, band)


def estimate(spec: SlideSpec, role: str, method: str, reference: _Reference | None = None) -> Transform:
    """The transform of `role` relative to the vessels channel of `spec` (`reference`: `_reference(spec)`, when
    several channels of one slide are registered)."""
    ref = reference or _reference(spec)
    plain, ds, shape0, f, band_px = ref.spec, ref.ds, ref.shape0, ref.f, ref.band_px
    level, (y, x, h, w) = ref.level, ref.window
    km = plain.roles.index(role)
    t = _coarse(ref.outline, _outline(ref.low[km], max(1.0, SMOOTH_UM / (ref.um * ds)))) * ds  # position, not the angle
    first = Transform(float(t[0]), float(t[1]))

    # fine: windows of the moved channel through the current transform; a residual shift s updates t (t' = t − R s)
    scanned: dict[tuple[int, int, int], np.ndarray] = {}  # band-passed as scanned, by whole-pixel shift and margin
    turned: list[tuple[Transform, np.ndarray]] = []  # band-passed windows resampled through a rotation

    def source(n: tuple[int, int], margin: int) -> np.ndarray:
        """The moved channel as scanned on the window moved by n (window px) and grown by `margin` on each side,
        band-passed; read from the slide once, every later window is resampled from it in memory."""
        key = (n[0], n[1], margin)
        if key not in scanned:
            with plain.open() as slide:
                raw = slide.read_as_scanned(level, km, y - margin + n[0], x - margin + n[1], h + 2 * margin, w + 2 * margin)
            scanned[key] = band_pass(raw, *band_px)
        return scanned[key]

    def unmoved(box: tuple[slice, slice]) -> np.ndarray:
        """The moved channel's band-passed window as scanned (no transform) on `box`, sliced from a source already
        read where one holds the box further in than the band-pass sees its edge (the same values), else read."""
        r = band_radius(band_px[1])
        for (ny, nx, m), band in scanned.items():
            oy, ox = m - ny, m - nx  # window pixel p is this source's pixel p + (m − n)
            (y0, y1), (x0, x1) = (box[0].start + oy, box[0].stop + oy), (box[1].start + ox, box[1].stop + ox)
            if min(y0, x0) >= r and y1 <= band.shape[0] - r and x1 <= band.shape[1] - r:
                return band[y0:y1, x0:x1]
        return source((0, 0), 0)[box]

    def moved_band(t: Transform) -> np.ndarray:
        """The moved channel's band-passed window through `t` (band-passing commutes with moving and turning, up to
        interpolation and the window's edges). At 0°: read through the nearest whole-pixel shift, moved by the
        fraction left in Fourier space (exact for the band-passed signal; the wrapped strip lies under the
        taper). Turned: resampled (linearly: the band-passed signal is smooth at the pixel scale) once per angle
        from a read with a margin wide enough for any turn searched, then moved in Fourier space for shifts up to `REUSE_PX` from that."""
        n = (round(t.dy / f), round(t.dx / f))
        if not t.degrees:
            return fourier_moved(source(n, 0), -(np.array([t.dy, t.dx]) / f - n))
        near = [(t0, band) for t0, band in turned if t0.degrees == t.degrees and np.abs(_offset(t0, t, f)).max() <= REUSE_PX]
        if not near:
            rot = _rotation(t.degrees)
            c = (np.array(shape0) / f - 1) / 2  # the slide centre at this level: window pixel p shows R(p − c) + c + t
            corners = rot @ np.array([[0, 0, h - 1, h - 1], [0, w - 1, 0, w - 1]])
            for held in [k[:2] for k in scanned if k[2] == MARGIN_PX] + [n]:  # a source read before, if it holds the window
                offset = rot @ (np.array([y, x]) - c) + c + np.array([t.dy, t.dx]) / f - (np.array([y, x]) - MARGIN_PX + np.array(held))
                q = corners + offset[:, None]
                if q.min() >= 0 and (q.max(1) <= np.array([h, w]) + 2 * MARGIN_PX - 2).all():
                    break
            band = ndimage.affine_transform(source(held, MARGIN_PX), rot, offset=offset, output_shape=(h, w), order=1, mode="constant")
            near = [(t, band)]
            turned.append(near[0])
        t0, band = near[0]
        return fourier_moved(band, _offset(t0, t, f))

    def windows(t: Transform, centre: bool = False) -> tuple[np.ndarray, np.ndarray]:
        # a moved channel shows nothing (or other tissue) in a strip as wide as its shift along the
        # slide edge; where the window meets that edge the strip's step would pull the peak. With
        # `centre`, the weights rise over the outer quarter: a cut-off crop biased the peak by 2 px
        edge = math.hypot(t.dy, t.dx) + abs(math.sin(math.radians(t.degrees))) * math.hypot(*shape0) / 2  # level-0 px
        weights = taper((h, w), max(edge / f + 3 * band_px[1], min(h, w) / 4 if centre else 0))
        return ref.band * weights, moved_band(t) * weights

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
        s, _ = phase_shift(ref_f, mov_f)
        if np.hypot(*s) < 0.02:
            break
        step = _rotation(degrees) @ s * f
        best = Transform(float(best.dy - step[0]), float(best.dx - step[1]), degrees)
        ref_f, mov_f = windows(best, centre)
    ref_a, mov_a = windows(best) if centre else (ref_f, mov_f)
    inner = (slice(h // 8, h - h // 8), slice(w // 8, w - w // 8))
    everywhere = np.ones((inner[0].stop - inner[0].start, inner[1].stop - inner[1].start), bool)
    unmoved_weights = taper((h, w), 3 * band_px[1])[inner]  # what `windows(Transform())` weights the inner box by
    before = abs(ncc(ref.band[inner] * unmoved_weights, unmoved(inner) * unmoved_weights, everywhere))
    after = abs(ncc(ref_a[inner], mov_a[inner], everywhere))
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
        reference = _reference(spec)
        roles = [r for r in spec.roles if r != "vessels"]
        # the channels are measured side by side: each reads its own file handle, and resampling and the FFTs let go
        # of the interpreter lock, so on two cores two channels take little longer than one
        with ThreadPoolExecutor(max_workers=max(1, min(len(roles), os.cpu_count() or 1))) as pool:
            estimates = list(pool.map(lambda role: estimate(spec, role, method, reference), roles))
        for role, t in zip(roles, estimates):
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
