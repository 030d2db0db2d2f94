"""What K draws of a patch leave in the prediction store: their mean, their sd and a central interval.

The interval runs from the j-th smallest to the j-th largest draw at every pixel. It assumes no
distribution: when the measured value is exchangeable with the K draws (what a calibrated model
promises), it falls inside with probability (K + 1 − 2j)/(K + 1). So the level a user asks for is met
by the largest j that reaches it, and the level actually promised is recorded beside the bounds.
"""

from __future__ import annotations

import math

import numpy as np
import torch

STATS = ("pred", "pred_sd", "pred_lo", "pred_hi")  # the prediction store's per-pixel arrays, in the map's channel order
DEFAULT_INTERVAL = 0.8


def interval_rank(k: int, level: float) -> int:
    """The order statistic j of the central interval: the largest j ≥ 1 whose nominal level reaches `level`
    (j = 1 when even the full range of K draws falls short: `nominal_level` says by how much)."""
    if k < 2:
        raise ValueError(f"an interval needs at least 2 draws, got {k}")
    return max(1, math.floor((k + 1) * (1 - level) / 2 + 1e-9))


def nominal_level(k: int, j: int) -> float:
    """P(measured value inside [j-th smallest, j-th largest] of K exchangeable draws)."""
    return (k + 1 - 2 * j) / (k + 1)


def draws_for(level: float) -> int:
    """The fewest draws whose full range reaches `level`."""
    return max(2, math.ceil((1 + level) / (1 - level) - 1e-9))


def interval_attrs(k: int, level: float) -> dict:
    """What the prediction store and the map record about the interval."""
    j = interval_rank(k, level)
    return {"requested": level, "draws": k, "rank": j, "nominal": nominal_level(k, j)}


def draw_stats(img: torch.Tensor, k: int, level: float = DEFAULT_INTERVAL) -> dict[str, np.ndarray]:
    """Decoded images (K·B, 1, …) in [-1, 1], draw-major → the NP map in [0, 1]: the mean over the K draws
    (`pred`), and for K > 1 their sd (`pred_sd`) and the central interval asked for at `level`, between the
    j-th smallest and the j-th largest draw (`pred_lo`, `pred_hi`; j = `interval_rank`)."""
    img = (img.float().clamp(-1, 1) + 1) / 2
    img = img.view(k, -1, *img.shape[1:])
    out = {"pred": img.mean(0).cpu().numpy()}
    if k > 1:
        ordered = img.sort(0).values
        j = interval_rank(k, level)
        out["pred_sd"] = img.std(0, unbiased=False).cpu().numpy()
        out["pred_lo"] = ordered[j - 1].cpu().numpy()
        out["pred_hi"] = ordered[k - j].cpu().numpy()
    return out


def widened(stats: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """The draws' spread scaled by a calibration (`stages.calibrate`): sd × scale and each bound moved away from
    (scale > 1) or towards the mean by that factor. Bounds are not clipped to [0, 1], so the raw interval can be
    recovered from the stored one (what `evaluate` reports as before calibration)."""
    if "pred_sd" not in stats or scale == 1:
        return stats
    mean = stats["pred"]
    return {
        **stats,
        "pred_sd": stats["pred_sd"] * scale,
        "pred_lo": mean - scale * (mean - stats["pred_lo"]),
        "pred_hi": mean + scale * (stats["pred_hi"] - mean),
    }


def crop(stats: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    """The same crop of every statistic."""
    return {name: v[index] for name, v in stats.items()}


def joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches of statistics joined along the patch axis."""
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
