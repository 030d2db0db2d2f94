"""Blending overlapping patch predictions over one canvas region: Σ w·value / Σ w.

`BlendMerger` has the shape of MONAI's `Merger`: `aggregate` adds patches, `finalize` divides and
returns the region's map. It knows nothing of files; `stitch` feeds it and writes what it returns.
Besides the per-pixel values (the NP map, its sd over draws) it blends the two per-patch numbers
of the gate — divergence and multi-modal share — per BLOCK × BLOCK block, with the same windows,
and counts the covered fraction of every block.

Windows: gaussian (σ = P/8, floor 1e-3: MONAI / nnU-Net), cosine (Hann, floor 1e-3), linear
ramp (floor 1e-3), mean (constant).
"""

from __future__ import annotations

import numpy as np

from wsi_damm.stitching.slide_map import BLOCK, block_shape
from wsi_damm.util.errors import InputError

BLENDS = ("gaussian", "cosine", "linear", "mean")
WINDOW_FLOOR = 1e-3


def window(kind: str, size: int) -> np.ndarray:
    """(size, size) float32 blending weights."""
    c = (size - 1) / 2
    r = np.arange(size, dtype=np.float64) - c
    if kind == "gaussian":
        one = np.exp(-(r**2) / (2 * (size / 8) ** 2))
    elif kind == "cosine":
        one = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2  # Hann over the pixel centres
    elif kind == "linear":
        one = 1 - np.abs(r) / (c + 1)
    elif kind == "mean":
        one = np.ones(size)
    else:
        raise InputError("--blend", f"unknown window {kind!r}; use {', '.join(BLENDS)}")
    w = np.outer(one, one)
    return np.maximum(w / w.max(), WINDOW_FLOOR).astype(np.float32)


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def block_window(w: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Sums of the window `w` over the BLOCK × BLOCK blocks of a grid whose block edges lie `dy`, `dx`
    pixels before the patch's first row and column (its position modulo BLOCK)."""
    p = w.shape[0]
    h, wd = _round_up(dy + p, BLOCK), _round_up(dx + p, BLOCK)
    padded = np.zeros((h, wd), np.float32)
    padded[dy : dy + p, dx : dx + p] = w
    return padded.reshape(h // BLOCK, BLOCK, wd // BLOCK, BLOCK).sum((1, 3))


def block_counts(mask: np.ndarray) -> np.ndarray:
    """True pixels per BLOCK × BLOCK block (uint8), by pairwise halving: a reshape-sum over the small
    axes is 15× slower."""
    h, w = mask.shape
    counts = (np.pad(mask, ((0, -h % BLOCK), (0, -w % BLOCK))) if h % BLOCK or w % BLOCK else mask).view(np.uint8)
    for _ in range(BLOCK.bit_length() - 1):
        counts = counts[0::2] + counts[1::2]
    for _ in range(BLOCK.bit_length() - 1):
        counts = counts[:, 0::2] + counts[:, 1::2]
    return counts


def block_pixels(h: int, w: int) -> np.ndarray:
    """Pixels of an h × w region in each of its blocks (fewer in a last, partial row or column)."""
    side = lambda n: np.minimum(BLOCK, n - BLOCK * np.arange(-(-n // BLOCK)))  # noqa: E731
    return np.outer(side(h), side(w)).astype(np.float32)


class BlendMerger:
    """Σ w·value and Σ w over the region [y0, y1) × [x0, x1) of the canvas (float32), per pixel for
    `n_values` value channels and per block for the gate's numbers. The region's edges must lie on
    whole blocks."""

    def __init__(self, y0: int, y1: int, x0: int, x1: int, w: np.ndarray, n_values: int) -> None:
        self.y0, self.y1, self.x0, self.x1, self.w = y0, y1, x0, x1, w
        h, wd = y1 - y0, x1 - x0
        self.sums = np.zeros((n_values + 1, h, wd), np.float32)  # Σ w·value per value channel, then Σ w
        self.block_sums = np.zeros((3,) + block_shape(h, wd), np.float32)  # per block: Σ w, Σ w·divergence, Σ w·share
        self._block_windows: dict[tuple[int, int], np.ndarray] = {}

    def aggregate(self, values: list[np.ndarray], yx: np.ndarray, gate: np.ndarray) -> None:
        """Add K patches: `values` one (K, P, P) array per value channel (any float dtype; products upcast
        patch by patch), `yx` (K, 2) their canvas positions, `gate` (K, 2) their divergence and share."""
        w, p = self.w, self.w.shape[0]
        weight_sum = self.sums[-1]
        nby, nbx = self.block_sums.shape[1:]
        per_patch = np.concatenate([np.ones((len(yx), 1), np.float32), gate], 1)[:, :, None, None]
        for k, (y, x) in enumerate(yx):
            a, b = max(y, self.y0), min(y + p, self.y1)
            c, e = max(x, self.x0), min(x + p, self.x1)
            if a >= b or c >= e:
                continue
            part = (slice(a - y, b - y), slice(c - x, e - x))  # of the patch
            wy = w[part]
            sl = (slice(a - self.y0, b - self.y0), slice(c - self.x0, e - self.x0))
            for plane, value in zip(self.sums, values):
                plane[sl] += wy * value[k][part]
            weight_sum[sl] += wy
            phase = (int(y) % BLOCK, int(x) % BLOCK)
            if phase not in self._block_windows:
                self._block_windows[phase] = block_window(w, *phase)
            bwin = self._block_windows[phase]
            by, bx = (y - self.y0) // BLOCK, (x - self.x0) // BLOCK  # region edges are whole blocks
            a, b, c, e = max(by, 0), min(by + bwin.shape[0], nby), max(bx, 0), min(bx + bwin.shape[1], nbx)
            self.block_sums[:, a:b, c:e] += per_patch[k] * bwin[a - by : b - by, c - bx : e - bx]

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """(values (n_values, h, w), patch maps (3, blocks): divergence, share, coverage), float32; 0 where
        nothing was aggregated. Divides in place: call once."""
        weight_sum = self.sums[-1]
        covered = weight_sum > 0
        coverage = block_counts(covered) / block_pixels(self.y1 - self.y0, self.x1 - self.x0)
        np.maximum(weight_sum, 1e-30, out=weight_sum)  # uncovered: Σ w·p = 0 there and stays 0 (a `where=` costs 2×)
        np.reciprocal(weight_sum, out=weight_sum)
        values = self.sums[:-1]
        values *= weight_sum
        weight_blocks = self.block_sums[0]
        np.divide(1.0, weight_blocks, out=weight_blocks, where=weight_blocks > 0)
        patch_maps = np.stack([self.block_sums[1] * weight_blocks, self.block_sums[2] * weight_blocks, coverage])
        return values, patch_maps
