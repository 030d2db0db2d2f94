"""The regression row: a deterministic U-Net trained with L1 on the measured NP, at the diffusion model's budget.

Same patch store, same steps, batch size, batch order, learning-rate schedule, gradient clipping and
EMA as the diffusion run it is compared with (its `RunConfig.train`); only the model and the loss
differ. The map goes through `predict`'s tiling and `stitch`, like every other row of the study.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import load_weights, save_weights
from ..config import RunConfig
from ..files import write_json
from ..models.regression import RegressionUNet
from ..progress import progress_bar
from ..slides import SlideSpec
from ..store import PatchStore
from ..train import lr_at
from ..training_data import PatchImages, batch_rows
from .patch_maps import patch_function_map

INPUTS = ("vessels", "nuclei")
WEIGHTS, CONFIG = "regression_ema.safetensors", "config.json"


def build() -> RegressionUNet:
    return RegressionUNet(len(INPUTS))


def train_regression(store_path: Path, run_dir: Path, rc: RunConfig, progress: bool = True) -> Path:
    """Train on every patch of the store (the study holds out whole slides) and write the EMA weights
    and the config to `run_dir`; a finished run is left as it is."""
    run_dir = Path(run_dir)
    if (run_dir / WEIGHTS).exists():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    t = rc.train
    torch.manual_seed(t.seed)
    store = PatchStore.open(store_path)
    cols = [store.roles.index(r) for r in (*INPUTS, "target")]
    images = PatchImages(store, np.arange(len(store)))
    model = build()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    t0 = time.perf_counter()
    losses = []
    for step in progress_bar(range(t.steps), desc="regression U-Net", unit="step", disable=None if progress else True):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, rc)
        x = images.get(batch_rows(len(images), t.batch_size, step, t.seed))[:, cols]
        loss = F.l1_loss(model(x[:, : len(INPUTS)]), x[:, len(INPUTS) :])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - t.ema_decay)
        losses.append(loss.item())
    write_json(run_dir / CONFIG, {"model": "regression U-Net (L1)", "inputs": list(INPUTS), "run": asdict(rc),
                                  "seconds": round(time.perf_counter() - t0, 1), "final_l1": float(np.mean(losses[-max(1, t.log_every):]))})
    save_weights(run_dir / WEIGHTS, ema)  # last: its presence marks a finished run
    return run_dir


def regression_map(run_dir: Path, spec: SlideSpec, out: Path, progress: bool = True) -> Path:
    """The regression U-Net's whole-slide map of one slide (needs CD31 and DAPI)."""
    run_dir = Path(run_dir)
    rc = RunConfig.from_dict(json.loads((run_dir / CONFIG).read_text())["run"])
    model = build()
    load_weights(run_dir / WEIGHTS, model)
    model.eval()
    roles = [r for r in spec.roles if r != "target"]  # the order `predict`'s tiling keeps
    cols = [roles.index(r) for r in INPUTS]

    def predict(images: torch.Tensor, coords: np.ndarray) -> torch.Tensor:
        return (model(images[:, cols]) + 1) / 2

    return patch_function_map(rc, spec.without("target"), out, predict, {"regression": str(run_dir)}, progress)
