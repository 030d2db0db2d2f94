"""Is the draws' spread honest? What a map drawn K times promises and how often the measured channel keeps it.

Three checks of a map made with `predict --samples K` (its sd and central interval, `sampling.draws`):

- coverage: the share of tissue pixels whose measured value lies inside the interval, against the
  interval's nominal level (K + 1 − 2j)/(K + 1), which holds for a measured value exchangeable with the draws;
- spread against error: the rank correlation (Spearman) over patches of the predicted spread and the
  mean map's RMSE — whether patches the draws call uncertain are the ones the map gets wrong;
- reliability: patches binned by their predicted RMSE, against the observed one. For K exchangeable draws with
  population sd s, E[(measured − mean of draws)²] = σ²(1 + 1/K) and E[s²] = σ²(K − 1)/K, so the mean map's
  expected RMSE is s·√((K + 1)/(K − 1)) — no distribution assumed.
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
from scipy.stats import spearmanr

TOLERANCE = 0.1  # |coverage − nominal| beyond this is called over- or underconfident
RELIABILITY_BINS = 8


def coverage(lo: da.Array, hi: da.Array, meas: da.Array, where: da.Array, scheduler="threads") -> dict:
    """Pixels of `where`, and the shares of them whose measured value lies below, inside and above [lo, hi]
    (streamed: memory does not grow with the slide)."""
    n, below, above = da.compute(where.sum(), (where & (meas < lo)).sum(), (where & (meas > hi)).sum(), scheduler=scheduler)
    n = int(n)
    if not n:
        return {"pixels": 0, "coverage": math.nan, "below": math.nan, "above": math.nan}
    return {"pixels": n, "coverage": 1 - (int(below) + int(above)) / n, "below": int(below) / n, "above": int(above) / n}


def calibration_check(cov: float, nominal: float) -> str | None:
    """A warning when the measured channel leaves the interval clearly more (or less) often than promised."""
    if not math.isfinite(cov):
        return None
    if cov < nominal - TOLERANCE:
        return (
            f"the draws are overconfident: the measured channel lies inside their {100 * nominal:.0f} % interval at only "
            f"{100 * cov:.0f} % of the tissue pixels; do not trust the sd map as an error bar"
        )
    if cov > nominal + TOLERANCE:
        return (
            f"the draws are underconfident: the measured channel lies inside their {100 * nominal:.0f} % interval at "
            f"{100 * cov:.0f} % of the tissue pixels; the sd map overstates the error"
        )
    return None


def expected_rmse(spread: np.ndarray, k: int) -> np.ndarray:
    """The mean map's expected RMSE from the draws' population sd (RMS over a patch), K draws."""
    return np.asarray(spread, np.float64) * math.sqrt((k + 1) / (k - 1))


def spread_error(spread: np.ndarray, rmse: np.ndarray, k: int, bins: int = RELIABILITY_BINS) -> dict:
    """Spearman's rank correlation of patch spread and patch RMSE, and the reliability table: patches in
    `bins` bins of equal count by expected RMSE, each bin's expected RMSE against its observed RMSE (both the
    root of the mean square over the bin's patches, which are of one size)."""
    spread, rmse = np.asarray(spread, np.float64), np.asarray(rmse, np.float64)
    ok = np.isfinite(spread) & np.isfinite(rmse)
    spread, rmse = spread[ok], rmse[ok]
    if len(spread) < 3 or np.ptp(spread) == 0 or np.ptp(rmse) == 0:
        return {"patches": int(len(spread)), "spearman": math.nan, "bins": []}
    want = expected_rmse(spread, k)
    order = np.argsort(want, kind="stable")
    table = [
        {
            "patches": int(len(idx)),
            "expected_rmse": float(np.sqrt((want[idx] ** 2).mean())),
            "observed_rmse": float(np.sqrt((rmse[idx] ** 2).mean())),
        }
        for idx in np.array_split(order, min(bins, len(order)))
        if len(idx)
    ]
    return {"patches": int(len(spread)), "spearman": float(spearmanr(spread, rmse).statistic), "bins": table}


def interval_summary(cov: dict, interval: dict, spread: np.ndarray, rmse: np.ndarray) -> dict:
    """Everything `evaluate` records about the draws' spread (`metrics.json` → `uncertainty`)."""
    k = int(interval["draws"])
    return {
        "draws": k,
        "rank": int(interval["rank"]),
        "nominal": float(interval["nominal"]),
        "requested": float(interval["requested"]),
        "scale": float(interval.get("scale", 1.0)),  # the calibration applied by predict --calibrated (1: none)
        **cov,
        "check": calibration_check(cov["coverage"], float(interval["nominal"])),
        "spread_error": spread_error(spread, rmse, k),
    }
