"""Synthetic tumour sections with known ground truth: the simulator's physics.

Physics, kept simple but causal: a branching vessel network with varying calibre and leakiness
(CD31 on the endothelium, dimmer where the vessel leaks); nuclei whose density varies by region (DAPI); nanoparticles (NP) that
leak from vessels and spread by a distance that shrinks where cells are dense, then pass through
the optics (PSF) and the camera (Poisson + read noise). In `divergence` regions the DAPI channel
shows an unrelated density — a misaligned or artefact-stained nuclei channel — while the NP still
follows the true density, so trusting nuclei there is penalised; its nuclei also ignore vessel lumens,
which is what a misregistered DAPI looks like and the only local cue a model can learn to distrust.

Smooth fields live on a coarse grid; everything sharp (vessels, nuclei, noise) is rendered tile by
tile with a margin, from per-tile seeded generators, so any slide size streams in bounded memory
and the result does not depend on the tile size used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal, special

# The simulator is the yardstick models are measured by. Any change to what it renders needs a physical reason
# (README, "The simulator") and a new version; the version is written into every slide and every study.
# Version 2 adds the sparse perfusion target (`target="perfusion"`); its NP slides are version 1's, bit for bit.
SIMULATOR_VERSION = 2
CHANNELS = ("CD31", "DAPI", "NP")
TARGETS = {"np": "NP", "perfusion": "Perfusion"}  # target kind → the name of the slide's third channel
# flow falls with leakiness (plasma lost to the interstitium raises its pressure and collapses the vessel) and stops at
# this leakiness: a perfusion tracer fills a lumen in proportion to the flow through it
PERFUSION_LEAK_LIMIT = 0.25
DIVERGENCE_LABELS = {0: "informative", 1: "divergent"}  # values of truth/*.divergence.ome.tif
TILE = 1024
MARGIN = 64
NUCLEUS_CELL = 64


@dataclass(frozen=True)
class SynthConfig:
    size: int = 4096
    mpp: float = 0.5
    seed: int = 0
    divergence: float = 0.3  # fraction of tissue where DAPI is uninformative
    # physics, in µm unless said otherwise
    vessel_spacing: float = 260.0  # one vessel tree root per spacing² of tissue
    vessel_step: float = 12.0
    vessel_radius: tuple[float, float] = (3.0, 7.5)
    branch_probability: float = 0.07
    penetration_dense: float = 8.0  # NP spread length where nuclei are dense
    penetration_sparse: float = 60.0  # … where they are sparse
    nucleus_radius: float = 4.0
    nuclei_per_cell_dense: float = 12.0  # per 32×32 µm
    psf_sigma: float = 0.8
    # what the third channel shows: "np" (extravasated nanoparticles, dense) or "perfusion" (an intravascular
    # tracer filling only the lumens of perfused vessels: a sparse target, a few per cent of the pixels)
    target: str = "np"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")

    @property
    def channels(self) -> tuple[str, str, str]:
        """Channel names of the slide: CD31, DAPI and the target's."""
        return CHANNELS[0], CHANNELS[1], TARGETS[self.target]

    @property
    def clean_suffix(self) -> str:
        """The truth file of the noiseless target field is `truth/{slide}.{clean_suffix}.ome.tif`."""
        return f"{self.target}_clean"


@dataclass
class Layout:
    """Everything global about one slide: coarse smooth fields and the vessel segments."""

    c: int  # coarse factor: full-res px per coarse px
    tissue: np.ndarray
    density: np.ndarray  # true cell density in [0, 1]
    density_seen: np.ndarray  # what the DAPI channel shows
    divergent: np.ndarray  # 1 where DAPI is uninformative
    np_field: np.ndarray  # extravasated NP, coarse
    p0: np.ndarray  # (n, 2) segment start, full-res px (y, x)
    p1: np.ndarray
    radius: np.ndarray  # px
    leak: np.ndarray
    bright: np.ndarray
    np_scale: float  # the slide's 99.5th percentile of NP over tissue, which np_field is divided by


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Gaussian noise with correlation length `scale` (coarse px), marginally ~N(0, 1)."""
    gy, gx = math.ceil(shape[0] / scale) + 4, math.ceil(shape[1] / scale) + 4
    base = rng.standard_normal((gy, gx))
    yy = (np.arange(shape[0]) + 0.5) / scale + 1.5
    xx = (np.arange(shape[1]) + 0.5) / scale + 1.5
    field = ndimage.map_coordinates(base, np.meshgrid(yy, xx, indexing="ij"), order=3)
    return (field - field.mean()) / (field.std() + 1e-9)


def _grow_vessels(rng: np.random.Generator, cfg: SynthConfig, tissue: np.ndarray, c: int):
    """Vectorised random-walk growth of vessel trees from roots inside the tissue."""
    px = 1.0 / cfg.mpp
    area_um2 = tissue.sum() * (c * cfg.mpp) ** 2
    n_roots = max(2, int(round(area_um2 / cfg.vessel_spacing**2)))
    ys, xs = np.nonzero(tissue > 0.7)
    pick = rng.integers(0, len(ys), n_roots)
    pos = np.stack([ys[pick], xs[pick]], 1).astype(np.float64) * c + c / 2
    ang = rng.uniform(0, 2 * np.pi, n_roots)
    rad = rng.uniform(*cfg.vessel_radius, n_roots) * px
    leak = rng.beta(0.7, 0.9, n_roots)
    step = cfg.vessel_step * px
    segs: list[tuple] = []
    h, w = tissue.shape
    for _ in range(160):
        if len(pos) == 0:
            break
        ang = ang + rng.normal(0, 0.22, len(ang))
        new = pos + step * np.stack([np.sin(ang), np.cos(ang)], 1)
        cy = np.clip((new[:, 0] / c).astype(int), 0, h - 1)
        cx = np.clip((new[:, 1] / c).astype(int), 0, w - 1)
        inside = (tissue[cy, cx] > 0.5) & (new[:, 0] >= 0) & (new[:, 1] >= 0) & (new[:, 0] < h * c) & (new[:, 1] < w * c)
        segs.append((pos[inside], new[inside], rad[inside], leak[inside]))
        keep = inside & (rad > 1.5 * px)
        pos, ang, rad, leak = new[keep], ang[keep], rad[keep], leak[keep]
        branch = rng.random(len(pos)) < cfg.branch_probability
        if branch.any() and len(pos) < 50_000:
            turn = rng.uniform(0.45, 0.8, branch.sum()) * rng.choice([-1, 1], branch.sum())
            pos = np.concatenate([pos, pos[branch]])
            ang = np.concatenate([ang, ang[branch] + turn])
            child_leak = np.clip(leak[branch] + rng.normal(0, 0.25, branch.sum()), 0, 1)
            rad = np.concatenate([rad, rad[branch] * 0.75])
            rad[np.nonzero(branch)[0]] *= 0.85
            leak = np.concatenate([leak, child_leak])
    p0 = np.concatenate([s[0] for s in segs]) if segs else np.zeros((0, 2))
    p1 = np.concatenate([s[1] for s in segs]) if segs else np.zeros((0, 2))
    radius = np.concatenate([s[2] for s in segs]) if segs else np.zeros(0)
    leaks = np.concatenate([s[3] for s in segs]) if segs else np.zeros(0)
    return p0, p1, radius, leaks


def _segment_points(p0: np.ndarray, p1: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Points every `spacing` px along each segment, and the segment index of each point."""
    length = np.linalg.norm(p1 - p0, axis=1)
    n = np.maximum(2, np.ceil(length / spacing).astype(int) + 1)
    idx = np.repeat(np.arange(len(p0)), n)
    start = np.repeat(np.cumsum(n) - n, n)
    t = (np.arange(len(idx)) - start) / np.repeat(n - 1, n)
    pts = p0[idx] + (p1[idx] - p0[idx]) * t[:, None]
    return pts, idx


def make_layout(cfg: SynthConfig, index: int) -> Layout:
    rng = np.random.default_rng([cfg.seed, index, 0])
    c = max(4, 2 ** math.ceil(math.log2(max(1.0, cfg.size / 4096))))
    hc = wc = math.ceil(cfg.size / c)
    um = c * cfg.mpp  # µm per coarse px
    yy, xx = np.meshgrid((np.arange(hc) + 0.5) / hc - 0.5, (np.arange(wc) + 0.5) / wc - 0.5, indexing="ij")
    r = np.sqrt((yy / 0.43) ** 2 + (xx / 0.46) ** 2) + 0.18 * _smooth_noise(rng, (hc, wc), 300 / um)
    tissue = special.expit((1 - r) / 0.02).astype(np.float32)
    density = special.ndtr(2.5 * _smooth_noise(rng, (hc, wc), 180 / um)).astype(np.float32)
    other = special.ndtr(2.5 * _smooth_noise(rng, (hc, wc), 180 / um)).astype(np.float32)
    zdiv = _smooth_noise(rng, (hc, wc), 350 / um)
    in_tissue = tissue > 0.5
    if cfg.divergence > 0 and in_tissue.any():
        thr = np.quantile(zdiv[in_tissue], 1 - min(cfg.divergence, 1.0))
        divergent = (zdiv >= thr).astype(np.float32)
    else:
        divergent = np.zeros_like(tissue)
    density_seen = np.where(divergent > 0, other, density).astype(np.float32)

    p0, p1, radius, leak = _grow_vessels(rng, cfg, tissue, c)
    # leaky tumour vessels have a discontinuous endothelium with fewer CD31 copies: the stain is
    # dimmer where leakage is high, so leakiness is visible to a model of CD31 (not to a blur)
    bright = np.clip(1.0 - 0.6 * leak + rng.normal(0, 0.08, len(p0)), 0.25, 1.1)

    src = np_sources(cfg, c, (hc, wc), p0, p1, radius, leak)
    field = np_spread(cfg, c, src, density)
    scale = float(np.quantile(field[in_tissue], 0.995)) if in_tissue.any() else 1.0
    np_field = (field / max(scale, 1e-12) * tissue).astype(np.float32)
    return Layout(c, tissue, density, density_seen, divergent, np_field, p0, p1, radius, leak, bright, scale)


def np_sources(
    cfg: SynthConfig, c: int, shape: tuple[int, int], p0: np.ndarray, p1: np.ndarray, radius: np.ndarray, leak: np.ndarray
) -> np.ndarray:
    """NP released per coarse pixel: line sources on the vessel segments, by leakiness² × calibre."""
    src = np.zeros(shape, np.float64)
    if len(p0):
        pts, idx = _segment_points(p0 / c, p1 / c, 0.5)
        iy = np.clip(pts[:, 0].astype(int), 0, shape[0] - 1)
        ix = np.clip(pts[:, 1].astype(int), 0, shape[1] - 1)
        np.add.at(src, (iy, ix), leak[idx] ** 2 * radius[idx] * cfg.mpp * 0.5)
    return src


def np_spread(cfg: SynthConfig, c: int, src: np.ndarray, density: np.ndarray) -> np.ndarray:
    """Extravasated NP (coarse, before the slide's scale): sources spread by a length that shrinks with the
    true cell density, from `penetration_sparse` to `penetration_dense`. Linear in `src`, so the NP a pixel
    owes to any subset of the sources is this of that subset."""
    um = c * cfg.mpp
    lengths = np.geomspace(cfg.penetration_dense, cfg.penetration_sparse, 4)
    spread = np.stack([ndimage.gaussian_filter(src, lam / um) for lam in lengths])
    pos = (1 - density) * (len(lengths) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(lengths) - 2)
    frac = pos - lo
    return np.take_along_axis(spread, lo[None], 0)[0] * (1 - frac) + np.take_along_axis(spread, lo[None] + 1, 0)[0] * frac


def _sample(field: np.ndarray, c: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Bilinear read of a coarse field at full-res pixel centres of a window."""
    ys = (np.arange(y0, y0 + h) + 0.5) / c - 0.5
    xs = (np.arange(x0, x0 + w) + 0.5) / c - 0.5
    # only the coarse pixels the window reads (c is a power of two, so the shifted coordinates are exact)
    ya, yb = int(np.clip(np.floor(ys[0]), 0, field.shape[0] - 1)), int(np.clip(np.floor(ys[-1]) + 2, 1, field.shape[0]))
    xa, xb = int(np.clip(np.floor(xs[0]), 0, field.shape[1] - 1)), int(np.clip(np.floor(xs[-1]) + 2, 1, field.shape[1]))
    field, ys, xs = field[ya:yb, xa:xb], ys - ya, xs - xa
    # separable: interpolate rows, then columns
    rows = ndimage.map_coordinates(field, np.meshgrid(ys, np.arange(field.shape[1]), indexing="ij"), order=1, mode="nearest")
    return ndimage.map_coordinates(rows, np.meshgrid(np.arange(h), xs, indexing="ij"), order=1, mode="nearest")


def _nucleus_kernel(radius_px: float) -> np.ndarray:
    r = int(math.ceil(radius_px + 3))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return special.expit((radius_px - np.hypot(yy, xx)) / 0.8)


def render_window(cfg: SynthConfig, lay: Layout, index: int, y0: int, x0: int, h: int, w: int) -> dict[str, np.ndarray]:
    """Expected signals (before noise) of a window; exact for pixels ≥ MARGIN from its edges."""
    px = 1.0 / cfg.mpp
    label = np.zeros((h, w), np.int32)
    pad = MARGIN + 16 * px
    near = (
        (np.minimum(lay.p0[:, 0], lay.p1[:, 0]) < y0 + h + pad)
        & (np.maximum(lay.p0[:, 0], lay.p1[:, 0]) > y0 - pad)
        & (np.minimum(lay.p0[:, 1], lay.p1[:, 1]) < x0 + w + pad)
        & (np.maximum(lay.p0[:, 1], lay.p1[:, 1]) > x0 - pad)
    )
    seg = np.nonzero(near)[0]
    if len(seg):
        pts, idx = _segment_points(lay.p0[seg], lay.p1[seg], 0.5)
        iy = np.floor(pts[:, 0]).astype(int) - y0
        ix = np.floor(pts[:, 1]).astype(int) - x0
        ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
        label[iy[ok], ix[ok]] = seg[idx[ok]] + 1
    if label.any():
        dist, (ny, nx) = ndimage.distance_transform_edt(label == 0, return_indices=True)
        nearest = label[ny, nx] - 1
        r = lay.radius[nearest]
        bright = lay.bright[nearest]
    else:
        dist = np.full((h, w), 1e6)
        r = np.zeros((h, w))
        bright = np.zeros((h, w))
    wall_w = 1.0 * px
    wall = bright * np.exp(-0.5 * ((dist - r) / wall_w) ** 2)
    lumen = (dist < r).astype(np.float32)

    tissue = _sample(lay.tissue, lay.c, y0, x0, h, w)
    seen = _sample(lay.density_seen, lay.c, y0, x0, h, w)
    npf = _sample(lay.np_field, lay.c, y0, x0, h, w)
    divergent = _sample(lay.divergent, lay.c, y0, x0, h, w)

    # nuclei from per-cell generators keyed on global cell position
    g = NUCLEUS_CELL
    impulses = np.zeros((h, w), np.float64)
    rad_px = cfg.nucleus_radius * px
    for cy in range(y0 // g, (y0 + h - 1) // g + 1):
        for cx in range(x0 // g, (x0 + w - 1) // g + 1):
            rng = np.random.default_rng([cfg.seed, index, cy, cx, 1])
            yc = min(max(cy * g + g // 2 - y0, 0), h - 1)
            xc = min(max(cx * g + g // 2 - x0, 0), w - 1)
            lam = tissue[yc, xc] * (0.6 + (cfg.nuclei_per_cell_dense - 0.6) * seen[yc, xc])
            n = rng.poisson(lam)
            if n == 0:
                continue
            py = cy * g + rng.uniform(0, g, n) - y0
            pxs = cx * g + rng.uniform(0, g, n) - x0
            amp = rng.uniform(0.6, 1.1, n)
            iy, ix = py.astype(int), pxs.astype(int)
            ok = (py >= 0) & (py < h) & (pxs >= 0) & (pxs < w)
            iy, ix, amp = iy[ok], ix[ok], amp[ok]
            # true nuclei sit outside vessel lumens; a divergent DAPI channel (misregistered or
            # artefact-stained) does not respect them — the one local cue that nuclei mislead there
            free = (dist[iy, ix] > r[iy, ix] + rad_px * 0.8) | (divergent[iy, ix] > 0.5)
            np.add.at(impulses, (iy[free], ix[free]), amp[free])
    nuclei = 1 - np.exp(-1.4 * signal.fftconvolve(impulses, _nucleus_kernel(rad_px), mode="same").clip(0))

    out = {
        "CD31": 150 + 220 * tissue + 2600 * wall + 300 * lumen,
        "DAPI": 120 + 180 * tissue + 5200 * nuclei,
        "divergent": divergent,
    }
    if cfg.target == "perfusion":
        # the tracer fills the lumens of the vessels that carried flow when it was injected, by their flow, nothing else
        flow = np.clip(1 - lay.leak[nearest] / PERFUSION_LEAK_LIMIT, 0, 1) if label.any() else 0
        perfused = lumen * flow
        out["Perfusion"] = 100 + 60 * tissue + 2800 * ndimage.gaussian_filter(perfused, cfg.psf_sigma * px)
    else:
        np_total = npf * (1 - 0.5 * lumen) + 0.35 * lumen * (lay.leak[nearest] if label.any() else 0)
        out["NP"] = 100 + 60 * tissue + 2800 * ndimage.gaussian_filter(np_total, cfg.psf_sigma * px)
    return out


def camera(rng: np.random.Generator, expected: np.ndarray, gain: float = 2.0, read_noise: float = 12.0) -> np.ndarray:
    counts = rng.poisson(np.maximum(expected, 0) / gain) * gain + rng.normal(0, read_noise, expected.shape)
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)
