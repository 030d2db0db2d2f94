"""A trained run: its folder layout, its config, and the models and schedule built from it.

`train` writes a run; `predict`, `info` and the benchmarks read one. Layout: `config.json` (the
resolved RunConfig), `autoencoder_<role>.safetensors`, `autoencoder_ceiling.json`, `unet_ema.safetensors`
(what sampling uses), `unet.safetensors`, `metrics.csv`, `autoencoder_metrics.csv`, `training_state.json`,
`loss.png`, and `checkpoints/step_N/` named by `checkpoints/latest.json` once complete.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from wsi_damm.diffusion.schedule import NoiseSchedule
from wsi_damm.models.autoencoder import Autoencoder
from wsi_damm.models.damm_unet import DammUNet, UNetShape
from wsi_damm.training.checkpoint import load_weights
from wsi_damm.training.config import RunConfig, ScheduleConfig
from wsi_damm.util.errors import InputError
from wsi_damm.util.files import write_csv

ROLES_NEEDED = ("vessels", "nuclei", "target")  # one autoencoder each
METRIC_FIELDS = [
    "step",
    "phase",
    "lr",
    "loss",
    "l_uni",
    "l_multi",
    "dfl",
    "multi_share",
    "mean_kappa",
    "val_loss",
    "val_l_uni",
    "val_l_multi",
    "val_multi_share",
    "steps_per_s",
]


class RunDir:
    """Paths inside a run directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.unet = self.path / "unet_ema.safetensors"
        self.regression = self.path / "regression_ema.safetensors"  # `train --model regression`: the run's model
        self.unet_raw = self.path / "unet.safetensors"
        self.metrics = self.path / "metrics.csv"
        self.ae_metrics = self.path / "autoencoder_metrics.csv"
        self.ckpt = self.path / "checkpoints"
        self.ae_ckpt = self.path / "checkpoints_autoencoder"  # until the autoencoder stage is done
        self.state = self.path / "training_state.json"
        self.validation = self.path / "validation.json"  # which patches validate, in words and numbers
        self.ae_ceiling = self.path / "autoencoder_ceiling.json"  # each autoencoder's reconstruction of held-out patches
        self.calibration = self.path / "calibration.json"  # the draws' spread scale (`wsi-damm calibrate`), if fitted

    def autoencoder(self, role: str) -> Path:
        return self.path / f"autoencoder_{role}.safetensors"

    def last_checkpoint(self, ckpt: Path | None = None) -> Path | None:
        """The folder `latest.json` names in `ckpt` (default: the diffusion stage's): the newest checkpoint known to be complete."""
        ckpt = ckpt or self.ckpt
        latest = ckpt / "latest.json"
        if not latest.exists():
            return None
        try:
            folder = ckpt / json.loads(latest.read_text())["folder"]
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


def weights_of(run: RunDir, cfg: RunConfig) -> Path:
    """The weights that make a run finished: the EMA DAMM U-Net, or the regression U-Net's."""
    return run.regression if cfg.model.kind == "regression" else run.unet


def latent_channels(cfg: RunConfig) -> int:
    return 1 if cfg.autoencoder.factor == 1 else cfg.autoencoder.latent_channels


def condition_channels(cfg: RunConfig) -> int:
    """Channels of one branch's condition: its latent, plus one context channel when the run uses context."""
    return latent_channels(cfg) + (1 if cfg.model.context_span else 0)


def build_unet(cfg: RunConfig) -> DammUNet:
    m = cfg.model
    shape = UNetShape(latent_channels(cfg), tuple(m.channels), m.res_blocks, m.heads, m.dropout, 1 if m.context_span else 0)
    return DammUNet(shape, m.mmfm, m.fusion, m.confidence_input, m.mmfm_reduction)


def build_autoencoder(cfg: RunConfig, role: str = "vessels") -> Autoencoder:
    """The autoencoder of one role; the target's codes its intensity to the power `autoencoder.target_gamma`. Only local
    autoencoders standardise (`autoencoder.standardise`): GroupNorm already rescales the paper's kind per patch. Any
    kind can have its output refit (`autoencoder.refit`)."""
    a = cfg.autoencoder
    gamma = a.target_gamma if role == "target" else 1.0
    return Autoencoder(a.factor, a.latent_channels, tuple(a.channels), a.local, a.local_norm, gamma, a.standardise and a.local, a.refit)


def build_optimizer(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW for every model we train, updating all tensors in one batched pass (`foreach`): torch's CPU
    default loops over them one by one, a visible share of a small model's step. `weight_decay` has no
    default here: each model's comes from its config, so it is recorded with the run."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def build_schedule(cfg: ScheduleConfig) -> NoiseSchedule:
    return NoiseSchedule.make(cfg.kind, cfg.T, cfg.beta_start, cfg.beta_end)


def load_autoencoders(run: RunDir, cfg: RunConfig, device: torch.device | str = "cpu") -> dict[str, Autoencoder]:
    aes = {}
    for role in ROLES_NEEDED:
        ae = build_autoencoder(cfg, role)
        load_weights(run.autoencoder(role), ae, device)
        aes[role] = ae.to(device).eval()
    return aes


def load_unet(run: RunDir, cfg: RunConfig, device: torch.device | str = "cpu") -> DammUNet:
    """The EMA U-Net, what sampling uses."""
    model = build_unet(cfg)
    load_weights(run.unet, model, device)
    return model.to(device).eval()


def write_metrics(path: Path, rows: list[dict], fields: list[str] = METRIC_FIELDS) -> None:
    write_csv(path, rows, fields)


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics CSV: `step` as int, `phase` as text, the rest as float ('' where not logged)."""
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return [
            {k: (v if v in ("", None) or k == "phase" else int(v) if k == "step" else float(v)) for k, v in r.items()}
            for r in csv.DictReader(fh)
        ]
