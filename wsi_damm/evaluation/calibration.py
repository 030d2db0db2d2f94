"""One scale on the draws' spread, fitted so their central interval covers the measured channel as promised.

For each pixel, the smallest factor s by which the interval must be stretched about the mean of the draws
to hold the measured value: (mean − measured)/(mean − low) below the mean, (measured − mean)/(high − mean)
above it. The fitted scale is the quantile of those factors at the interval's nominal level (a split-conformal
fit over validation pixels): stretched by it, the interval holds exactly that share of the validation pixels.
The factors are kept in a histogram of log-spaced bins, so the fit streams over a slide of any size.
"""

from __future__ import annotations

import math

import numpy as np

LOG_RANGE = (-4.0, 4.0)  # factors from 1e-4 to 1e4: finer than any spread a map can show
BINS = 4000  # ≈ 0.5 % per bin


def needed_scale(mean: np.ndarray, low: np.ndarray, high: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Per pixel, the stretch of [low, high] about `mean` that just holds `measured` (0 at the mean; inf where the
    interval has no width on the measured value's side)."""
    mean, low, high, measured = (np.asarray(a, np.float64) for a in (mean, low, high, measured))
    below, above = mean - measured, measured - mean
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(below > 0, below / (mean - low), np.where(above > 0, above / (high - mean), 0.0))
    return np.where(np.isnan(s), np.inf, s)


class ScaleHistogram:
    """Counts of needed scales: exact zeros and infinities, the rest in log-spaced bins."""

    def __init__(self) -> None:
        self.edges = np.logspace(*LOG_RANGE, BINS + 1)
        self.counts = np.zeros(BINS + 2, np.int64)  # [0] zeros and values below the range, [-1] infinities and above
        self.within_one = 0  # pixels the interval holds as it is (exact, not binned)

    def add(self, s: np.ndarray) -> None:
        s = np.asarray(s, np.float64).ravel()
        self.within_one += int((s <= 1).sum())
        idx = np.searchsorted(self.edges, s, side="right")  # 0: below the first edge, BINS + 1: at or past the last
        self.counts += np.bincount(idx, minlength=BINS + 2)

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def share_within(self, scale: float) -> float:
        """Share of the pixels whose needed scale is at most `scale` (the coverage after stretching by it)."""
        if not self.n:
            return math.nan
        k = int(np.searchsorted(self.edges, scale, side="right"))
        return float(self.counts[:k].sum() / self.n)

    def quantile(self, q: float) -> float:
        """The smallest bin edge below which a share `q` of the pixels lies (upper edge: never under-covers)."""
        if not self.n:
            return math.nan
        cum = np.cumsum(self.counts) / self.n
        k = int(np.searchsorted(cum, q - 1e-12, side="left"))
        if k == 0:
            return float(self.edges[0])
        if k >= BINS + 1:
            return math.inf
        return float(self.edges[k])
