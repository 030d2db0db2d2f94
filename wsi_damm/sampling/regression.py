"""A regression run (`train --model regression`) as `predict` uses a predictor: one deterministic map per patch,
no draws, no gate. Each patch is predicted with MARGIN px of the slide's own pixels around it and cropped to its
centre (`margins.py`), so neighbouring patches answer alike where they overlap; `stitch` blends them like any other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wsi_damm.sampling.margins import Neighbours, with_margin
from wsi_damm.sampling.predictor import PredictConfig, in_micro_batches
from wsi_damm.tiling.store import PatchStore
from wsi_damm.training.checkpoint import load_weights
from wsi_damm.training.regression import INPUTS, build_regression, regression_inputs
from wsi_damm.training.run_dir import RunDir, load_run_config
from wsi_damm.util.errors import InputError

# px of slide read around each patch, a multiple of the U-Net's downsampling; small, because a wider window also moves the
# U-Net away from the patch-sized windows it was trained on (GroupNorm reads statistics over the whole window)
MARGIN = 16


class RegressionPredictor:
    """Loaded regression run: `predict(images, roles, keys)` for a batch, with the interface of `Predictor`."""

    def __init__(self, run_dir: Path, device: torch.device, cfg: PredictConfig) -> None:
        self.run = RunDir(run_dir)
        self.rc = load_run_config(self.run)
        self.cfg, self.device = cfg, device
        if cfg.samples != 1:
            raise InputError(run_dir, f"is a regression run: it gives one map, not {cfg.samples} draws", "predict with --samples 1")
        if not cfg.nuclei:
            raise InputError(run_dir, "is a regression run, which reads CD31 and DAPI together; --no-nuclei applies to DAMM runs")
        self.model = build_regression(self.rc)
        load_weights(self.run.regression, self.model, device)
        self.model = self.model.to(device).eval()
        self.margin = MARGIN
        self._neighbours: Neighbours | None = None

    def inputs(self, store: PatchStore, rows: np.ndarray) -> torch.Tensor:
        """The patches of `rows`, each grown by `margin` px of the slide's pixels (`margins.with_margin`)."""
        if self._neighbours is None or self._neighbours.store.path != store.path:
            self._neighbours = Neighbours(store)
        return with_margin(self._neighbours, rows, self.margin)

    def context(self, store: PatchStore, rows: np.ndarray) -> np.ndarray | None:
        span = self.rc.model.context_span
        return store.context_windows(rows, span) if span else None

    def uses_nuclei(self, roles: list[str]) -> bool:
        return "nuclei" in roles

    @torch.inference_mode()
    def predict(
        self, images: torch.Tensor, roles: list[str], keys: torch.Tensor, context: np.ndarray | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """images (B, C, P + 2·margin, P + 2·margin) in [-1, 1] (`inputs`) → the map of the central P × P in [0, 1]
        (B, 1, P, P) as `{"pred": …}`; no spread, and no divergence or gate (zeros)."""
        if any(r not in roles for r in INPUTS):
            raise InputError(self.run.path, f"is a regression run, which needs {' and '.join(INPUTS)} channels; the slide has {roles}")
        x = regression_inputs(images.to(self.device), [roles.index(r) for r in INPUTS], context, self.rc, self.margin)
        m = self.margin
        out = in_micro_batches(self.model, x)[..., m : x.shape[-2] - m, m : x.shape[-1] - m]
        out = ((out + 1) / 2).clamp(0, 1).float().cpu().numpy()
        zeros = np.zeros(len(images), np.float32)
        return {"pred": out}, zeros, zeros
