"""How a slide is tiled: the tiling options (`TileConfig`) and each slide's plan — level, tissue mask,
normalisation range and patch grid — computed before any patch is written."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from wsi_damm.slides import SlideSpec
from wsi_damm.slides.annotations import read_regions
from wsi_damm.tiling.context import context_image, context_roles
from wsi_damm.tiling.grid import (
    TISSUE_MODES,
    LevelChoice,
    choose_level,
    grid_positions,
    low_resolution,
    percentile_stats,
    read_scaled,
    tissue_fractions,
    tissue_mask,
    unit_range,
)
from wsi_damm.tiling.np_units import NpScale
from wsi_damm.util.errors import InputError

GRID_ALIGN = 16  # the default grid of patch origins: every autoencoder factor (4, 8, 16) divides it


@dataclass(frozen=True)
class TileConfig:
    patch_size: int = 256
    overlap: int = 64
    level: int | None = None
    mpp: float | None = None
    min_tissue: float = 0.05
    tissue: str = "auto"  # tissue detection: "auto" (glass-aware, see tiling.tissue_mask) or "all"
    roi: str | None = None  # QuPath GeoJSON: only patches inside its regions are kept (the normalisation still uses all tissue)
    store_dtype: str = "uint8"
    shard_patches: int = 64
    percentiles: tuple[float, float] = (0.5, 99.8)
    mask_max_side: int = 2048
    # patch origins on multiples of this (canvas sampling: the autoencoder's factor). None: the grid 0, stride, … with
    # the last row and column flush with the border, plus, where that one is off `grid_align`, a row and column on it
    # just inside: every pixel covered, and a store trains on canvas latents whatever the slide's size
    align: int | None = None
    np_scale: NpScale = field(default_factory=NpScale)  # NP normalisation: per slide, fixed or from a reference slide

    @property
    def stride(self) -> int:
        return self.patch_size - self.overlap

    @property
    def grid_align(self) -> int:
        """`align`, or by default the largest power of two ≤ GRID_ALIGN dividing the patch size and the stride."""
        if self.align is not None:
            return self.align
        return next(a for a in (GRID_ALIGN, 8, 4, 2, 1) if self.patch_size % a == 0 and self.stride % a == 0)

    def positions(self, length: int) -> np.ndarray:
        """Patch origins along an axis of `length` px (see `align`)."""
        aligned = grid_positions(length, self.patch_size, self.stride, self.grid_align)
        if self.align is not None:
            return aligned
        return np.union1d(aligned, grid_positions(length, self.patch_size, self.stride))

    def validate(self) -> None:
        if self.patch_size <= 0:
            raise InputError("--patch-size", f"must be positive, got {self.patch_size}")
        if not 0 <= self.overlap < self.patch_size:
            raise InputError("--overlap", f"must be in [0, patch size {self.patch_size}), got {self.overlap}")
        if self.store_dtype not in ("uint8", "uint16"):
            raise InputError("--store-dtype", f"must be uint8 or uint16, got {self.store_dtype}")
        if self.shard_patches <= 0:
            raise InputError("--shard-patches", f"must be positive, got {self.shard_patches}")
        if self.align is not None and (self.stride % self.align or self.patch_size % self.align):
            raise InputError(
                "--overlap",
                f"patch size {self.patch_size} and stride {self.stride} must be multiples of {self.align} "
                "(the autoencoder's downsampling) to share a latent canvas",
                f"choose an overlap divisible by {self.align}",
            )
        if not 0 <= self.min_tissue <= 1:
            raise InputError("--min-tissue", f"must be a fraction in [0, 1], got {self.min_tissue}")
        if self.tissue not in TISSUE_MODES:
            raise InputError("--tissue", f"must be one of {', '.join(TISSUE_MODES)}, got {self.tissue!r}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise InputError("--percentiles", f"need 0 ≤ low < high ≤ 100, got {lo}, {hi}")


@dataclass
class SlidePlan:
    spec: SlideSpec
    choice: LevelChoice
    lo: list[float]
    hi: list[float]
    ys: np.ndarray  # patch origins on the tiled grid
    xs: np.ndarray
    tissue: np.ndarray  # fraction per kept patch
    tissue_pixels: float = field(default=0.0)
    mask: np.ndarray | None = field(default=None, repr=False)  # low-resolution tissue mask
    mask_downsample: float = 1.0  # of the mask relative to level 0
    context: np.ndarray | None = field(default=None, repr=False)  # (C, h, w) the condition channels around the patches (`context`)

    def normalised(self, slide, role: str, y: int, x: int, h: int, w: int) -> np.ndarray:
        """One channel of the region (y, x, h, w) of the tiled grid in [0, 1] (float32), by the slide's range."""
        k = self.spec.roles.index(role)
        return unit_range(read_scaled(slide, self.choice, y, x, h, w)[k].astype(np.float32), self.lo[k], self.hi[k])

    def table_entry(self) -> dict:
        return {
            "slide_id": self.spec.slide_id,
            "channels": self.spec.describe(),
            "planes": dict(self.spec.planes),
            "level": self.choice.level,
            "factor": self.choice.factor,
            "downsample": self.choice.downsample,
            "mpp": self.choice.mpp,
            "shape": list(self.choice.shape),
            "normalisation": {"low": self.lo, "high": self.hi},
            "patches": int(len(self.ys)),
            "tissue_fraction": self.tissue_pixels,
        }


def reference_range(spec: SlideSpec, cfg: TileConfig) -> tuple[float, float]:
    """`--np-norm reference`: the NP range of a reference slide by the per-slide rule (its percentiles
    over its tissue), to be held fixed for every other slide."""
    if "target" not in spec.roles:
        raise InputError(spec.paths[0], "is the NP reference slide but has no target (NP) channel", "map it with --channels target=…")
    plan = plan_slide(spec, replace(cfg, np_scale=NpScale(), roi=None))
    k = spec.roles.index("target")
    return float(plan.lo[k]), float(plan.hi[k])


def plan_slide(spec: SlideSpec, cfg: TileConfig) -> SlidePlan:
    """Everything decided at low resolution: level, tissue, normalisation range, kept patches."""
    with spec.open() as slide:
        choice = choose_level(slide, cfg.level, cfg.mpp)
        h, w = choice.shape
        if h < cfg.patch_size or w < cfg.patch_size:
            raise InputError(
                slide.path,
                f"is {h}×{w} px at the tiled level, smaller than one {cfg.patch_size}-px patch",
                "use a smaller --patch-size or a finer --level",
            )
        low, low_ds = low_resolution(slide, cfg.mask_max_side)
        if not np.isfinite(low).all():
            raise InputError(slide.path, "holds NaN or infinite values", "fix or mask them before tiling")
        um_per_px = slide.mpp * low_ds if slide.mpp else None
        mask = tissue_mask(low[spec.mask_channels], um_per_px, cfg.tissue)
        lo, hi = percentile_stats(low, mask, *cfg.percentiles)
        if cfg.np_scale.comparable and "target" in spec.roles:  # one NP range for every slide: maps compare across slides
            k = spec.roles.index("target")
            lo[k], hi[k] = cfg.np_scale.range
        select = mask
        if cfg.roi:  # annotated regions: the patches are those whose tissue lies inside them
            h0, w0 = slide.levels[0].shape[1:]
            select = mask & (read_regions(cfg.roi, (w0, h0)).labels(0, 0, *mask.shape, low_ds) > 0)
    ys, xs = cfg.positions(h), cfg.positions(w)
    frac = tissue_fractions(select, low_ds / choice.downsample, ys, xs, cfg.patch_size)
    every = cfg.min_tissue == 0 and not cfg.roi  # `--min-tissue 0`: every patch, whatever the mask says
    keep = np.ones(frac.shape, bool) if every else (frac >= cfg.min_tissue) & (frac > 0)
    keep_y, keep_x = np.nonzero(keep)
    if not mask.any() and not every:
        warnings.warn(f"{spec.slide_id}: no tissue found; the slide contributes no patches", stacklevel=2)
    ctx = context_image(low, low_ds, choice.downsample, choice.shape, lo, hi, [spec.roles.index(r) for r in context_roles(spec.roles)])
    return SlidePlan(spec, choice, lo, hi, ys[keep_y], xs[keep_x], frac[keep_y, keep_x], float(mask.mean()), mask, low_ds, ctx)
