"""Learning-rate schedules shared by every trained model: warm-up, then constant or a cosine decay to a tenth."""

from __future__ import annotations

import math

from wsi_damm.training.config import RunConfig


def decay_factor(step: int, warmup: int, steps: int, schedule: str) -> float:
    """What multiplies the learning rate after warm-up: cosine from 1 down to a tenth at `steps`, or 1 (constant)."""
    if schedule == "constant" or step < warmup:
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_at(step: int, cfg: RunConfig) -> float:
    """The diffusion (and regression) U-Net's learning rate at `step`: linear warm-up, then the schedule."""
    t = cfg.train
    if step < t.lr_warmup_steps:
        return t.lr * (step + 1) / t.lr_warmup_steps
    return t.lr * decay_factor(step, t.lr_warmup_steps, t.steps, t.lr_schedule)
