"""Stage 1 of training: the three per-modality autoencoders stepped together, checkpointed and resumable,
their latents scaled to unit variance; the guard that measures each one's ceiling and refuses a collapsed one."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import torch

from wsi_damm.models.autoencoder import Autoencoder
from wsi_damm.tiling.context import to_latent_grid
from wsi_damm.tiling.store import PatchStore
from wsi_damm.training.autoencoder_check import MIN_CEILING_R, MIN_CEILING_SPREAD, describe, measure_ceilings
from wsi_damm.training.checkpoint import load_state, load_weights, save_checkpoint, save_weights
from wsi_damm.training.config import RunConfig
from wsi_damm.training.data import PatchImages, batch_rows
from wsi_damm.training.learning_rate import decay_factor
from wsi_damm.training.run_dir import (
    ROLES_NEEDED,
    RunDir,
    build_autoencoder,
    build_optimizer,
    read_metrics,
)
from wsi_damm.util.distributed import Ranks, average_gradients
from wsi_damm.util.errors import InputError
from wsi_damm.util.files import write_csv
from wsi_damm.util.progress import progress_bar

AE_WARMUP_STEPS = 50


def train_autoencoders(
    images: PatchImages, roles: list[str], run: RunDir, cfg: RunConfig, ranks: Ranks, progress: bool, resume: bool = False
) -> dict[str, Autoencoder]:
    """Three autoencoders stepped together on the same batches; latents scaled to unit variance.
    Checkpointed like the diffusion stage (every `checkpoint_every` steps), so a killed run resumes."""
    a = cfg.autoencoder
    torch.manual_seed(cfg.train.seed)
    aes = {r: build_autoencoder(cfg, r).to(ranks.device) for r in ROLES_NEEDED}
    if a.factor == 1:
        if ranks.main:
            for r, ae in aes.items():
                save_weights(run.autoencoder(r), ae, {"role": r, "factor": 1})
        return aes
    if any(ae.standardises for ae in aes.values()):
        probe = images.get(np.unique(np.linspace(0, len(images) - 1, min(len(images), 512)).round().astype(np.int64)))
        for r, ae in aes.items():
            ae.standardise_on(probe[:, roles.index(r) : roles.index(r) + 1].to(ranks.device))
        del probe
    opts = {r: build_optimizer(ae.parameters(), a.lr, a.weight_decay) for r, ae in aes.items()}
    rows: list[dict] = []
    start = 0
    last = run.last_checkpoint(run.ae_ckpt) if resume else None
    if last is not None:  # every step reseeds its own RNG: weights, optimisers and the step are the whole state
        state = load_state(last / "state.pt")
        for r in ROLES_NEEDED:
            load_weights(last / f"autoencoder_{r}.safetensors", aes[r], ranks.device)
            opts[r].load_state_dict(state[f"optimizer_{r}"])
        start = int(state["step"])
        rows = [r for r in read_metrics(run.ae_metrics) if int(r["step"]) < start]
    bar = progress_bar(
        range(start, a.steps),
        initial=start,
        total=a.steps,
        desc="autoencoders",
        unit="step",
        disable=None if (progress and ranks.main) else True,
    )
    for step in bar:
        sel = batch_rows(len(images), a.batch_size * ranks.world, step, cfg.train.seed + 17)
        x = images.get(sel[ranks.rank * a.batch_size : (ranks.rank + 1) * a.batch_size]).to(ranks.device)
        lr = a.lr * min(1.0, (step + 1) / AE_WARMUP_STEPS) * decay_factor(step, AE_WARMUP_STEPS, a.steps, a.lr_schedule)
        logs = {"step": step, "lr": lr}
        for r in ROLES_NEEDED:
            for group in opts[r].param_groups:
                group["lr"] = lr
            torch.manual_seed((cfg.train.seed * 7919 + step) * 3 + ROLES_NEEDED.index(r))
            k = roles.index(r)
            loss, stats = aes[r].loss(x[:, k : k + 1], a.kl_weight, a.ssim_weight)
            opts[r].zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(aes[r], ranks)
            opts[r].step()
            logs[f"{r}_l1"] = float(stats["l1"])
        rows.append(logs)
        if step % 10 == 0:
            bar.set_postfix({k.split("_")[0]: f"{v:.3f}" for k, v in logs.items() if k not in ("step", "lr")})
        if ranks.main and (step + 1) % cfg.train.checkpoint_every == 0 and step + 1 < a.steps:
            save_checkpoint(
                run.ae_ckpt,
                step + 1,
                {f"autoencoder_{r}": aes[r] for r in ROLES_NEEDED},
                {f"optimizer_{r}": opts[r] for r in ROLES_NEEDED},
                lambda: write_csv(run.ae_metrics, rows, list(rows[0])),
            )
    with torch.no_grad():
        probe = images.get(np.arange(min(len(images), 512)))
        for r, ae in aes.items():
            ae.eval()
            z = torch.cat(
                [ae.moments(probe[i : i + 64, roles.index(r) : roles.index(r) + 1].to(ranks.device))[0] for i in range(0, len(probe), 64)]
            )
            ae.scale.fill_(1.0 / max(float(z.std()), 1e-6))
            ae.refit_on(probe[:, roles.index(r) : roles.index(r) + 1].to(ranks.device))
    if ranks.main:
        for r, ae in aes.items():
            save_weights(run.autoencoder(r), ae, {"role": r, "factor": a.factor})
        write_csv(run.ae_metrics, rows, list(rows[0]) if rows else ["step"])
        shutil.rmtree(run.ae_ckpt, ignore_errors=True)  # the stage is done: its weights are the run's
    return aes


@torch.no_grad()
def encode_all(
    images: PatchImages, roles: list[str], aes: dict[str, Autoencoder], device: torch.device, batch: int = 64, context_span: int = 0
) -> dict[str, torch.Tensor]:
    """Latents of every patch, per role, kept on `device` (encoded once: the big stage-2 speed-up). With
    `context_span`, each condition role's latent is followed by its context channel (`wsi_damm.tiling.context`)."""
    out: dict[str, list[torch.Tensor]] = {r: [] for r in ROLES_NEEDED}
    for i in range(0, len(images), batch):
        rows = np.arange(i, min(i + batch, len(images)))
        x = images.get(rows).to(device)
        z = {r: aes[r].encode(x[:, roles.index(r) : roles.index(r) + 1]) for r in ROLES_NEEDED}
        if context_span:
            ctx = to_latent_grid(images.context(rows, context_span), z["target"].shape[-1], device)
            for k, r in enumerate(images.store.context_roles):
                z[r] = torch.cat([z[r], ctx[:, k : k + 1]], 1)
        for r in ROLES_NEEDED:
            out[r].append(z[r])
    return {r: torch.cat(v) for r, v in out.items()}


COLLAPSE_HINT = (
    "train the autoencoders longer (--ae-steps) or with another --seed; on a sparse stain try autoencoder.sparse_target "
    '= "yes" in a --config TOML; check the channel mapping; --force trains the diffusion model regardless'
)


def check_autoencoders(
    run: RunDir,
    aes: dict[str, Autoencoder],
    store: PatchStore,
    val_idx: np.ndarray,
    train_idx: np.ndarray,
    roles: list[str],
    ranks: Ranks,
    strict: bool,
    go_on: str | None,
    log,
) -> dict:
    """Measure every autoencoder's ceiling (on the validation patches; on the training patches when there are
    none, which the report says) into the run (rank 0 writes), then, when `strict`, refuse a collapsed one
    unless `go_on` names what lets it go on (--force or the config). Every rank decides alike, so none is left waiting in a collective."""
    which, idx = ("validation patches", val_idx) if len(val_idx) else ("training patches (the run has no validation patches)", train_idx)
    report = measure_ceilings(aes, PatchImages(store, idx), roles, ranks.device, which, run.ae_ceiling if ranks.main else None)
    if not report["collapsed"]:
        return report
    figures = "; ".join(describe(role, report["roles"][role]) for role in report["collapsed"])
    problem = (
        f"{figures} on the {which}: {'it has' if len(report['collapsed']) == 1 else 'they have'} collapsed "
        f"(r < {MIN_CEILING_R} or spread < {MIN_CEILING_SPREAD}×), and no diffusion model on such latents can do better"
    )
    if strict and not go_on:
        raise InputError(run.path, problem, COLLAPSE_HINT)
    if ranks.main:
        (log or warnings.warn)(
            f"{run.path}: {problem} — "
            + (f"going on because of {go_on}" if strict else "the diffusion stage will refuse this without --force")
        )
    return report
