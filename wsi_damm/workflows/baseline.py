"""Non-learned reference: NP ≈ a · GaussianBlur(CD31, σ) + b, with σ, a, b fitted on training slides.

The fit runs at low resolution over tissue (least squares per candidate σ, best σ kept); the map
is rendered at full resolution block by block (dask `map_overlap`, halo 4σ) and written as an
OME-Zarr map of the same layout as `stitch`, so `evaluate` scores it like any prediction.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from scipy import ndimage

from wsi_damm.slides import SlideSpec
from wsi_damm.stitching.slide_map import BLOCK, COVERAGE, MAP_DTYPE, PATCH_MAP_CHANNELS, block_shape, create_map, finish_map
from wsi_damm.tiling.grid import lazy_blocks, low_resolution, nearest, unit_range
from wsi_damm.tiling.plan import SlidePlan, TileConfig, plan_slide
from wsi_damm.util.errors import InputError
from wsi_damm.util.files import partial_path, publish

SIGMAS_UM = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


@dataclass(frozen=True)
class BlurBaseline:
    sigma_um: float
    a: float
    b: float
    r2: float


def _need_mpp(spec: SlideSpec, mpp: float | None) -> float:
    if not mpp:
        raise InputError(
            spec.paths[0], "has no µm/px in its metadata; the blurred-vessel baseline's σ is in µm", "export the slide with its pixel size"
        )
    return mpp


def _normalised_low(spec: SlideSpec, cfg: TileConfig):
    plan = plan_slide(spec, cfg)
    with spec.open() as slide:
        low, low_ds = low_resolution(slide, cfg.mask_max_side)  # the grid the plan's mask is on
        um_per_px = _need_mpp(spec, slide.mpp) * low_ds
    k_v, k_t = plan.spec.roles.index("vessels"), plan.spec.roles.index("target")
    return unit_range(low[k_v], plan.lo[k_v], plan.hi[k_v]), unit_range(low[k_t], plan.lo[k_t], plan.hi[k_t]), plan.mask, um_per_px


def fit(specs: list[SlideSpec], cfg: TileConfig) -> BlurBaseline:
    """Best (σ, a, b) over training slides by least squares on tissue pixels."""
    data = [_normalised_low(s, cfg) for s in specs]
    best = None
    for sigma in SIGMAS_UM:
        xs, ys = [], []
        for v, t, mask, um in data:
            blurred = ndimage.gaussian_filter(v, sigma / um)
            xs.append(blurred[mask])
            ys.append(t[mask])
        x, y = np.concatenate(xs), np.concatenate(ys)
        if len(x) < 2:
            continue
        a, b = np.polyfit(x, y, 1)
        r2 = 1 - np.mean((a * x + b - y) ** 2) / max(np.var(y), 1e-12)
        if best is None or r2 > best.r2:
            best = BlurBaseline(sigma, float(a), float(b), float(r2))
    if best is None:
        raise ValueError("no tissue to fit the blurred-vessel baseline on")
    return best


def write_map(spec: SlideSpec, cfg: TileConfig, model: BlurBaseline, out: Path) -> Path:
    """Full-resolution baseline map for one slide, OME-Zarr with the stitch layout."""
    plan = plan_slide(spec, cfg)
    sigma_px = model.sigma_um / _need_mpp(spec, plan.choice.mpp)
    info = {"baseline": "blurred vessels", "sigma_um": model.sigma_um, "a": model.a, "b": model.b, "nuclei": False}
    return write_pixel_map(
        spec,
        cfg,
        ("vessels",),
        lambda b: np.clip(model.a * ndimage.gaussian_filter(b[0], sigma_px, mode="nearest") + model.b, 0, 1),
        int(4 * sigma_px) + 1,
        out,
        info,
        plan,
    )


def write_pixel_map(
    spec: SlideSpec,
    cfg: TileConfig,
    roles: tuple[str, ...],
    fn: Callable[[np.ndarray], np.ndarray],
    depth: int,
    out: Path,
    info: dict,
    plan: SlidePlan | None = None,
) -> Path:
    """A map computed pixel-wise from the slide's normalised `roles` channels — `fn`: (len(roles), h, w) block →
    (h, w) map in [0, 1], reading up to `depth` px around each pixel — rendered block by block at full resolution
    and written as an OME-Zarr map with the stitch layout (tissue only), so `evaluate` scores it like any map. `plan`:
    the slide's, when the caller has planned it already."""
    plan = plan or plan_slide(spec, cfg)
    h, w = plan.choice.shape
    slide = spec.open()
    channels = da.stack(
        [
            lazy_blocks(lambda y, x, bh, bw, r=r: plan.normalised(slide, r, y, x, bh, bw), (h, w), f"baseline-{r}-{spec.slide_id}")
            for r in roles
        ]
    ).rechunk({0: -1})
    pred = da.map_overlap(fn, channels, depth={0: 0, 1: depth, 2: depth}, boundary="nearest", dtype=np.float32, drop_axis=0)
    mask_step = plan.choice.downsample / plan.mask_downsample  # mask pixels per map pixel
    cover = lazy_blocks(
        lambda y, x, bh, bw: nearest(plan.mask, mask_step, y, x, bh, bw).astype(np.float32), (h, w), f"baseline-cover-{spec.slide_id}"
    )
    partial = partial_path(out)
    shutil.rmtree(partial, ignore_errors=True)
    root = zarr.open_group(str(partial), mode="w", zarr_format=3)
    [level0], patch0 = create_map(root, h, w, 1, 1)
    (pred * cover)[None].astype(MAP_DTYPE).rechunk(level0.chunks).store(level0, lock=False, scheduler="threads")
    # no gate: divergence and share stay 0; coverage is the tissue mask at the blocks' centres
    blocks = lazy_blocks(
        lambda y, x, bh, bw: nearest(plan.mask, BLOCK * mask_step, y, x, bh, bw).astype(np.float32),
        block_shape(h, w),
        f"baseline-cover-blocks-{spec.slide_id}",
    )
    planes = [blocks if c == COVERAGE else da.zeros_like(blocks) for c in range(len(PATCH_MAP_CHANNELS))]
    da.stack(planes).astype(MAP_DTYPE).rechunk(patch0.chunks).store(patch0, lock=False, scheduler="threads")
    finish_map(
        root,
        spec.slide_id,
        plan.choice.mpp,
        1,
        {
            "slide": spec.slide_id,
            "patch_size": cfg.patch_size,
            **info,
            "percentiles": list(cfg.percentiles),
            "stride": cfg.stride,
            "tissue": cfg.tissue,
        },
    )
    slide.close()
    return publish(partial, out)
