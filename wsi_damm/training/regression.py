"""`train --model regression`: the L1 U-Net a lab would train instead of a diffusion model (CARE-style: the
pix2pix generator without its GAN), CD31 and DAPI → the target, in pixel space, on the same patches, batches,
learning-rate schedule, gradient clipping and EMA as the diffusion stage. Checkpointed like it (an atomic
`latest.json`), so a killed run resumes on the same curve; its run directory is read by `predict` like DAMM's."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from wsi_damm.models.regression import RegressionUNet
from wsi_damm.tiling.context import to_latent_grid
from wsi_damm.training.checkpoint import load_state, load_weights, save_checkpoint, save_weights
from wsi_damm.training.config import RunConfig
from wsi_damm.training.data import PatchImages, batch_rows
from wsi_damm.training.learning_rate import lr_at
from wsi_damm.training.loss_plot import plot_losses
from wsi_damm.training.run_dir import RunDir, build_optimizer, read_metrics, write_metrics
from wsi_damm.util.distributed import Ranks, average_gradients
from wsi_damm.util.files import write_json
from wsi_damm.util.heap import reusing_freed_memory
from wsi_damm.util.progress import progress_bar

INPUTS = ("vessels", "nuclei")  # what the U-Net reads, in this order
FIELDS = ["step", "lr", "loss", "val_loss", "steps_per_s"]
DOWNSAMPLING = 8  # the U-Net's total downsampling (four levels): patch sides must be multiples of it


def build_regression(rc: RunConfig) -> RegressionUNet:
    """CD31 and DAPI, each followed by its context window on the patch's grid when the run uses context —
    the same information the diffusion model conditions on."""
    return RegressionUNet(len(INPUTS) * (2 if rc.model.context_span else 1))


def regression_inputs(images: torch.Tensor, cols: list[int], context: np.ndarray | None, rc: RunConfig, margin: int = 0) -> torch.Tensor:
    """The U-Net's input from patches (B, C, P, P) in [-1, 1] (`cols`: where CD31 and DAPI sit) and their context;
    patches grown by `margin` px on every side get their context on the P × P centre, as in training, its edge values
    repeated across the margin."""
    x = images[:, cols]
    if not rc.model.context_span:
        return x
    ctx = to_latent_grid(context, x.shape[-1] - 2 * margin, x.device)
    return torch.cat([x, torch.nn.functional.pad(ctx, (margin,) * 4, mode="replicate") if margin else ctx], 1)


@torch.no_grad()
def validation_l1(model: RegressionUNet, images: PatchImages, roles: list[str], rc: RunConfig, device: torch.device) -> float | None:
    """Mean L1 on the validation patches (None without any)."""
    if len(images) == 0:
        return None
    cols, target = [roles.index(r) for r in INPUTS], roles.index("target")
    total = 0.0
    for a in range(0, len(images), 64):
        rows = np.arange(a, min(a + 64, len(images)))
        x = images.get(rows).to(device)
        context = images.context(rows, rc.model.context_span) if rc.model.context_span else None
        total += float(F.l1_loss(model(regression_inputs(x, cols, context, rc)), x[:, target : target + 1], reduction="sum"))
    return total / (len(images) * images.get(np.arange(1)).shape[-1] ** 2)


def train_regression(
    images: PatchImages,
    val_images: PatchImages,
    roles: list[str],
    run: RunDir,
    rc: RunConfig,
    ranks: Ranks,
    resume: bool,
    progress: bool,
    stop_after: int | None = None,
) -> RegressionUNet:
    """Train, validate every `train.val_every` steps, checkpoint every `train.checkpoint_every`; the EMA weights
    are the run's (`RunDir.regression`). `stop_after`: stop once that many steps are done (tests of resume)."""
    t = rc.train
    torch.manual_seed(t.seed)
    cols, target = [roles.index(r) for r in INPUTS], roles.index("target")
    model = build_regression(rc).to(ranks.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = build_optimizer(model.parameters(), t.lr, t.weight_decay)
    start, rows_logged = 0, []
    last = run.last_checkpoint() if resume else None
    if last is not None:
        state = load_state(last / "state.pt")
        load_weights(last / "regression.safetensors", model, ranks.device)
        load_weights(last / "regression_ema.safetensors", ema, ranks.device)
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        rows_logged = [r for r in read_metrics(run.metrics) if int(r["step"]) <= start]
    end = t.steps if stop_after is None else min(t.steps, stop_after)
    quiet = None if (progress and ranks.main) else True
    bar = progress_bar(range(start, end), initial=start, total=t.steps, desc="regression U-Net", unit="step", disable=quiet)
    losses, t0 = [], time.perf_counter()
    with reusing_freed_memory():  # each step allocates the same full-resolution activations again
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, rc)
            sel = batch_rows(len(images), t.batch_size * ranks.world, step, t.seed)
            sel = sel[ranks.rank * t.batch_size : (ranks.rank + 1) * t.batch_size]
            x = images.get(sel).to(ranks.device)
            context = images.context(sel, rc.model.context_span) if rc.model.context_span else None
            loss = F.l1_loss(model(regression_inputs(x, cols, context, rc)), x[:, target : target + 1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(model, ranks)
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - t.ema_decay)
            losses.append(loss.item())
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                row = {"step": done, "lr": lr_at(step, rc), "loss": float(np.mean(losses[-t.log_every :]))}
                row["steps_per_s"] = (done - start) / max(time.perf_counter() - t0, 1e-9)
                if done % t.val_every == 0 or done == t.steps:
                    row["val_loss"] = validation_l1(ema.eval(), val_images, roles, rc, ranks.device)
                rows_logged.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if ranks.main and done % t.checkpoint_every == 0 and done < t.steps:
                save_checkpoint(
                    run.ckpt,
                    done,
                    {"regression": model, "regression_ema": ema},
                    {"optimizer": opt},
                    lambda: write_metrics(run.metrics, rows_logged, FIELDS),
                )
    if ranks.main and end == t.steps:
        write_metrics(run.metrics, rows_logged, FIELDS)
        write_json(run.state, {"steps_done": t.steps, "model": "regression", "seconds": round(time.perf_counter() - t0, 1)})
        save_weights(run.regression, ema)  # last: its presence marks a finished run
        plot_losses(run)
    return ema
