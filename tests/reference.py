"""The published reference numbers the diffusion tests check against (`data/diffusers_ddim.json`,
computed with diffusers; its `origin` says how) and the closed-form inputs they were computed on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

REFERENCE = json.loads((Path(__file__).resolve().parent / "data" / "diffusers_ddim.json").read_text())


def fixed(shape: tuple[int, ...], phase: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """sin(0.7 · i + phase) over the flat index i, reshaped: the reference's inputs (no RNG)."""
    return torch.sin(0.7 * torch.arange(math.prod(shape), dtype=dtype) + phase).reshape(shape)
