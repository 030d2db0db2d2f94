"""Quality-control pictures: what `tile` (and `predict`) tiled — the slide, its tissue mask and the
patch grid — and what `stitch` wrote, as small PNGs a person checks at a glance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage import measure

from wsi_damm.tiling.grid import low_resolution

THUMB = 1024


def qc_folder(store: Path) -> Path:
    """`STORE.zarr` → `STORE.qc/` (beside the store, never inside it)."""
    store = Path(store)
    return store.with_name(store.name.removesuffix(".zarr") + ".qc")


def thumbnail_path(map_path: Path) -> Path:
    """`MAP.ome.zarr` → `MAP.thumbnail.png`."""
    map_path = Path(map_path)
    return map_path.with_name(map_path.name.removesuffix(".zarr").removesuffix(".ome") + ".thumbnail.png")


def pictures_of_map(map_path: Path, slide_id: str) -> list[Path]:
    """The QC pictures that exist for a map: its thumbnail, and the tiling picture `predict` wrote
    (`PRED.qc/SLIDE.png` for the default map `PRED.ome.zarr`)."""
    map_path = Path(map_path)
    stem = map_path.name.removesuffix(".zarr").removesuffix(".ome")
    found = [thumbnail_path(map_path), map_path.with_name(stem + ".qc") / f"{slide_id}.png"]
    return [p for p in found if p.exists()]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tiling_picture(path: Path, plan, patch_size: int) -> Path:
    """The slide's inputs (CD31 magenta, DAPI cyan), the tissue mask's outline (yellow) and every kept
    patch (green squares)."""
    plt = _plt()
    with plan.spec.open() as slide:
        low, low_ds = low_resolution(slide, THUMB)
    roles = plan.spec.roles
    scaled = {r: np.clip((low[k] - plan.lo[k]) / max(plan.hi[k] - plan.lo[k], 1e-9), 0, 1) for k, r in enumerate(roles)}
    zero = np.zeros(low.shape[1:], np.float32)
    v, n = scaled.get("vessels", zero), scaled.get("nuclei", zero)
    rgb = np.clip(np.stack([v, n, np.maximum(v, n)], -1), 0, 1)
    h, w = rgb.shape[:2]
    fig, ax = plt.subplots(figsize=(8, 8 * h / w + 0.6))
    ax.imshow(rgb, interpolation="nearest")
    mask_scale = plan.mask_downsample / low_ds  # mask pixels → thumbnail pixels
    for contour in measure.find_contours(plan.mask.astype(np.float32), 0.5):
        ax.plot((contour[:, 1] + 0.5) * mask_scale - 0.5, (contour[:, 0] + 0.5) * mask_scale - 0.5, color="yellow", lw=1)
    s = plan.choice.downsample / low_ds  # tiled-grid pixels → thumbnail pixels
    from matplotlib.collections import PolyCollection

    boxes = [
        [(x * s, y * s), ((x + patch_size) * s, y * s), ((x + patch_size) * s, (y + patch_size) * s), (x * s, (y + patch_size) * s)]
        for y, x in zip(plan.ys, plan.xs)
    ]
    ax.add_collection(PolyCollection(boxes, facecolors="none", edgecolors=(0.2, 1.0, 0.2, 0.6), linewidths=0.5))
    ax.set(xlim=(-0.5, w - 0.5), ylim=(h - 0.5, -0.5), xticks=[], yticks=[])
    ax.set_title(
        f"{plan.spec.slide_id}: {len(plan.ys)} patches of {patch_size} px, tissue {100 * plan.tissue_pixels:.1f} % "
        "(CD31 magenta, DAPI cyan, tissue outline yellow, patches green)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def map_picture(path: Path, levels: list, slide_id: str, mpp: float | None) -> Path:
    """The predicted NP map (coarsest level of at most THUMB px) with its colour scale."""
    plt = _plt()
    level = next((lv for lv in levels if max(lv.shape[1:]) <= THUMB), levels[-1])
    img = np.asarray(level[0], np.float32)
    h, w = img.shape
    fig, ax = plt.subplots(figsize=(7, 7 * h / w + 0.6))
    im = ax.imshow(img, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04, label="normalised NP")
    ax.set(xticks=[], yticks=[])
    um = f", {levels[0].shape[2] * mpp / 1000:.2f} mm wide" if mpp else ""
    ax.set_title(f"{slide_id}: predicted NP ({levels[0].shape[1]}×{levels[0].shape[2]} px{um})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
