"""Non-learned reference: NP ≈ a · GaussianBlur(CD31, σ) + b, with σ, a, b fitted on training slides.

The fit runs at low resolution over tissue (least squares per candidate σ, best σ kept); the map
is rendered at full resolution block by block (dask `map_overlap`, halo 4σ) and written as an
OME-Zarr map of the same layout as `stitch`, so `evaluate` scores it like any prediction.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from scipy import ndimage

from .evaluate import lazy_blocks
from .ome import build_pyramid, create_level, ome_zarr_attrs
from .slides import SlideSpec
from .stitch import CHANNELS, MAP_DTYPE, PYRAMID_MIN
from .tile import TileConfig, plan_slide
from .tiling import low_resolution, read_scaled

SIGMAS_UM = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


@dataclass(frozen=True)
class BlurBaseline:
    sigma_um: float
    a: float
    b: float
    r2: float


def _normalised_low(spec: SlideSpec, cfg: TileConfig):
    plan = plan_slide(spec, cfg)
    with spec.open() as slide:
        low, low_ds = low_resolution(slide, cfg.mask_max_side)  # the grid the plan's mask is on
        um_per_px = (slide.mpp or 0.5) * low_ds
    k_v, k_t = plan.spec.roles.index("vessels"), plan.spec.roles.index("target")
    norm = lambda k: np.clip((low[k] - plan.lo[k]) / (plan.hi[k] - plan.lo[k]), 0, 1)  # noqa: E731
    return norm(k_v), norm(k_t), plan.mask, um_per_px


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
    k = plan.spec.roles.index("vessels")
    lo, hi = plan.lo[k], plan.hi[k]
    h, w = plan.choice.shape
    mpp = plan.choice.mpp
    sigma_px = model.sigma_um / (mpp or 0.5)
    depth = int(4 * sigma_px) + 1
    slide = spec.open()

    def block(y: int, x: int, bh: int, bw: int) -> np.ndarray:
        v = read_scaled(slide, plan.choice, y, x, bh, bw)[k].astype(np.float32)
        return np.clip((v - lo) / (hi - lo), 0, 1)

    vessels = lazy_blocks(block, (h, w), f"baseline-vessels-{spec.slide_id}")
    pred = da.map_overlap(lambda b: np.clip(model.a * ndimage.gaussian_filter(b, sigma_px, mode="nearest") + model.b, 0, 1),
                          vessels, depth=depth, boundary="nearest", dtype=np.float32)
    scale = plan.mask_downsample / plan.choice.downsample
    cover = da.map_blocks(lambda b, block_info=None: _mask_block(plan.mask, scale, block_info), vessels, dtype=np.float32)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    root = zarr.open_group(str(partial), mode="w", zarr_format=3)
    level0 = create_level(root, "0", (4, h, w), MAP_DTYPE, 0, ("c", "y", "x"))
    stack = da.stack([pred * cover, da.zeros_like(pred), da.zeros_like(pred), cover]).astype(MAP_DTYPE)
    stack.rechunk((1,) + level0.chunks[1:]).store(level0, lock=False, scheduler="threads")
    levels = build_pyramid(root, "", min_size=PYRAMID_MIN, dimension_names=("c", "y", "x"))
    root.attrs["ome"] = ome_zarr_attrs(spec.slide_id, len(levels), mpp, CHANNELS[:4])
    root.attrs["wsi_damm"] = {"slide": spec.slide_id, "patch_size": cfg.patch_size, "baseline": "blurred vessels",
                              "sigma_um": model.sigma_um, "a": model.a, "b": model.b, "nuclei": False}
    slide.close()
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


def _mask_block(mask: np.ndarray, scale: float, block_info) -> np.ndarray:
    (y0, y1), (x0, x1) = block_info[None]["array-location"]
    iy = np.clip(((np.arange(y0, y1) + 0.5) / scale).astype(int), 0, mask.shape[0] - 1)
    ix = np.clip(((np.arange(x0, x1) + 0.5) / scale).astype(int), 0, mask.shape[1] - 1)
    return mask[np.ix_(iy, ix)].astype(np.float32)
