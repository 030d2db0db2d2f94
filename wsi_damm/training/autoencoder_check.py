"""The autoencoder ceiling on held-out patches, and the guard that stops a run whose autoencoder collapsed.

A latent model can at best return what its autoencoder decodes. An autoencoder that learned to return a
flat image (what an L1 loss favours on a sparse stain, where most pixels of every patch are background)
caps every map trained on it at that flat image, and SSIM still scores such a map high. So `train`
measures each autoencoder's decode(encode(x)) against x on the validation patches — Pearson's r, the
ratio of means and the ratio of spreads — writes it into the run, and stops before the diffusion stage
when one has collapsed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from wsi_damm.evaluation.metrics import MOMENTS, agreement
from wsi_damm.models.autoencoder import Autoencoder
from wsi_damm.training.data import PatchImages
from wsi_damm.util.files import write_json

# an autoencoder has collapsed when its reconstruction correlates less than this with its input …
MIN_CEILING_R = 0.5
# … or spreads less than this share of its input's spread
MIN_CEILING_SPREAD = 0.2
MAX_PATCHES = 256  # patches the ceiling is measured on (evenly spaced over the set): seconds, not minutes


@torch.no_grad()
def ceiling_of(ae: Autoencoder, images: PatchImages, channel: int, device: torch.device, batch: int = 32) -> dict:
    """decode(encode(x)) against x over `images`' patches, in [0, 1] units: Pearson's r, both means, both
    spreads (population sd over every pixel), their ratios and the PSNR."""
    rows = np.unique(np.linspace(0, len(images) - 1, min(len(images), MAX_PATCHES)).round().astype(np.int64))
    sums = dict.fromkeys(MOMENTS, 0.0)  # a: the reconstruction, b: the input, each shifted by 0.5 as `agreement` reads them
    squared_error, n = 0.0, 0
    ae.eval()
    for i in range(0, len(rows), batch):
        x = images.get(rows[i : i + batch])[:, channel : channel + 1].to(device)
        y = ae.decode(ae.encode(x)).clamp(-1, 1)
        a, b = (y.double() / 2).flatten(), (x.double() / 2).flatten()  # (v + 1) / 2 − 0.5
        for key, v in (("a", a), ("b", b), ("aa", a * a), ("bb", b * b), ("ab", a * b)):
            sums[key] += float(v.sum())
        squared_error += float(((a - b) ** 2).sum())
        n += a.numel()
    got = agreement(sums, n)
    mean, mean_in, sd, sd_in = got["mean"], got["mean_measured"], got["sd"], got["sd_measured"]
    mse = squared_error / n
    return {
        "patches": int(len(rows)),
        "pearson_r": got["pearson_r"],
        "mean": mean,
        "mean_input": mean_in,
        "mean_ratio": mean / mean_in if mean_in > 0 else math.nan,
        "sd": sd,
        "sd_input": sd_in,
        "spread_ratio": sd / sd_in if sd_in > 0 else math.nan,
        "psnr": 10 * math.log10(1 / mse) if mse > 0 else math.inf,
    }


def collapsed(ceiling: dict) -> bool:
    """True when an autoencoder's reconstruction is nearly flat or unrelated to its input."""
    return not (ceiling["pearson_r"] >= MIN_CEILING_R and ceiling["spread_ratio"] >= MIN_CEILING_SPREAD)


def measure_ceilings(
    aes: dict[str, Autoencoder], images: PatchImages, roles: list[str], device: torch.device, which: str, path: Path | None
) -> dict:
    """Every autoencoder's ceiling on `images` (`which` says in words which patches they are), written to `path` if given."""
    report = {
        "patches": which,
        "limits": {"pearson_r": MIN_CEILING_R, "spread_ratio": MIN_CEILING_SPREAD},
        "roles": {r: ceiling_of(ae, images, roles.index(r), device) for r, ae in aes.items()},
    }
    report["collapsed"] = [r for r, c in report["roles"].items() if collapsed(c)]
    if path is not None:
        write_json(path, report)
    return report


def describe(role: str, ceiling: dict) -> str:
    """One clause: an autoencoder's ceiling figures."""
    return (
        f"the {role} autoencoder reconstructs its channel with Pearson's r {ceiling['pearson_r']:.2f}, "
        f"{ceiling['spread_ratio']:.2f}× its spread and {ceiling['mean_ratio']:.2f}× its mean"
    )
