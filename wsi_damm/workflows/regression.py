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

from wsi_damm.models.regression import RegressionUNet
from wsi_damm.slides import SlideSpec
from wsi_damm.tiling.context import to_latent_grid
from wsi_damm.tiling.store import PatchStore
from wsi_damm.training.checkpoint import load_weights, save_weights
from wsi_damm.training.config import RunConfig
from wsi_damm.training.data import PatchImages, batch_rows, split_of
from wsi_damm.training.learning_rate import lr_at
from wsi_damm.training.run_dir import build_optimizer
from wsi_damm.util.errors import InputError
from wsi_damm.util.files import write_json
from wsi_damm.util.heap import reusing_freed_memory
from wsi_damm.util.progress import progress_bar
from wsi_damm.workflows.patch_maps import patch_function_map

INPUTS = ("vessels", "nuclei")
WEIGHTS, CONFIG = "regression_ema.safetensors", "config.json"


def build(rc: RunConfig) -> RegressionUNet:
    """Its inputs: CD31 and DAPI, and with the run's `context_span` their context windows brought to the
    patch's grid — the same information the diffusion model conditions on."""
    return RegressionUNet(len(INPUTS) * (2 if rc.model.context_span else 1))


def _inputs(images: torch.Tensor, cols: list[int], context: np.ndarray | None, rc: RunConfig) -> torch.Tensor:
    x = images[:, cols]
    if not rc.model.context_span:
        return x
    return torch.cat([x, to_latent_grid(context, x.shape[-1], x.device)], 1)


def train_regression(store_path: Path, run_dir: Path, rc: RunConfig, progress: bool = True) -> Path:
    """Train on the patches a DAMM run with the same settings learns from (its validation split held out:
    like with like; the study sets no validation, so every patch) and write the EMA weights and the config
    to `run_dir`; a finished run is left as it is."""
    run_dir = Path(run_dir)
    if (run_dir / WEIGHTS).exists():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    t = rc.train
    torch.manual_seed(t.seed)
    store = PatchStore.open(store_path)
    cols = [store.roles.index(r) for r in INPUTS]
    target = store.roles.index("target")
    if rc.model.context_span and store.context_roles != list(INPUTS):
        raise InputError(store_path, "has no context images of CD31 and DAPI, which model.context_span needs", "tile the slides again")
    train_idx = split_of(store, t).train
    images = PatchImages(store, train_idx)
    model = build(rc)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = build_optimizer(model.parameters(), t.lr, t.weight_decay)
    with reusing_freed_memory():  # each step allocates the same full-resolution activations again
        t0 = time.perf_counter()
        losses = []
        for step in progress_bar(range(t.steps), desc="regression U-Net", unit="step", disable=None if progress else True):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, rc)
            rows = batch_rows(len(images), t.batch_size, step, t.seed)
            x = images.get(rows)
            context = images.context(rows, rc.model.context_span) if rc.model.context_span else None
            loss = F.l1_loss(model(_inputs(x, cols, context, rc)), x[:, target : target + 1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - t.ema_decay)
            losses.append(loss.item())
    write_json(
        run_dir / CONFIG,
        {
            "model": "regression U-Net (L1)",
            "inputs": list(INPUTS),
            "run": asdict(rc),
            "train_patches": len(train_idx),
            "seconds": round(time.perf_counter() - t0, 1),
            "final_l1": float(np.mean(losses[-max(1, t.log_every) :])),
        },
    )
    save_weights(run_dir / WEIGHTS, ema)  # last: its presence marks a finished run
    return run_dir


def regression_map(run_dir: Path, spec: SlideSpec, out: Path, progress: bool = True) -> Path:
    """The regression U-Net's whole-slide map of one slide (needs CD31 and DAPI)."""
    run_dir = Path(run_dir)
    rc = RunConfig.from_dict(json.loads((run_dir / CONFIG).read_text())["run"])
    model = build(rc)
    load_weights(run_dir / WEIGHTS, model)
    model.eval()
    roles = [r for r in spec.roles if r != "target"]  # the order `predict`'s tiling keeps
    cols = [roles.index(r) for r in INPUTS]

    def predict(images: torch.Tensor, coords: np.ndarray, context: np.ndarray | None) -> torch.Tensor:
        return (model(_inputs(images, cols, context, rc)) + 1) / 2

    return patch_function_map(rc, spec.without("target"), out, predict, {"regression": str(run_dir)}, progress)
