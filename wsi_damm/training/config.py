"""Configuration of a training run: dataclasses, presets, JSON round trip, TOML overrides.

Precedence: preset < `--config file.toml` < command-line flags. The resolved config is saved as
`config.json` in the run directory and is what every later stage reads.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from wsi_damm.tiling.np_units import NpScale
from wsi_damm.util.devices import check_device_name
from wsi_damm.util.errors import InputError
from wsi_damm.util.precision import amp_mode

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class AutoencoderConfig:
    factor: int = 4
    latent_channels: int = 4
    channels: tuple[int, ...] = (16, 32)
    kl_weight: float = 1e-6
    ssim_weight: float = 0.0
    steps: int = 600
    batch_size: int = 12
    lr: float = 2e-3
    # AdamW's decoupled weight decay: torch's default, which every autoencoder measured in the README was trained with
    weight_decay: float = 0.01
    # False: GroupNorm and nearest upsampling (the paper's kind: a latent depends on its whole patch); True: per-pixel
    # norm and bilinear upsampling, so slides encode and decode in tiles without seams (model.latents = "canvas" needs it)
    local: bool = False
    # how a local autoencoder normalises: one of LOCAL_NORMS, "pixel" (PixelNorm) or "none". A per-pixel norm carries a
    # pixel's brightness in the direction of its features alone
    local_norm: str = "pixel"
    # standardise each channel's coded intensity by its mean and sd over the training patches before the encoder (and
    # back after the decoder): a sparse stain's structure then reaches the network at unit scale, as GroupNorm gives
    # the paper's autoencoder per patch, with fixed numbers that keep a local autoencoder local (local ones only: GroupNorm
    # ones have it already). Recorded in the weights
    standardise: bool = False
    # after training, fit the decoder's output to its input by one gain and one shift per channel, least squares over
    # training patches (models.autoencoder.Autoencoder.refit_on): training can leave a sparse stain's reconstruction
    # tens of per cent too bright or too dim, a different amount at each seed. Recorded in the weights
    refit: bool = False
    # after the 50-step warm-up: "constant" or "cosine" down to a tenth, so the saved weights are not one noisy
    # full-rate step (benchmarks/study_autoencoders.py measures both)
    lr_schedule: str = "constant"
    # the target autoencoder codes its intensity to this power (models.autoencoder.to_power): < 1 spends more of
    # the code on dim values, where a sparse stain's background and faint signal lie; 1 codes it as it is
    target_gamma: float = 1.0
    # a collapsed autoencoder (its ceiling on the validation patches, autoencoder_check.py) "stop"s the run before the
    # diffusion stage, or only "warn"s (`train --force`)
    on_collapse: str = "stop"
    # "yes": train the autoencoders with SPARSE_RECIPE, meant for a stain that marks few pixels; "no": as configured;
    # "auto": "yes" when fewer than SPARSE_BELOW of the training patches' target pixels exceed 0.1 (train decides and
    # records the choice here, the fraction in target_bright_fraction). "no" by default: at the demo's budget the
    # recipe has not yet been shown to make a collapse rarer (benchmarks/compare_sparse_target.py)
    sparse_target: str = "no"
    target_bright_fraction: float | None = None


LR_SCHEDULES = ("cosine", "constant")  # train.lr_schedule and autoencoder.lr_schedule
# the autoencoders of a sparse target: no per-pixel norm (it carries brightness in the features' direction alone), a
# rate decayed along a cosine, the target coded as the square root of its intensity
SPARSE_RECIPE = {"local_norm": "none", "lr_schedule": "cosine", "target_gamma": 0.5}
SPARSE_BELOW = 0.2  # sparse: under this share of the target's pixels above 0.1 (a dense NP channel: about half)
SPARSE_CHOICES = ("auto", "yes", "no")
LOCAL_NORMS = ("pixel", "none")  # the norms that keep an autoencoder local (models.blocks.norm_layer)


LATENT_KINDS = ("patch", "canvas")  # what the U-Net learns on: model.latents
MODEL_KINDS = ("damm", "regression")  # what `train --model` trains: model.kind


@dataclass(frozen=True)
class ModelConfig:
    # "damm": the latent diffusion model (autoencoders, then the DAMM U-Net); "regression": the L1 U-Net a lab would
    # train instead (CARE-style, pixel space; `training/regression.py`)
    kind: str = "damm"
    channels: tuple[int, ...] = (32, 64, 128)
    res_blocks: int = 1
    heads: int = 4
    dropout: float = 0.0
    mmfm: bool = True
    fusion: str = "uafm"  # or "cross-attention"
    confidence_input: str = "both"  # "uni" = authors' code: κ from the vessels feature only
    mmfm_reduction: int = 4
    uni_branch: str = "vessels"  # "nuclei": paper Tab. 4
    # a low-resolution window this many patches wide around each patch, as an extra condition of each
    # branch (vessels to the uni-modal one, nuclei to the multi-modal one); 0: the patch alone (the paper)
    context_span: int = 0
    # "patch": the U-Net learns on patches encoded one by one (the paper); "canvas": on crops of each slide's latent
    # canvas at random offsets, which is what shifted-grid canvas sampling feeds it (latent_canvas.py)
    latents: str = "patch"


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "scaled_linear"
    T: int = 1000
    beta_start: float = 0.002
    beta_end: float = 0.02
    # what the U-Net predicts: "eps" (the authors' ε, L1) or "v" (v-prediction, same L1 loss):
    # v learns the conditional mean at high noise far sooner, which short CPU runs need
    objective: str = "eps"


@dataclass(frozen=True)
class DammConfig:
    dammp: bool = True
    gamma: float = 0.5
    dfl: bool = True
    alpha: float = 1e-4
    beta: float = 0.1
    warmup_fraction: float = 0.4  # authors: 80 of 200 epochs
    # after warm-up the paper trains the multi-modal branch only on samples the gate fuses ("gated"); a branch
    # the gate stops choosing then stops learning, and the gate can lock into uni-only. "always": both
    # branches learn from every sample; the gate still learns from the DFL and still picks at sampling
    multi_loss: str = "gated"
    # the denoiser's error: "l1" (the authors' code; its optimum is the conditional median of the noise, which on a
    # sparse target is the background) or "l2" (squared: the conditional mean, the score every sampler assumes)
    loss: str = "l1"
    # Min-SNR-γ loss weighting over timesteps (Hang et al. 2023): 0 = off (the authors' uniform weighting), else γ
    # (5 in the paper); shifts the short budget's effort from nearly clean steps to the noisy ones
    min_snr: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    epochs: int | None = None  # when set, overrides steps: epochs × (training patches // batch)
    batch_size: int = 16
    lr: float = 5e-4
    lr_schedule: str = "cosine"  # one of LR_SCHEDULES
    lr_warmup_steps: int = 50
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    grad_accum: int = 1
    amp: str = "off"  # autocast of the U-Net: "off", "bf16" or "fp16" (fp16 with a gradient scaler); see precision.py
    channels_last: bool = True
    compile: bool = False
    val_fraction: float = 0.2
    val_slides: tuple[str, ...] = ()
    # "auto": by slide when the store holds several, else a held-out region of the slide ("slides" / "region")
    val_split: str = "auto"
    val_every: int = 100
    checkpoint_every: int = 500
    log_every: int = 10
    metrics_every: int = 50  # metrics.csv is rewritten (atomically) this often, not only at checkpoints; 0: at checkpoints
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dist_timeout_min: float = 30.0  # torchrun: how long a rank waits in a collective before the run fails

    def __post_init__(self) -> None:
        object.__setattr__(self, "amp", amp_mode(self.amp))  # runs written before the modes stored True / False


@dataclass(frozen=True)
class RunConfig:
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    damm: DammConfig = field(default_factory=DammConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "tiny"
    patch_size: int | None = None  # filled from the store: prediction tiles slides the same way
    roles: tuple[str, ...] = ()
    mpp: float | None = None
    level: int | None = None
    store_dtype: str = "uint8"
    percentiles: tuple[float, float] = (0.5, 99.8)
    tissue: str = "auto"  # the tissue detection the store was tiled with; predict tiles the same way
    np_scale: NpScale = field(default_factory=NpScale)  # the store's NP normalisation; maps carry it (np_units)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        return _build(cls, data, "config")


PRESETS: dict[str, RunConfig] = {
    # the CPU preset samples seamless maps: local autoencoders, the U-Net on canvas-latent crops (README, Seamless maps);
    # the autoencoders without a norm, on standardised intensities (no collapse on sparse or dim channels), their
    # output's gain refit after training
    "tiny": RunConfig(
        schedule=ScheduleConfig(objective="v"),
        autoencoder=AutoencoderConfig(local=True, local_norm="none", standardise=True, refit=True),
        model=ModelConfig(latents="canvas"),
        # the denoiser on squared error: its optimum is the conditional mean the samplers assume; L1's is the median of
        # the noise, which on a sparse stain is the background (a black map). No worse on a dense stain
        # (benchmarks/results/sparse/)
        damm=DammConfig(loss="l2"),
    ),
    "paper": RunConfig(
        autoencoder=AutoencoderConfig(factor=16, latent_channels=8, channels=(64, 128, 256, 256, 512), steps=20000, batch_size=16, lr=1e-4),
        model=ModelConfig(channels=(64, 128, 256, 512), res_blocks=2, heads=8),
        train=TrainConfig(steps=200000, batch_size=32, lr=1e-4, ema_decay=0.9999, val_every=1000, checkpoint_every=5000, log_every=50),
        preset="paper",
    ),
}


def _build(cls, data: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(where, f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {}
    defaults = cls()
    for name, value in data.items():
        default = getattr(defaults, name)
        if is_dataclass(default):
            if not isinstance(value, dict):
                raise InputError(where, f"[{name}] must be a table")
            value = _build(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def given_options(**sections: dict) -> dict:
    """Nested overrides from the options that were actually given (None = not given), by config section."""
    return {
        section: {k: v for k, v in values.items() if v is not None}
        for section, values in sections.items()
        if any(v is not None for v in values.values())
    }


def merge(base: RunConfig, overrides: dict, where: str) -> RunConfig:
    """Apply a nested dict of overrides (from TOML or flags) on top of `base`."""
    out = base
    for key, value in overrides.items():
        current = getattr(out, key, None) if hasattr(out, key) else None
        if key not in {f.name for f in fields(RunConfig)}:
            raise InputError(where, f"unknown section {key!r}")
        if is_dataclass(current) and isinstance(value, dict):
            merged = {**asdict(current), **value}
            out = replace(out, **{key: _build(type(current), merged, f"{where}.{key}")})
        else:
            out = replace(out, **{key: tuple(value) if isinstance(value, list) else value})
    return out


def resolve(preset: str, toml_path: Path | None = None, flags: dict | None = None) -> RunConfig:
    if preset not in PRESETS:
        raise InputError("--preset", f"unknown preset {preset!r}; choose {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    if toml_path is not None:
        try:
            data = tomllib.loads(Path(toml_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InputError(toml_path, f"cannot read TOML config: {exc}") from exc
        cfg = merge(cfg, data, str(toml_path))
    if flags:
        cfg = merge(cfg, flags, "command line")
    validate(cfg)
    return cfg


def with_sparse_choice(cfg: RunConfig, sparse: bool, bright_fraction: float | None = None) -> RunConfig:
    """`cfg` with `autoencoder.sparse_target` decided: SPARSE_RECIPE applied when `sparse` (the norm only where the
    autoencoders are local: GroupNorm ones keep theirs), and the measured bright fraction recorded."""
    a = cfg.autoencoder
    recipe = {k: v for k, v in SPARSE_RECIPE.items() if a.local or k != "local_norm"} if sparse else {}
    return replace(cfg, autoencoder=replace(a, **recipe, sparse_target="yes" if sparse else "no", target_bright_fraction=bright_fraction))


def sampling_for(cfg: RunConfig) -> str:
    """How `predict --sampling auto` samples a run: shifted grids for canvas latents, else patch by patch."""
    return "shifted" if cfg.model.latents == "canvas" and cfg.model.kind == "damm" else "independent"


def validate(cfg: RunConfig) -> None:
    m, d = cfg.model, cfg.damm
    if m.fusion not in ("uafm", "cross-attention"):
        raise InputError("--fusion", f"must be uafm or cross-attention, got {m.fusion!r}")
    if m.uni_branch not in ("vessels", "nuclei"):
        raise InputError("--uni-branch", f"must be vessels or nuclei, got {m.uni_branch!r}")
    if d.loss not in ("l1", "l2"):
        raise InputError("damm.loss", f"must be l1 or l2, got {d.loss!r}")
    if not d.min_snr >= 0:
        raise InputError("damm.min_snr", f"must be 0 (off) or a positive γ, got {d.min_snr!r}")
    if d.multi_loss not in ("gated", "always"):
        raise InputError("--multi-loss", f"must be gated or always, got {d.multi_loss!r}")
    if m.kind not in MODEL_KINDS:
        raise InputError("--model", f"must be {' or '.join(MODEL_KINDS)}, got {m.kind!r}")
    if m.latents not in LATENT_KINDS:
        raise InputError("--latents", f"must be {' or '.join(LATENT_KINDS)}, got {m.latents!r}")
    if m.latents == "canvas" and not cfg.autoencoder.local:
        raise InputError(
            "--latents", "canvas latents need local autoencoders (--ae-local): GroupNorm makes a latent depend on its whole patch"
        )
    if cfg.autoencoder.sparse_target not in SPARSE_CHOICES:
        raise InputError("autoencoder.sparse_target", f"must be {', '.join(SPARSE_CHOICES)}, got {cfg.autoencoder.sparse_target!r}")
    if cfg.autoencoder.on_collapse not in ("stop", "warn"):
        raise InputError("autoencoder.on_collapse", f"must be stop or warn, got {cfg.autoencoder.on_collapse!r}")
    if not 0 < cfg.autoencoder.target_gamma <= 1:
        raise InputError("autoencoder.target_gamma", f"must be in (0, 1], got {cfg.autoencoder.target_gamma!r}")
    if cfg.autoencoder.local_norm not in LOCAL_NORMS:
        raise InputError("autoencoder.local_norm", f"must be {' or '.join(LOCAL_NORMS)}, got {cfg.autoencoder.local_norm!r}")
    for name, schedule in (("train.lr_schedule", cfg.train.lr_schedule), ("autoencoder.lr_schedule", cfg.autoencoder.lr_schedule)):
        if schedule not in LR_SCHEDULES:
            raise InputError(name, f"must be {' or '.join(LR_SCHEDULES)}, got {schedule!r}")
    if not isinstance(m.context_span, int) or m.context_span < 0:
        raise InputError("--context-span", f"must be a whole number of patches ≥ 0, got {m.context_span!r}")
    if m.confidence_input not in ("both", "uni"):
        raise InputError("confidence_input", f"must be both or uni, got {m.confidence_input!r}")
    if cfg.schedule.objective not in ("eps", "v"):
        raise InputError("schedule.objective", f"must be eps or v, got {cfg.schedule.objective!r}")
    if not 0 < d.gamma < 1:
        raise InputError("--gamma", f"must be in (0, 1), got {d.gamma}")
    if cfg.autoencoder.factor not in (1, 2, 4, 8, 16):
        raise InputError("autoencoder.factor", f"must be 1, 2, 4, 8 or 16, got {cfg.autoencoder.factor}")
    check_device_name(cfg.train.device)
    if not cfg.train.dist_timeout_min > 0:
        raise InputError("--dist-timeout", f"must be positive (minutes), got {cfg.train.dist_timeout_min}")
    if cfg.train.steps <= 0 or cfg.train.batch_size <= 0:
        raise InputError("--steps/--batch-size", "must be positive")
