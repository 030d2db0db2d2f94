"""Stage 2 of training: the DAMM U-Net on the autoencoders' latents (patch latents or crops of canvas
latents), one process or many (DDP). Batches, timesteps and noise of step k are pure functions of
(seed, k), so a resumed run continues on exactly the curve an uninterrupted one would have followed."""

from __future__ import annotations

import copy
import time

import torch

from wsi_damm.diffusion.damm import DammLoss, branch_conditions, damm_loss, divergence, per_sample_l1, select, use_multi
from wsi_damm.diffusion.schedule import NoiseSchedule
from wsi_damm.models.damm_unet import DammUNet
from wsi_damm.training.checkpoint import load_state, load_weights, save_checkpoint, save_weights
from wsi_damm.training.config import RunConfig
from wsi_damm.training.data import batch_rows, step_generator
from wsi_damm.training.gate_regions import GateByRegion
from wsi_damm.training.latent_canvas import PatchLatents
from wsi_damm.training.learning_rate import lr_at
from wsi_damm.training.loss_plot import plot_losses
from wsi_damm.training.run_dir import (
    METRIC_FIELDS,
    RunDir,
    build_optimizer,
    build_schedule,
    build_unet,
    read_metrics,
    write_metrics,
)
from wsi_damm.util.distributed import Ranks, data_parallel, parameter_checksums
from wsi_damm.util.files import write_json
from wsi_damm.util.precision import autocast, grad_scaler
from wsi_damm.util.progress import progress_bar


@torch.no_grad()
def validate(model: DammUNet, latents: PatchLatents, sched: NoiseSchedule, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """ε-loss on validation latents at fixed timesteps and noise (comparable across steps; canvas crops unmoved)."""
    n = len(latents)
    if n == 0:
        return {}
    g = step_generator(cfg.train.seed, 0, 99)
    t_all = torch.randint(0, sched.T, (n,), generator=g)
    noise_all = torch.randn((n,) + latents.sample_shape, generator=g)
    totals = {"val_loss": 0.0, "val_l_uni": 0.0, "val_l_multi": 0.0, "val_multi_share": 0.0}
    for i in range(0, n, 64):
        rows = torch.arange(i, min(i + 64, n))
        noise = noise_all[rows].to(device)
        t = t_all[rows]
        lat = latents.batch(rows.numpy())
        z0 = lat["target"]
        z_t = sched.q_sample(z0, t.to(device), noise)
        if cfg.schedule.objective == "v":
            noise = sched.v_target(z0, t.to(device), noise)  # the regression target of this objective
        c_uni, c_multi = branch_conditions(lat["vessels"], lat["nuclei"], cfg.model.uni_branch)
        eps_uni, eps_multi, kappa = model(z_t, t.to(device), c_uni, c_multi)
        multi = use_multi(divergence(kappa), cfg.damm.gamma, cfg.damm.dammp)
        eps = select(eps_uni, eps_multi, multi)
        totals["val_loss"] += per_sample_l1(eps, noise).sum().item()
        totals["val_l_uni"] += per_sample_l1(eps_uni, noise).sum().item()
        totals["val_l_multi"] += per_sample_l1(eps_multi, noise).sum().item()
        totals["val_multi_share"] += multi.float().sum().item()
    return {k: v / n for k, v in totals.items()}


def train_diffusion(
    latents: PatchLatents,
    val_latents: PatchLatents,
    run: RunDir,
    cfg: RunConfig,
    ranks: Ranks,
    resume: bool,
    progress: bool,
    stop_after: int | None = None,
    regions: tuple[torch.Tensor, dict[int, str]] | None = None,
) -> DammUNet:
    """`regions`: a label per training patch and the labels' names; the DFL label rate and mean κ per
    region are then logged with the metrics (rank 0's samples)."""
    t_cfg = cfg.train
    by_region = GateByRegion(regions[1]) if regions is not None else None
    fields = METRIC_FIELDS + (by_region.columns if by_region else [])
    sched = build_schedule(cfg.schedule)
    loss_cfg = DammLoss(
        cfg.damm.gamma, cfg.damm.alpha, cfg.damm.beta, cfg.damm.dammp, cfg.damm.dfl, cfg.damm.multi_loss == "always", cfg.damm.loss == "l2"
    )
    torch.manual_seed(t_cfg.seed)
    model = build_unet(cfg).to(ranks.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = build_optimizer(model.parameters(), t_cfg.lr, t_cfg.weight_decay)
    scaler = grad_scaler(ranks.device, t_cfg.amp)  # fp16 only
    states = {"optimizer": opt, **({"scaler": scaler} if scaler is not None else {})}  # checkpointed together
    start = 0
    rows: list[dict] = []
    last = run.last_checkpoint(run.ckpt) if resume else None
    if last is not None:
        load_weights(last / "unet.safetensors", model, ranks.device)
        load_weights(last / "unet_ema.safetensors", ema, ranks.device)
        state = load_state(last / "state.pt")
        for key, obj in states.items():
            obj.load_state_dict(state[key])
        start = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        rows = [r for r in read_metrics(run.metrics) if int(r["step"]) <= start]  # rows are logged after a step
    if t_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        ema = ema.to(memory_format=torch.channels_last)
    net = data_parallel(model, ranks)
    fwd = torch.compile(net) if t_cfg.compile else net
    amp = t_cfg.amp
    warmup_steps = int(round(cfg.damm.warmup_fraction * t_cfg.steps))
    n = len(latents)
    micro = t_cfg.batch_size // t_cfg.grad_accum
    end = t_cfg.steps if stop_after is None else min(t_cfg.steps, stop_after)
    bar = progress_bar(
        range(start, end),
        initial=start,
        total=t_cfg.steps,
        desc="diffusion",
        unit="step",
        disable=None if (progress and ranks.main) else True,
    )
    t0, last_t, last_step = time.perf_counter(), time.perf_counter(), start
    for step in bar:
        warm = step < warmup_steps
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        sel = batch_rows(n, t_cfg.batch_size * ranks.world, step, t_cfg.seed)
        g = step_generator(t_cfg.seed, step, 1)
        t_all = torch.randint(0, sched.T, (len(sel),), generator=g)
        noise_all = torch.randn((len(sel),) + latents.sample_shape, generator=g)
        shifts = latents.offsets(sel, step_generator(t_cfg.seed, step, 5))  # canvas latents: where each crop is cut
        mine = slice(ranks.rank * t_cfg.batch_size, (ranks.rank + 1) * t_cfg.batch_size)
        opt.zero_grad(set_to_none=True)
        logs: dict[str, torch.Tensor] = {}
        for k in range(t_cfg.grad_accum):
            part = slice(mine.start + k * micro, mine.start + (k + 1) * micro)
            rows_b = torch.from_numpy(sel[part])
            noise, t = noise_all[part].to(ranks.device), t_all[part].to(ranks.device)
            lat = latents.batch(sel[part], shifts[part])
            z0 = lat["target"]
            z_t = sched.q_sample(z0, t, noise)
            target = sched.v_target(z0, t, noise) if cfg.schedule.objective == "v" else noise
            c_uni, c_multi = branch_conditions(lat["vessels"], lat["nuclei"], cfg.model.uni_branch)
            if t_cfg.channels_last:
                z_t, c_uni, c_multi = (x.contiguous(memory_format=torch.channels_last) for x in (z_t, c_uni, c_multi))
            with autocast(ranks.device, amp):
                eps_uni, eps_multi, kappa = fwd(z_t, t, c_uni, c_multi, use_confidence=not warm)
            weights = sched.min_snr_weights(t, cfg.damm.min_snr, cfg.schedule.objective).to(ranks.device) if cfg.damm.min_snr else None
            loss, stats = damm_loss(eps_uni, eps_multi, kappa, target, loss_cfg, warmup=warm, weights=weights)
            if by_region is not None and eps_multi is not None and kappa is not None:
                by_region.add(regions[0][rows_b], eps_uni.detach(), eps_multi.detach(), kappa.detach(), target)
            scaled = loss / t_cfg.grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            logs = stats
        if scaler is not None:
            scaler.unscale_(opt)  # clip the true gradients
        if t_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t_cfg.grad_clip)
        if scaler is not None:
            scaler.step(opt)  # skipped when the scaled gradients overflowed
            scaler.update()
        else:
            opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - t_cfg.ema_decay)
        done = step + 1
        if ranks.main and (done % t_cfg.log_every == 0 or done == t_cfg.steps or done % t_cfg.val_every == 0):
            now = time.perf_counter()
            row = {
                "step": done,
                "phase": "warmup" if warm else "dammp",
                "lr": lr_at(step, cfg),
                "steps_per_s": (done - last_step) / max(now - last_t, 1e-9),
                **{k: float(v) for k, v in logs.items()},
                **(by_region.row() if by_region is not None else {}),
            }
            last_t, last_step = now, done
            if done % t_cfg.val_every == 0 or done == t_cfg.steps:
                row.update(validate(ema.eval(), val_latents, sched, cfg, ranks.device))
            rows.append(row)
            bar.set_postfix({"loss": f"{row['loss']:.4f}", **({"val": f"{row['val_loss']:.4f}"} if "val_loss" in row else {})})
        if ranks.main and (done % t_cfg.checkpoint_every == 0 or done == end):
            save_checkpoint(run.ckpt, done, {"unet": model, "unet_ema": ema}, states, lambda: write_metrics(run.metrics, rows, fields))
        elif ranks.main and t_cfg.metrics_every and done % t_cfg.metrics_every == 0:
            write_metrics(run.metrics, rows, fields)  # watchable between checkpoints; a resume drops rows past its checkpoint
    checksums = parameter_checksums(model, ranks) if ranks.world > 1 else None
    if ranks.main and end == t_cfg.steps:
        save_weights(run.unet, ema, {"steps": t_cfg.steps})
        save_weights(run.unet_raw, model, {"steps": t_cfg.steps})
        write_json(
            run.state,
            {
                "steps_done": end,
                "seconds": time.perf_counter() - t0,
                "world_size": ranks.world,
                **({"ddp_param_checksums": checksums} if checksums else {}),
            },
        )
        plot_losses(run)
    return ema
