"""`wsi-damm train`: stage 1 per-modality autoencoders, stage 2 DAMM U-Net on cached latents.

One process or many (`torchrun`, DDP: gloo on CPU, nccl on CUDA). Batches, timesteps and noise
of step k are pure functions of (seed, k), so `--resume` from a checkpoint continues on exactly
the curve an uninterrupted run would have followed. Rank 0 writes; others only compute.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import load_state, load_weights, save_json, save_state, save_weights
from .config import RunConfig
from .diffusion.damm import DammLoss, damm_loss, divergence, gate, per_sample_l1, use_multi
from .diffusion.schedule import NoiseSchedule
from .errors import InputError
from .models.autoencoder import Autoencoder
from .models.damm_unet import DammUNet, UNetShape
from .store import PatchStore
from .training_data import PatchImages, batch_rows, split_by_slide, step_generator

ROLES_NEEDED = ("vessels", "nuclei", "target")
METRIC_FIELDS = ["step", "phase", "lr", "loss", "l_uni", "l_multi", "dfl", "multi_share", "mean_kappa",
                 "val_loss", "val_l_uni", "val_l_multi", "val_multi_share", "steps_per_s"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", "cuda was requested but no CUDA device is available")
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return Dist(dist.get_rank(), world, device)
    return Dist(0, 1, torch.device("cuda") if cuda else torch.device("cpu"))


def build_unet(cfg: RunConfig) -> DammUNet:
    m = cfg.model
    shape = UNetShape(_latent_channels(cfg), tuple(m.channels), m.res_blocks, m.heads, m.dropout)
    return DammUNet(shape, m.mmfm, m.fusion, m.confidence_input, m.mmfm_reduction)


def build_autoencoder(cfg: RunConfig) -> Autoencoder:
    a = cfg.autoencoder
    return Autoencoder(a.factor, a.latent_channels, tuple(a.channels))


def _latent_channels(cfg: RunConfig) -> int:
    return 1 if cfg.autoencoder.factor == 1 else cfg.autoencoder.latent_channels


def _lr_at(step: int, cfg: RunConfig) -> float:
    t = cfg.train
    if step < t.lr_warmup_steps:
        return t.lr * (step + 1) / t.lr_warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = (step - t.lr_warmup_steps) / max(1, t.steps - t.lr_warmup_steps)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def _ddp(module: torch.nn.Module, d: Dist) -> torch.nn.Module:
    if d.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # the confidence head gets no gradient during warm-up, hence find_unused_parameters
    return DistributedDataParallel(module, device_ids=[d.device.index] if d.device.type == "cuda" else None, find_unused_parameters=True)


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.unet = self.path / "unet_ema.safetensors"
        self.unet_raw = self.path / "unet.safetensors"
        self.metrics = self.path / "metrics.csv"
        self.ae_metrics = self.path / "autoencoder_metrics.csv"
        self.ckpt = self.path / "checkpoints"
        self.state = self.path / "training_state.json"

    def autoencoder(self, role: str) -> Path:
        return self.path / f"autoencoder_{role}.safetensors"

    def last_checkpoint(self) -> Path | None:
        """The folder `latest.json` names: the newest checkpoint known to be complete."""
        latest = self.ckpt / "latest.json"
        if not latest.exists():
            return None
        try:
            folder = self.ckpt / json.loads(latest.read_text())["folder"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise InputError(latest, f"is not a checkpoint pointer ({exc})", "delete checkpoints/ to restart the diffusion stage") from exc
        if not folder.is_dir():
            raise InputError(latest, f"names {folder.name}, which is missing", "delete checkpoints/ to restart the diffusion stage")
        return folder


def load_run_config(run: RunDir) -> RunConfig:
    if not run.config.exists():
        raise InputError(run.path, "is not a wsi-damm run directory (no config.json)")
    try:
        return RunConfig.from_dict(json.loads(run.config.read_text()))
    except json.JSONDecodeError as exc:
        raise InputError(run.config, f"is not valid JSON: {exc}") from exc


def load_autoencoders(run: RunDir, cfg: RunConfig, device: torch.device | str = "cpu") -> dict[str, Autoencoder]:
    aes = {}
    for role in ROLES_NEEDED:
        ae = build_autoencoder(cfg)
        load_weights(run.autoencoder(role), ae, device)
        aes[role] = ae.to(device).eval()
    return aes


def train_autoencoders(images: PatchImages, roles: list[str], run: RunDir, cfg: RunConfig, d: Dist, progress: bool) -> dict[str, Autoencoder]:
    """Three autoencoders stepped together on the same batches; latents scaled to unit variance."""
    a = cfg.autoencoder
    torch.manual_seed(cfg.train.seed)
    aes = {r: build_autoencoder(cfg).to(d.device) for r in ROLES_NEEDED}
    if a.factor == 1:
        if d.main:
            for r, ae in aes.items():
                save_weights(run.autoencoder(r), ae, {"role": r, "factor": 1})
        return aes
    opts = {r: torch.optim.AdamW(ae.parameters(), lr=a.lr) for r, ae in aes.items()}
    rows = []
    bar = tqdm(range(a.steps), desc="autoencoders", unit="step", disable=None if (progress and d.main) else True)
    for step in bar:
        sel = batch_rows(len(images), a.batch_size * d.world, step, cfg.train.seed + 17)
        x = images.get(sel[d.rank * a.batch_size : (d.rank + 1) * a.batch_size]).to(d.device)
        logs = {"step": step}
        for r in ROLES_NEEDED:
            for group in opts[r].param_groups:
                group["lr"] = a.lr * min(1.0, (step + 1) / 50)
            torch.manual_seed((cfg.train.seed * 7919 + step) * 3 + ROLES_NEEDED.index(r))
            k = roles.index(r)
            loss, stats = aes[r].loss(x[:, k : k + 1], a.kl_weight, a.ssim_weight)
            opts[r].zero_grad(set_to_none=True)
            loss.backward()
            _average_gradients(aes[r], d)
            opts[r].step()
            logs[f"{r}_l1"] = float(stats["l1"])
        rows.append(logs)
        if step % 10 == 0:
            bar.set_postfix({k.split("_")[0]: f"{v:.3f}" for k, v in logs.items() if k != "step"})
    with torch.no_grad():
        probe = images.get(np.arange(min(len(images), 512)))
        for r, ae in aes.items():
            ae.eval()
            z = torch.cat([ae.moments(probe[i : i + 64, roles.index(r) : roles.index(r) + 1].to(d.device))[0] for i in range(0, len(probe), 64)])
            ae.scale.fill_(1.0 / max(float(z.std()), 1e-6))
    if d.main:
        for r, ae in aes.items():
            save_weights(run.autoencoder(r), ae, {"role": r, "factor": a.factor})
        _write_csv(run.ae_metrics, rows, list(rows[0]) if rows else ["step"])
    return aes


def _average_gradients(module: torch.nn.Module, d: Dist) -> None:
    """Data-parallel autoencoders: average gradients over ranks (they are small; no bucketing)."""
    if d.world == 1:
        return
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= d.world


@torch.no_grad()
def encode_all(images: PatchImages, roles: list[str], aes: dict[str, Autoencoder], device: torch.device, batch: int = 64) -> dict[str, torch.Tensor]:
    """Latents of every patch, per role, kept on `device` (encoded once: the big stage-2 speed-up)."""
    out: dict[str, list[torch.Tensor]] = {r: [] for r in ROLES_NEEDED}
    for i in range(0, len(images), batch):
        x = images.get(np.arange(i, min(i + batch, len(images)))).to(device)
        for r in ROLES_NEEDED:
            out[r].append(aes[r].encode(x[:, roles.index(r) : roles.index(r) + 1]))
    return {r: torch.cat(v) for r, v in out.items()}


def _conditions(latents: dict[str, torch.Tensor], rows, uni_branch: str) -> tuple[torch.Tensor, torch.Tensor]:
    v, n = latents["vessels"][rows], latents["nuclei"][rows]
    return (n, v) if uni_branch == "nuclei" else (v, n)


@torch.no_grad()
def validate(model: DammUNet, latents: dict[str, torch.Tensor], sched: NoiseSchedule, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """ε-loss on validation latents at fixed timesteps and noise (comparable across steps)."""
    n = latents["target"].shape[0]
    if n == 0:
        return {}
    g = step_generator(cfg.train.seed, 0, 99)
    t_all = torch.randint(0, sched.T, (n,), generator=g)
    noise_all = torch.randn(latents["target"].shape, generator=g)
    totals = {"val_loss": 0.0, "val_l_uni": 0.0, "val_l_multi": 0.0, "val_multi_share": 0.0}
    for i in range(0, n, 64):
        rows = torch.arange(i, min(i + 64, n))
        noise = noise_all[rows].to(device)
        t = t_all[rows]
        z0 = latents["target"][rows]
        z_t = sched.q_sample(z0, t.to(device), noise)
        if cfg.schedule.objective == "v":
            noise = sched.v_target(z0, t.to(device), noise)  # the regression target of this objective
        c_uni, c_multi = _conditions(latents, rows, cfg.model.uni_branch)
        eps_uni, eps_multi, kappa = model(z_t, t.to(device), c_uni, c_multi)
        d = divergence(kappa)
        eps = gate(eps_uni, eps_multi, d, cfg.damm.gamma) if cfg.damm.dammp else eps_multi
        totals["val_loss"] += per_sample_l1(eps, noise).sum().item()
        totals["val_l_uni"] += per_sample_l1(eps_uni, noise).sum().item()
        totals["val_l_multi"] += per_sample_l1(eps_multi, noise).sum().item()
        totals["val_multi_share"] += use_multi(d, cfg.damm.gamma).float().sum().item()
    return {k: v / n for k, v in totals.items()}


def train_diffusion(
    latents: dict[str, torch.Tensor],
    val_latents: dict[str, torch.Tensor],
    run: RunDir,
    cfg: RunConfig,
    d: Dist,
    resume: bool,
    progress: bool,
    stop_after: int | None = None,
) -> DammUNet:
    t_cfg = cfg.train
    sched = NoiseSchedule.make(cfg.schedule.kind, cfg.schedule.T, cfg.schedule.beta_start, cfg.schedule.beta_end)
    loss_cfg = DammLoss(cfg.damm.gamma, cfg.damm.alpha, cfg.damm.beta, cfg.damm.dammp, cfg.damm.dfl)
    torch.manual_seed(t_cfg.seed)
    model = build_unet(cfg).to(d.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
    start = 0
    rows: list[dict] = []
    last = run.last_checkpoint() if resume else None
    if last is not None:
        load_weights(last / "unet.safetensors", model, d.device)
        load_weights(last / "unet_ema.safetensors", ema, d.device)
        state = load_state(last / "state.pt")
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        rows = [r for r in _read_csv(run.metrics) if int(r["step"]) <= start]  # rows are logged after a step
    if t_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        ema = ema.to(memory_format=torch.channels_last)
    net = _ddp(model, d)
    fwd = torch.compile(net) if t_cfg.compile else net
    amp = t_cfg.amp
    warmup_steps = int(round(cfg.damm.warmup_fraction * t_cfg.steps))
    n = latents["target"].shape[0]
    micro = t_cfg.batch_size // t_cfg.grad_accum
    end = t_cfg.steps if stop_after is None else min(t_cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=t_cfg.steps, desc="diffusion", unit="step", disable=None if (progress and d.main) else True)
    t0, last_t, last_step = time.perf_counter(), time.perf_counter(), start
    for step in bar:
        warm = step < warmup_steps
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        sel = batch_rows(n, t_cfg.batch_size * d.world, step, t_cfg.seed)
        g = step_generator(t_cfg.seed, step, 1)
        t_all = torch.randint(0, sched.T, (len(sel),), generator=g)
        noise_all = torch.randn((len(sel),) + tuple(latents["target"].shape[1:]), generator=g)
        mine = slice(d.rank * t_cfg.batch_size, (d.rank + 1) * t_cfg.batch_size)
        opt.zero_grad(set_to_none=True)
        logs: dict[str, torch.Tensor] = {}
        for k in range(t_cfg.grad_accum):
            part = slice(mine.start + k * micro, mine.start + (k + 1) * micro)
            rows_b = torch.from_numpy(sel[part])
            noise, t = noise_all[part].to(d.device), t_all[part].to(d.device)
            z0 = latents["target"][rows_b]
            z_t = sched.q_sample(z0, t, noise)
            target = sched.v_target(z0, t, noise) if cfg.schedule.objective == "v" else noise
            c_uni, c_multi = _conditions(latents, rows_b, cfg.model.uni_branch)
            if t_cfg.channels_last:
                z_t, c_uni, c_multi = (x.contiguous(memory_format=torch.channels_last) for x in (z_t, c_uni, c_multi))
            with _autocast(d.device, amp):
                eps_uni, eps_multi, kappa = fwd(z_t, t, c_uni, c_multi, use_confidence=not warm)
            loss, stats = damm_loss(eps_uni, eps_multi, kappa, target, loss_cfg, warmup=warm)
            (loss / t_cfg.grad_accum).backward()
            logs = stats
        if t_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t_cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - t_cfg.ema_decay)
        done = step + 1
        if d.main and (done % t_cfg.log_every == 0 or done == t_cfg.steps or done % t_cfg.val_every == 0):
            now = time.perf_counter()
            row = {"step": done, "phase": "warmup" if warm else "dammp", "lr": _lr_at(step, cfg),
                   "steps_per_s": (done - last_step) / max(now - last_t, 1e-9), **{k: float(v) for k, v in logs.items()}}
            last_t, last_step = now, done
            if done % t_cfg.val_every == 0 or done == t_cfg.steps:
                row.update(validate(ema.eval(), val_latents, sched, cfg, d.device))
            rows.append(row)
            bar.set_postfix({"loss": f"{row['loss']:.4f}", **({"val": f"{row['val_loss']:.4f}"} if "val_loss" in row else {})})
        if d.main and (done % t_cfg.checkpoint_every == 0 or done == end):
            _checkpoint(run, model, ema, opt, done, rows)
    checksums = _ddp_checksums(model, d) if d.world > 1 else None
    if d.main and end == t_cfg.steps:
        save_weights(run.unet, ema, {"steps": t_cfg.steps})
        save_weights(run.unet_raw, model, {"steps": t_cfg.steps})
        save_json(run.state, {"steps_done": end, "seconds": time.perf_counter() - t0, "world_size": d.world,
                              **({"ddp_param_checksums": checksums} if checksums else {})})
        plot_losses(run)
    return ema


def _checkpoint(run: RunDir, model, ema, opt, step: int, rows: list[dict]) -> None:
    """Step k's weights and state go into a folder of their own; `latest.json` is switched to it last
    (one atomic rename), so a kill at any instant leaves the previous checkpoint whole and named."""
    folder = run.ckpt / f"step_{step:09d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / "unet.safetensors", model, {"step": step})
    save_weights(folder / "unet_ema.safetensors", ema, {"step": step})
    save_state(folder / "state.pt", {"step": step, "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()})
    _write_csv(run.metrics, rows, METRIC_FIELDS)  # rows beyond the named step are dropped on resume
    save_json(run.ckpt / "latest.json", {"step": step, "folder": folder.name})
    for old in run.ckpt.glob("step_*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


def _ddp_checksums(model: torch.nn.Module, d: Dist) -> list[float]:
    """All ranks must hold the same weights: a parameter checksum from every rank."""
    local = torch.tensor([sum(float(p.double().sum()) for p in model.parameters())], dtype=torch.float64)
    gathered = [torch.zeros_like(local) for _ in range(d.world)]
    dist.all_gather(gathered, local)
    return [float(x) for x in gathered]


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return [{k: (v if v in ("", None) or k == "phase" else int(v) if k == "step" else float(v)) for k, v in r.items()}
                for r in csv.DictReader(fh)]


def plot_losses(run: RunDir) -> None:
    """loss.png: training and validation ε-loss per branch, the gate's multi-modal share, mean κ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_csv(run.metrics)
    if not rows:
        return
    col = lambda k: [(r["step"], r[k]) for r in rows if r.get(k) not in ("", None)]  # noqa: E731
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, style in (("loss", "train total", "-"), ("l_uni", "train uni", ":"), ("l_multi", "train multi", ":"),
                              ("val_loss", "val (gated)", "o-"), ("val_l_uni", "val uni", "s--"), ("val_l_multi", "val multi", "^--")):
        pts = col(key)
        if pts:
            ax1.plot(*zip(*pts), style, label=label, ms=3)
    ax1.set(xlabel="step", ylabel="L1 ε-loss", title="Diffusion loss", yscale="log")
    ax1.legend(fontsize=8)
    for key, label in (("multi_share", "gate: multi-modal share (train)"), ("val_multi_share", "gate: multi-modal share (val)"), ("mean_kappa", "mean confidence κ")):
        pts = col(key)
        if pts:
            ax2.plot(*zip(*pts), label=label)
    warm = [r["step"] for r in rows if r.get("phase") == "warmup"]
    if warm:
        ax2.axvspan(0, max(warm), color="0.9", label="warm-up (plain cross-attention)")
    ax2.set(xlabel="step", ylim=(-0.05, 1.05), title="DAMMP gate")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run.path / "loss.png", dpi=110)
    plt.close(fig)


def run_training(
    store_path: Path,
    out: Path,
    cfg: RunConfig,
    stage: str = "all",
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> RunDir:
    d = setup_distributed(cfg.train.device)
    store = PatchStore.open(store_path)
    roles = store.roles
    missing = [r for r in ROLES_NEEDED if r not in roles]
    if missing:
        raise InputError(store_path, f"has no {', '.join(missing)} channel; training needs vessels, nuclei and target")
    patch = int(store.attrs["patch_size"])
    if patch % max(1, cfg.autoencoder.factor * 2 ** (len(cfg.model.channels) - 1)):
        raise InputError(store_path, f"patch size {patch} is not divisible by autoencoder factor × U-Net downsampling")
    run = RunDir(out)
    a = store.attrs
    cfg = replace(cfg, patch_size=patch, roles=tuple(roles), mpp=a.get("mpp"), level=a.get("level"),
                  store_dtype=str(store.images.dtype), percentiles=tuple(a.get("percentiles", (0.5, 99.8))))
    if run.config.exists():
        previous = load_run_config(run)
        if previous.patch_size != patch:
            raise InputError(out, f"was trained on {previous.patch_size}-px patches but the store has {patch}-px patches")
        if resume:
            cfg = previous  # a resumed run continues exactly the run it was
        elif stage == "diffusion":
            cfg = replace(cfg, autoencoder=previous.autoencoder)  # reuses the trained autoencoders
    train_idx, val_idx = split_by_slide(store, cfg.train.val_fraction, tuple(cfg.train.val_slides), cfg.train.seed)
    if cfg.train.epochs:
        steps = cfg.train.epochs * max(1, len(train_idx) // (cfg.train.batch_size * d.world))
        cfg = replace(cfg, train=replace(cfg.train, steps=steps, epochs=None))
    if d.main:
        run.path.mkdir(parents=True, exist_ok=True)
        save_json(run.config, asdict(cfg))
    images = PatchImages(store, train_idx)
    if stage in ("autoencoder", "all") and not (resume and all(run.autoencoder(r).exists() for r in ROLES_NEEDED)):
        aes = train_autoencoders(images, roles, run, cfg, d, progress)
    else:
        aes = load_autoencoders(run, cfg, d.device)
    if stage == "autoencoder":
        return run
    for ae in aes.values():
        ae.eval()
    latents = encode_all(images, roles, aes, d.device)
    val_latents = encode_all(PatchImages(store, val_idx), roles, aes, d.device) if len(val_idx) else {r: latents[r][:0] for r in ROLES_NEEDED}
    train_diffusion(latents, val_latents, run, cfg, d, resume, progress, stop_after)
    return run
