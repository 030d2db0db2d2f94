"""What lies around a patch: a low-resolution window of the vessels (and nuclei) centred on it.

A 128-px patch at 0.5 µm/px is 64 µm wide, but NP spread from a vessel reaches 60 µm (σ) in sparse
tissue, so much of a pixel's NP comes from vessels outside its patch. The model gets that context as
an extra condition: a window `span` patches wide centred on the patch, at the latent's resolution
(ZoomLDM, CVPR 2025, conditions patches on their surroundings in the same spirit).

Tiling stores one small context image per slide (the condition channels, never the measured
target, at CONTEXT_DOWNSAMPLE × the tiled grid, normalised like the patches); windows are cut from
it for any batch of patches in one gather, zero outside the slide. The image is resampled from the
low-resolution view tiling reads anyway (no extra pass over the slide); on slides larger than about
32 000 px at the tiled level that view is coarser than the context grid, so the context is slightly
smoother there.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from wsi_damm.tiling.grid import unit_range

if TYPE_CHECKING:
    import torch

CONTEXT_DOWNSAMPLE = 16  # context pixels per tiled-grid pixel (8 µm at 0.5 µm/px)
CONTEXT_ROLES = ("vessels", "nuclei")  # conditions only: the measured target never enters a context


def context_roles(roles: list[str]) -> list[str]:
    return [r for r in roles if r in CONTEXT_ROLES]


def context_image(
    low: np.ndarray, low_ds: float, grid_ds: float, grid_shape: tuple[int, int], lo: list[float], hi: list[float], channels: list[int]
) -> np.ndarray:
    """(len(channels), ⌈H/D⌉, ⌈W/D⌉) float32 in [0, 1]: the slide at D = CONTEXT_DOWNSAMPLE tiled-grid pixels
    per pixel, resampled at pixel centres from `low` (level-0 downsample `low_ds`) with an anti-aliasing
    blur, normalised by the slide's range (`lo`, `hi` per channel of `low`)."""
    d = CONTEXT_DOWNSAMPLE
    h, w = (math.ceil(s / d) for s in grid_shape)
    ratio = d * grid_ds / low_ds  # context pixel side in low-resolution pixels
    out = np.empty((len(channels), h, w), np.float32)
    for i, k in enumerate(channels):
        out[i] = unit_range(_resample(low[k].astype(np.float32), ratio, h, w), lo[k], hi[k])
    return out


def _resample(ch: np.ndarray, ratio: float, h: int, w: int) -> np.ndarray:
    """(h, w) pixels of `ratio` × `ratio` source pixels each: their exact mean when `ratio` is whole (the
    part inside the image at the ragged edge), else an anti-aliasing blur sampled at pixel centres."""
    k = round(ratio)
    if k >= 1 and abs(ratio - k) < 1e-6:
        block = np.full((h * k, w * k), np.nan, np.float32)
        block[: min(h * k, ch.shape[0]), : min(w * k, ch.shape[1])] = ch[: h * k, : w * k]
        block = block.reshape(h, k, w, k)
        counts = np.isfinite(block).sum(axis=(1, 3))
        sums = np.nansum(block, axis=(1, 3))
        return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(np.float32)
    sigma = max((ratio - 1) / 2, 0.0)
    if sigma > 0:
        ch = ndimage.gaussian_filter(ch, sigma, mode="nearest")
    grid = np.meshgrid((np.arange(h) + 0.5) * ratio - 0.5, (np.arange(w) + 0.5) * ratio - 0.5, indexing="ij")
    return ndimage.map_coordinates(ch, grid, order=1, mode="nearest")


def window_side(patch: int, span: int) -> int:
    """Context pixels across a window `span` patches wide."""
    return max(1, round(span * patch / CONTEXT_DOWNSAMPLE))


def cut_windows(image: np.ndarray, yx: np.ndarray, patch: int, span: int) -> np.ndarray:
    """(B, C, s, s) windows of a (C, h, w) context image centred on the patches with tiled-grid origins
    `yx` (B, 2); zero beyond the image. One gather for the whole batch."""
    s = window_side(patch, span)
    c, h, w = image.shape
    top = np.rint((yx + patch / 2) / CONTEXT_DOWNSAMPLE - s / 2).astype(np.int64)  # (B, 2) window corners
    padded = np.pad(image, ((0, 0), (s, s), (s, s)))
    ry = top[:, 0, None] + s + np.arange(s)  # (B, s) rows of the padded image
    rx = top[:, 1, None] + s + np.arange(s)
    ry, rx = np.clip(ry, 0, h + 2 * s - 1), np.clip(rx, 0, w + 2 * s - 1)
    return padded[:, ry[:, :, None], rx[:, None, :]].transpose(1, 0, 2, 3)


def to_latent_grid(windows: np.ndarray | torch.Tensor, side: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Windows in [0, 1] → model range [−1, 1] on the latent grid (side × side), antialiased."""
    import torch  # lazily: tiling and the stores need none of torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(windows, np.float32) if isinstance(windows, np.ndarray) else windows, device=device).float()
    if x.shape[-1] != side:
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x * 2 - 1
