"""`wsi-damm train`: stage 1 per-modality autoencoders, stage 2 DAMM U-Net on cached latents.

One process or many (`torchrun`, DDP: gloo on CPU, nccl on CUDA). Batches, timesteps and noise
of step k are pure functions of (seed, k), so `--resume` from a checkpoint continues on exactly
the curve an uninterrupted run would have followed. Rank 0 writes; others only compute.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from ..autoencoder_check import MIN_CEILING_R, MIN_CEILING_SPREAD, describe, measure_ceilings
from ..checkpoint import load_state, load_weights, save_state, save_weights
from ..config import SPARSE_BELOW, RunConfig, with_sparse_choice
from ..context import to_latent_grid
from ..diffusion.damm import DammLoss, branch_conditions, damm_loss, divergence, per_sample_l1, select, use_multi
from ..diffusion.schedule import NoiseSchedule
from ..distributed import Ranks, average_gradients, data_parallel, parameter_checksums, setup_ranks
from ..errors import InputError
from ..files import write_csv, write_json
from ..gate_regions import GateByRegion, draw_gate_by_region
from ..heap import reusing_freed_memory
from ..latent_canvas import LatentCanvases, PatchLatents
from ..learning_rate import decay_factor, lr_at
from ..models.autoencoder import Autoencoder
from ..models.damm_unet import DammUNet
from ..np_units import NpScale
from ..precision import autocast, grad_scaler
from ..progress import progress_bar
from ..run_dir import (
    METRIC_FIELDS,
    ROLES_NEEDED,
    RunDir,
    build_autoencoder,
    build_optimizer,
    build_schedule,
    build_unet,
    load_autoencoders,
    load_run_config,
    read_metrics,
    write_metrics,
)
from ..store import PatchStore
from ..training_data import PatchImages, batch_rows, split_of, step_generator

AE_WARMUP_STEPS = 50

LOG = logging.getLogger("wsi_damm.train")


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
            _checkpoint(
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
    `context_span`, each condition role's latent is followed by its context channel (`wsi_damm.context`)."""
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
            loss, stats = damm_loss(eps_uni, eps_multi, kappa, target, loss_cfg, warmup=warm)
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
            _checkpoint(run.ckpt, done, {"unet": model, "unet_ema": ema}, states, lambda: write_metrics(run.metrics, rows, fields))
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


def _checkpoint(
    ckpt: Path,
    step: int,
    weights: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer | torch.amp.GradScaler],
    write_rows,
) -> None:
    """Step k's weights and state go into a folder of their own; `latest.json` is switched to it last
    (one atomic rename), so a kill at any instant leaves the previous checkpoint whole and named.
    Both stages checkpoint this way: `weights` name → module, `optimizers` state key → optimiser."""
    folder = ckpt / f"step_{step:09d}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in weights.items():
        save_weights(folder / f"{name}.safetensors", module, {"step": step})
    save_state(
        folder / "state.pt", {"step": step, **{k: o.state_dict() for k, o in optimizers.items()}, "torch_rng": torch.get_rng_state()}
    )
    write_rows()  # the metrics so far; rows beyond the named step are dropped on resume
    write_json(ckpt / "latest.json", {"step": step, "folder": folder.name})
    for old in ckpt.glob("step_*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


def plot_losses(run: RunDir) -> None:
    """loss.png: training and validation ε-loss per branch, the gate's multi-modal share, mean κ, and —
    for a store with region labels — the DFL label rate and mean κ per region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run.metrics)
    if not rows:
        return
    validation = json.loads(run.validation.read_text())["description"] if run.validation.exists() else None
    col = lambda k: [(r["step"], r[k]) for r in rows if r.get(k) not in ("", None)]  # noqa: E731
    regions = [k.removeprefix("dfl_label_rate_") for k in rows[0] if k.startswith("dfl_label_rate_")]
    fig, axes = plt.subplots(1, 3 if regions else 2, figsize=(16.5 if regions else 11, 4))
    ax1, ax2 = axes[:2]
    for key, label, style in (
        ("loss", "train total", "-"),
        ("l_uni", "train uni", ":"),
        ("l_multi", "train multi", ":"),
        ("val_loss", "val (gated)", "o-"),
        ("val_l_uni", "val uni", "s--"),
        ("val_l_multi", "val multi", "^--"),
    ):
        pts = col(key)
        if pts:
            ax1.plot(*zip(*pts), style, label=label, ms=3)
    ax1.set(xlabel="step", ylabel="L1 ε-loss", title="Diffusion loss", yscale="log")
    ax1.legend(fontsize=8)
    for key, label in (
        ("multi_share", "gate: multi-modal share (train)"),
        ("val_multi_share", "gate: multi-modal share (val)"),
        ("mean_kappa", "mean confidence κ"),
    ):
        pts = col(key)
        if pts:
            ax2.plot(*zip(*pts), label=label)
    warm = [r["step"] for r in rows if r.get("phase") == "warmup"]
    if warm:
        ax2.axvspan(0, max(warm), color="0.9", label="warm-up (plain cross-attention)")
    ax2.set(xlabel="step", ylim=(-0.05, 1.05), title="DAMMP gate")
    ax2.legend(fontsize=8)
    if regions and draw_gate_by_region(axes[2], rows, load_run_config(run).damm.gamma):  # what the DFL teaches the gate, per region
        axes[2].set(title="gate by region (training batches)")
        axes[2].legend(fontsize=8)
    if validation:
        fig.suptitle(validation, fontsize=9)
    fig.tight_layout()
    fig.savefig(run.path / "loss.png", dpi=110)
    plt.close(fig)


def bright_fraction(store: PatchStore, rows: np.ndarray, channel: int, most: int = 512) -> float:
    """The share of the target's pixels above 0.1 (in the store's [0, 1] normalisation) over up to `most` evenly
    spaced patches of `rows`: how sparse the stain is (`autoencoder.sparse_target = "auto"` decides by it)."""
    if not len(rows):
        return 1.0
    pick = rows[np.unique(np.linspace(0, len(rows) - 1, min(len(rows), most)).round().astype(np.int64))]
    images = PatchImages(store, pick)
    return float(
        sum(int((images.get(np.arange(i, min(i + 64, len(pick))))[:, channel] > -0.8).sum()) for i in range(0, len(pick), 64))
        / (len(pick) * int(store.attrs["patch_size"]) ** 2)
    )


def with_store_tiling(cfg: RunConfig, store: PatchStore) -> RunConfig:
    """`cfg` with what the store's tiling fixed (patch size, roles, resolution, percentiles, NP units): what
    `predict` later tiles new slides by."""
    a = store.attrs
    return replace(
        cfg,
        patch_size=int(a["patch_size"]),
        roles=tuple(store.roles),
        mpp=a.get("mpp"),
        level=a.get("level"),
        store_dtype=str(store.images.dtype),
        percentiles=tuple(a.get("percentiles", (0.5, 99.8))),
        tissue=a.get("tissue", "auto"),
        np_scale=NpScale.from_attrs(a.get("np_normalisation")),
    )


def run_training(
    store_path: Path,
    out: Path,
    cfg: RunConfig,
    stage: str = "all",
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    force: bool = False,
    log=None,
) -> RunDir:
    """Train the autoencoders, the diffusion model or both ("all") into `out`, with freed memory kept on
    the heap for the next step (every step allocates the same activations again). Before the diffusion
    stage each autoencoder's ceiling on the validation patches is checked (`autoencoder_check`): a collapsed
    one stops the run, unless `force` or `autoencoder.on_collapse = "warn"`, which go on and say so through
    `log` (default: warnings)."""
    with reusing_freed_memory():
        return _run_training(store_path, out, cfg, stage, resume, progress, stop_after, force, log)


def canvas_rows(store: PatchStore, store_path: Path, factor: int) -> np.ndarray:
    """Which patches canvas latents can train on: those with corners on the autoencoder's pixel grid. With a stride
    on that grid only the rows and columns flush with a border off it are not (their pixels lie in their on-grid
    neighbours, which `tile` adds beside them); a stride off it is refused before any training, with the command
    that tiles the slides anew."""
    coords = store.coords
    on_grid = ~(coords[:, 1:] % factor).any(1)
    patch, stride = int(store.attrs["patch_size"]), int(store.attrs["stride"])
    if stride % factor == 0:
        return on_grid
    s, y, x = (int(v) for v in coords[int(np.argmin(on_grid))])
    paths = " ".join(dict.fromkeys(ch["path"] for sl in store.slides for ch in sl["channels"].values()))
    mpp = f" --mpp {store.attrs['mpp']}" if store.attrs.get("mpp") else ""
    raise InputError(
        store_path,
        f"has {int((~on_grid).sum())} of {len(coords)} patch corners off the autoencoder's {factor}-pixel grid (first: slide {s} at y {y}, "
        f"x {x}), which training on canvas latents needs: "
        f"its stride ({patch} − {patch - stride} = {stride} px) is not a multiple of {factor}",
        f"tile again: wsi-damm tile {paths} --out NEW.zarr --patch-size {patch} --overlap {patch - stride // factor * factor}{mpp}; "
        "or train on patch latents: --latents patch --no-ae-local",
    )


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


def _run_training(
    store_path: Path,
    out: Path,
    cfg: RunConfig,
    stage: str,
    resume: bool,
    progress: bool,
    stop_after: int | None,
    force: bool = False,
    log=None,
) -> RunDir:
    ranks = setup_ranks(cfg.train.device, cfg.train.dist_timeout_min)
    store = PatchStore.open(store_path)
    roles = store.roles
    missing = [r for r in ROLES_NEEDED if r not in roles]
    if missing:
        raise InputError(store_path, f"has no {', '.join(missing)} channel; training needs vessels, nuclei and target")
    if cfg.model.context_span and not store.context_roles:
        raise InputError(
            store_path, "has no context images, which model.context_span needs (tiled by an older wsi-damm)", "tile the slides again"
        )
    patch = int(store.attrs["patch_size"])
    if patch % max(1, cfg.autoencoder.factor * 2 ** (len(cfg.model.channels) - 1)):
        raise InputError(store_path, f"patch size {patch} is not divisible by autoencoder factor × U-Net downsampling")
    usable = canvas_rows(store, store_path, cfg.autoencoder.factor) if cfg.model.latents == "canvas" else np.ones(len(store), bool)
    run = RunDir(out)
    cfg = with_store_tiling(cfg, store)
    if run.config.exists():
        previous = load_run_config(run)
        if previous.patch_size != patch:
            raise InputError(out, f"was trained on {previous.patch_size}-px patches but the store has {patch}-px patches")
        if resume:
            cfg = previous  # a resumed run continues exactly the run it was
        elif stage == "diffusion":
            cfg = replace(cfg, autoencoder=previous.autoencoder)  # reuses the trained autoencoders
    split = split_of(store, cfg.train)
    train_idx, val_idx = split.train[usable[split.train]], split.val[usable[split.val]]
    if not usable.all():
        (log or LOG.info)(
            f"{store_path}: {int((~usable).sum())} patches flush with a slide border off the autoencoder's "
            f"{cfg.autoencoder.factor}-pixel grid are left out of training on canvas latents (their on-grid neighbours cover them)"
        )
    if cfg.autoencoder.sparse_target != "no" and cfg.autoencoder.target_bright_fraction is None:
        if cfg.autoencoder.sparse_target == "auto" and (stage == "diffusion" or (resume and run.config.exists())):
            cfg = with_sparse_choice(cfg, False)  # a run from before the choice existed keeps the recipe it was trained with
        else:
            fraction = bright_fraction(store, train_idx, roles.index("target"))
            cfg = with_sparse_choice(cfg, cfg.autoencoder.sparse_target == "yes" or fraction < SPARSE_BELOW, fraction)
    cfg = replace(cfg, train=replace(cfg.train, val_split=split.kind if split.kind != "none" else cfg.train.val_split))
    if cfg.train.epochs:
        steps = cfg.train.epochs * max(1, len(train_idx) // (cfg.train.batch_size * ranks.world))
        cfg = replace(cfg, train=replace(cfg.train, steps=steps, epochs=None))
    if ranks.main:
        run.path.mkdir(parents=True, exist_ok=True)
        write_json(run.config, asdict(cfg))
        write_json(
            run.validation,
            {
                "kind": split.kind,
                "description": split.description,
                "cuts": split.cuts,
                "train_patches": len(train_idx),
                "val_patches": len(val_idx),
            },
        )
    images = PatchImages(store, train_idx)
    trained = stage in ("autoencoder", "all") and not (resume and all(run.autoencoder(r).exists() for r in ROLES_NEEDED))
    if trained:
        aes = train_autoencoders(images, roles, run, cfg, ranks, progress, resume)
    else:
        aes = load_autoencoders(run, cfg, ranks.device)
    if trained or stage != "autoencoder" or not run.ae_ceiling.exists():
        go_on = "--force" if force else ('autoencoder.on_collapse = "warn"' if cfg.autoencoder.on_collapse == "warn" else None)
        check_autoencoders(run, aes, store, val_idx, train_idx, roles, ranks, stage != "autoencoder", go_on, log)
    if stage == "autoencoder":
        return run
    for ae in aes.values():
        ae.eval()
    span = cfg.model.context_span
    if cfg.model.latents == "canvas":
        encoders, channel = {r: aes[r].encode for r in ROLES_NEEDED}, {r: roles.index(r) for r in ROLES_NEEDED}

        def canvases(idx: np.ndarray, imgs: PatchImages) -> LatentCanvases:
            context = (lambda rows, origins: store.context_windows(idx[rows], span, origins)) if span else None
            return LatentCanvases(
                imgs.get,
                store.coords[idx],
                encoders,
                channel,
                cfg.autoencoder.factor,
                patch,
                ranks.device,
                store_path,
                context,
                tuple(store.context_roles),
            )

        source, val_source = canvases(train_idx, images), canvases(val_idx, PatchImages(store, val_idx))
    else:
        latents = encode_all(images, roles, aes, ranks.device, context_span=span)
        val_latents = (
            encode_all(PatchImages(store, val_idx), roles, aes, ranks.device, context_span=span)
            if len(val_idx)
            else {r: latents[r][:0] for r in ROLES_NEEDED}
        )
        source, val_source = PatchLatents(latents), PatchLatents(val_latents)
    regions = None
    if "region" in store.root and store.attrs.get("region_names"):
        names = {int(k): v for k, v in store.attrs["region_names"].items()}
        regions = (torch.from_numpy(np.asarray(store.root["region"][:])[train_idx].astype(np.int64)), names)
    train_diffusion(source, val_source, run, cfg, ranks, resume, progress, stop_after, regions)
    return run
