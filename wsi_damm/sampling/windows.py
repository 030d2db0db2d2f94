"""Patch windows on a slide's latent canvas: the tissue windows, the shifted grids drawn anew each sampler
step (DiffInfinite's tiling), the fusion weights, and windows cut with their context.
See the design page on seamless maps (docs/design/seamless.md) for why."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from wsi_damm.stitching.merge import window
from wsi_damm.training.latent_canvas import coverage

LATENT_WINDOW = "gaussian"


@dataclass(frozen=True)
class Windows:
    """Patch windows on a latent canvas: top-left corners `yx` (n, 2), sorted by row then column, side `p`."""

    yx: np.ndarray
    p: int

    def __post_init__(self) -> None:
        order = np.lexsort((self.yx[:, 1], self.yx[:, 0]))
        if not (order == np.arange(len(order))).all():
            raise ValueError("windows must be sorted by row, then column")

    def __len__(self) -> int:
        return len(self.yx)

    def rows(self) -> list[tuple[int, int]]:
        """Index ranges [a, b) of the windows sharing a top row."""
        starts = np.nonzero(np.diff(self.yx[:, 0]))[0] + 1
        bounds = [0, *starts.tolist(), len(self.yx)]
        return list(zip(bounds[:-1], bounds[1:]))


def fusion_weights(p: int) -> torch.Tensor:
    """(p, p) weights of a window's x̂0 in the fused canvas: centres count most, borders ≥ 1e-3."""
    return torch.from_numpy(window(LATENT_WINDOW, p))


def grid_shift(key: int, step: int, p: int) -> tuple[int, int]:
    """The (dy, dx) offset in [0, p) of step `step`'s window grid: keyed by canvas and step only, so a
    resumed or multi-rank run shifts alike."""
    digest = hashlib.blake2b(f"{key}|{step}|shift".encode(), digest_size=8).digest()
    v = int.from_bytes(digest, "little")
    return v % p, (v >> 32) % p


def shifted_windows(tissue: Windows, height: int, width: int, dy: int, dx: int, margin: int = 0) -> Windows:
    """The windows of a grid of side-p cells whose lines pass through (dy, dx), clipped into the
    canvas, that touch a tissue window grown by `margin`: together they cover every such pixel, each
    (but for the clipped last row and column) exactly once (DiffInfinite's shifted tiling)."""
    p, m = tissue.p, margin
    ys = np.unique(np.clip(np.arange(dy - p, height, p), 0, height - p))
    xs = np.unique(np.clip(np.arange(dx - p, width, p), 0, width - p))
    ty, tx = tissue.yx[:, 0], tissue.yx[:, 1]
    out = []
    for y in ys:  # one pass per grid row: the grown tissue windows within reach, their columns as intervals
        near = tx[(ty > y - p - m) & (ty < y + p + m)]
        if not len(near):
            continue
        d = np.zeros(width + 1, np.int32)
        np.add.at(d, np.clip(near - m - p + 1, 0, width), 1)
        np.add.at(d, np.clip(near + p + m, 0, width), -1)
        touching = d.cumsum()[xs] > 0
        out.append(np.stack([np.full(touching.sum(), y), xs[touching]], 1))
    return Windows(np.concatenate(out).astype(np.int64) if out else np.zeros((0, 2), np.int64), p)


def step_windows(tissue: Windows, height: int, width: int, key: int, step: int, steps: int, margin: int = 0) -> Windows:
    """The windows of shifted-grid step `step` of `steps`. The last step fuses two grids half a cell
    apart: its x̂0 becomes the map, and one grid alone would leave the borders of its windows in it."""
    p = tissue.p
    dy, dx = grid_shift(key, step, p)
    grid = shifted_windows(tissue, height, width, dy, dx, margin)
    if step < steps - 1:
        return grid
    other = shifted_windows(tissue, height, width, (dy + p // 2) % p, (dx + p // 2) % p, margin)
    return Windows(np.unique(np.concatenate([grid.yx, other.yx]), axis=0), p)


def owner(windows: Windows, points: np.ndarray) -> np.ndarray:
    """For each canvas point (m, 2), the index of a window of a shifted grid that contains it (the one
    with the largest corner at or before it; the points must lie under the windows)."""
    ys = np.unique(windows.yx[:, 0])
    row = ys[np.searchsorted(ys, points[:, 0], side="right") - 1]
    keys = windows.yx[:, 0] * (1 << 32) + windows.yx[:, 1]
    return np.searchsorted(keys, row * (1 << 32) + points[:, 1], side="right") - 1


def context_band(
    canvas, y0: int, y1: int, all_windows: np.ndarray, p: int, halo: int, margin: int = 0, mirror_edges: bool = False
) -> torch.Tensor:
    """(K, C, y1 − y0 + 2·halo, W + 2·halo): canvas rows [y0, y1) with `halo` latent pixels of context on
    every side; context no window of `all_windows` (grown by `margin`, the ring a shifted grid samples
    too) covers is zero; beyond the slide's edge it is zero, or the canvas mirrored (`mirror_edges`,
    local autoencoders: the edge then decodes like the inside)."""
    height, width = canvas.shape[-2:]
    a, b = max(0, y0 - halo), min(height, y1 + halo)
    band = torch.from_numpy(np.asarray(canvas[:, :, a:b, :]))
    band = torch.where(coverage(all_windows - margin, p + 2 * margin, a, b, width), band, torch.zeros(()))
    pad = (halo, halo, halo - (y0 - a), halo - (b - y1))  # beyond the canvas
    return torch.nn.functional.pad(band, pad, mode="reflect" if mirror_edges else "constant")


def window_crops(
    canvas, windows: np.ndarray, all_windows: np.ndarray, p: int, halo: int, margin: int = 0, mirror_edges: bool = False
) -> torch.Tensor:
    """(K, n, C, p + 2·halo, p + 2·halo): the `windows` (n, 2) of a (K, C, H, W) canvas with `halo`
    latent pixels of context around each, as `context_band` gives it."""
    y0 = int(windows[:, 0].min())
    band = context_band(canvas, y0, int(windows[:, 0].max()) + p, all_windows, p, halo, margin, mirror_edges)
    side = p + 2 * halo
    return torch.stack([band[:, :, y - y0 : y - y0 + side, x : x + side] for y, x in windows], 1)


def region_blocks(windows: np.ndarray, p: int, spare: float = 2.0) -> list[np.ndarray]:
    """The indices of `windows` (n, 2; sorted by row) in blocks of consecutive window rows whose bounding
    box is at most `spare` times the area of its rows' own spans (a block decoded as one region
    then wastes little on what lies between)."""
    blocks, cur, own = [], [], 0
    for y in np.unique(windows[:, 0]):
        idx = np.nonzero(windows[:, 0] == y)[0]
        span = int(windows[idx, 1].max()) + p - int(windows[idx, 1].min())
        if cur:
            sel = np.concatenate(cur + [idx])
            box = (int(windows[sel, 0].max()) + p - int(windows[sel, 0].min())) * (
                int(windows[sel, 1].max()) + p - int(windows[sel, 1].min())
            )
            if box > spare * (own + span * p):
                blocks.append(np.concatenate(cur))
                cur, own = [], 0
        cur.append(idx)
        own += span * p
    return blocks + ([np.concatenate(cur)] if cur else [])
