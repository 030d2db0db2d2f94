"""A trained run as a sampler: the prediction settings (`PredictConfig`), the DAMMP-gated denoiser and the
`Predictor` that encodes conditions, samples target latents and decodes them. `stages.predict` drives it over
patches, `canvas` over a slide's latent canvas."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wsi_damm.diffusion.damm import branch_conditions, divergence, select, use_multi
from wsi_damm.diffusion.noise import draw_keys, keyed_normal
from wsi_damm.diffusion.samplers import make_plan, sample
from wsi_damm.diffusion.schedule import NoiseSchedule
from wsi_damm.sampling.draws import DEFAULT_INTERVAL, crop, draw_stats, interval_attrs, widened
from wsi_damm.tiling.context import context_roles, to_latent_grid
from wsi_damm.tiling.store import PatchStore, read_rows, to_model_range
from wsi_damm.training.latent_canvas import ENCODE_TILE, decode_tiled
from wsi_damm.training.run_dir import (
    RunDir,
    build_schedule,
    condition_channels,
    latent_channels,
    load_autoencoders,
    load_run_config,
    load_unet,
)
from wsi_damm.util.devices import check_device_name
from wsi_damm.util.errors import InputError
from wsi_damm.util.files import read_json
from wsi_damm.util.precision import amp_mode, autocast

DEFAULT_STEPS = {"ddim": 150, "dpm++": 20}
MICRO_BATCH = 16  # samples per U-Net call, whatever the batch size: see GatedDenoiser._model
SAMPLING = ("auto", "canvas", "independent", "shifted")


@dataclass(frozen=True)
class PredictConfig:
    sampler: str = "dpm++"  # "ddim" (paper: 150 steps) or "dpm++" (DPM-Solver++(2M), 20 steps)
    steps: int | None = None
    eta: float = 0.0
    spacing: str = "logsnr"
    batch_size: int = 16
    seed: int = 0
    overlap: int | None = None  # default: a quarter of the patch
    min_tissue: float = 0.05
    tissue: str | None = None  # tissue detection; None: the one the run's training store was tiled with
    roi: str | None = None  # QuPath GeoJSON: predict only the patches inside its regions
    amp: str = "off"  # autocast of the U-Net: off | bf16 | fp16 (precision.py; the same meaning as in train)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dist_timeout_min: float = 30.0  # torchrun: how long a rank waits in a collective
    shard_patches: int = 64
    samples: int = 1  # K draws per patch: the map is their mean; their sd and central interval are stored beside it
    interval: float = DEFAULT_INTERVAL  # the central interval's level asked for (`draws.interval_rank`; K > 1)
    calibrated: bool = False  # scale the draws' spread by the run's calibration (`wsi-damm calibrate`)
    # "independent": each patch alone; "canvas": all patches in lockstep on the slide's latent canvas, overlaps fused
    # every step; "shifted": on the canvas, a grid of patch-sized cells shifted every step (runs trained on canvas
    # latents); "auto": shifted for such runs, else independent (README, Seamless maps)
    sampling: str = "auto"
    # False (`--no-nuclei`): the uni-modal branch only. The nuclei channel is still tiled when the slide has one,
    # so the tissue mask, the patches and the scored pixels are the same as with nuclei
    nuclei: bool = True

    @property
    def n_steps(self) -> int:
        return self.steps or DEFAULT_STEPS[self.sampler]

    def validate(self) -> None:
        if self.sampler not in DEFAULT_STEPS:
            raise InputError("--sampler", f"must be ddim or dpm++, got {self.sampler!r}")
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise InputError("--steps", f"must be in 1..1000, got {self.steps}")
        if self.batch_size <= 0:
            raise InputError("--batch-size", f"must be positive, got {self.batch_size}")
        if not 0 <= self.eta <= 1:
            raise InputError("--eta", f"must be in [0, 1], got {self.eta}")
        if self.samples < 1:
            raise InputError("--samples", f"must be at least 1, got {self.samples}")
        if self.calibrated and self.samples < 2:
            raise InputError("--calibrated", "scales the spread of several draws: use it with --samples K (K ≥ 2)")
        if not 0 < self.interval < 1:
            raise InputError("--interval", f"must be between 0 and 1 (e.g. 0.8), got {self.interval}")
        if self.sampling not in SAMPLING:
            raise InputError("--sampling", f"must be {' or '.join(SAMPLING)}, got {self.sampling!r}")
        amp_mode(self.amp)
        check_device_name(self.device)
        if not self.dist_timeout_min > 0:
            raise InputError("--dist-timeout", f"must be positive (minutes), got {self.dist_timeout_min}")


def in_micro_batches(fn, *inputs: torch.Tensor | None):
    """`fn(*inputs)` computed on chunks of exactly MICRO_BATCH samples (the last one zero-padded) and
    joined: CPU kernels round differently for different batch sizes, so this keeps every sample's
    numbers independent of `--batch-size`, of its neighbours and of the rank that computes it.
    `fn` returns a tensor or a tuple of tensors (None passes through)."""
    n, parts = len(inputs[0]), []
    for a in range(0, n, MICRO_BATCH):
        b = min(a + MICRO_BATCH, n)
        chunk = [None if v is None else v[a:b] for v in inputs]
        if b - a < MICRO_BATCH:
            chunk = [None if v is None else torch.cat([v, v.new_zeros((MICRO_BATCH - (b - a),) + v.shape[1:])]) for v in chunk]
        out = fn(*chunk)
        parts.append(tuple(None if v is None else v[: b - a] for v in (out if isinstance(out, tuple) else (out,))))
    joined = tuple(None if parts[0][i] is None else torch.cat([q[i] for q in parts]) for i in range(len(parts[0])))
    return joined if len(joined) > 1 else joined[0]


def read_calibration(run: RunDir, samples: int, interval: float) -> float:
    """The spread scale `predict --calibrated` applies: refused when the run has none, or one fitted for another
    number of draws or interval rank (the stretch a spread needs depends on both)."""
    if not run.calibration.exists():
        raise InputError(
            run.path, "has no calibration.json", f"fit one first: wsi-damm calibrate {run.path} --store <patches.zarr> --samples {samples}"
        )
    fitted = read_json(run.calibration)
    want = interval_attrs(samples, interval)
    if (fitted["interval"]["draws"], fitted["interval"]["rank"]) != (want["draws"], want["rank"]):
        raise InputError(
            run.calibration,
            f"was fitted for {fitted['interval']['draws']} draws (interval rank {fitted['interval']['rank']}), not {samples} "
            f"(rank {want['rank']})",
            f"predict with --samples {fitted['interval']['draws']} --interval {fitted['interval']['requested']}, or calibrate again",
        )
    return float(fitted["scale"])


class GatedDenoiser:
    """ε(x, t) of the DAMM U-Net with the per-sample gate; remembers each sample's choices."""

    def __init__(
        self,
        model,
        c_uni: torch.Tensor,
        c_multi: torch.Tensor | None,
        gamma: float,
        dammp: bool,
        amp: str,
        v_schedule: NoiseSchedule | None = None,
    ) -> None:
        self.model, self.c_uni, self.c_multi = model, c_uni, c_multi
        self.gamma, self.dammp, self.amp = gamma, dammp, amp
        self.v_schedule = v_schedule  # set when the model predicts v: outputs are turned into ε
        self.divergences: list[torch.Tensor] = []
        self.choices: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.amp):
            eps_uni, eps_multi, kappa = in_micro_batches(self.model, x, t, self.c_uni, self.c_multi)
        if eps_multi is None:  # no nuclei: the multi-modal branch is never computed
            out = eps_uni.float()
        else:
            d = divergence(kappa)
            multi = use_multi(d, self.gamma, self.dammp)
            self.divergences.append(d)
            self.choices.append(multi)
            out = select(eps_uni, eps_multi, multi).float()
        return self.v_schedule.eps_from_v(x, t, out) if self.v_schedule is not None else out

    def summary(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.choices:
            return np.full(n, np.nan, np.float32), np.zeros(n, np.float32)
        d = torch.stack(self.divergences).mean(0).cpu().numpy().astype(np.float32)
        share = torch.stack(self.choices).float().mean(0).cpu().numpy().astype(np.float32)
        return d, share


class Predictor:
    """Loaded run: autoencoders, EMA U-Net, schedule; `predict(images, keys)` for a batch."""

    def __init__(self, run_dir: Path, device: torch.device, cfg: PredictConfig) -> None:
        self.run = RunDir(run_dir)
        self.rc = load_run_config(self.run)
        self.cfg, self.device = cfg, device
        self.aes = load_autoencoders(self.run, self.rc, device)
        self.model = load_unet(self.run, self.rc, device)
        self.schedule = build_schedule(self.rc.schedule)

        self.plan = make_plan(cfg.sampler, self.schedule, cfg.n_steps, cfg.eta, cfg.spacing)
        self.spread_scale = read_calibration(self.run, cfg.samples, cfg.interval) if cfg.calibrated else 1.0

    @property
    def factor(self) -> int:
        """Pixels per latent pixel."""
        return self.rc.autoencoder.factor

    def inputs(self, store: PatchStore, rows: np.ndarray) -> torch.Tensor:
        """What `predict` is given for these rows of a conditions store: the patches, in model range."""
        return to_model_range(read_rows(store.images, rows))

    def context(self, store: PatchStore, rows: np.ndarray) -> np.ndarray | None:
        """The context windows the run conditions on for these rows of a conditions store (None: no context)."""
        span = self.rc.model.context_span
        return store.context_windows(rows, span) if span else None

    def uses_nuclei(self, roles: list[str]) -> bool:
        """Whether the multi-modal branch runs: the tiled inputs hold nuclei and `--no-nuclei` was not given."""
        return self.cfg.nuclei and "nuclei" in roles

    def branch_roles(self, roles: list[str]) -> list[str]:
        """The role behind each branch's condition, in the U-Net's order (uni-modal first)."""
        used = ["vessels", "nuclei"] if self.uses_nuclei(roles) else ["vessels"]
        return used[::-1] if self.rc.model.uni_branch == "nuclei" else used

    @torch.inference_mode()
    def latent_conditions(self, images: torch.Tensor, roles: list[str], micro_batches: bool = True) -> torch.Tensor:
        """images (B, C, P, P) in [-1, 1] → the branches' latents (B, c_lat [+ c_lat], p, p): the uni-modal
        branch's first, the multi-modal partner's after it (absent without nuclei); no context.
        `micro_batches=False` encodes the batch as given: for the condition canvas's large tiles, one
        at a time, which padding to MICRO_BATCH would multiply sixteenfold."""
        x = images.to(self.device)
        enc = {
            r: (
                in_micro_batches(self.aes[r].encode, x[:, roles.index(r) : roles.index(r) + 1])
                if micro_batches
                else self.aes[r].encode(x[:, roles.index(r) : roles.index(r) + 1])
            )
            for r in self.branch_roles(roles)
            if r in roles
        }
        c_uni, c_multi = branch_conditions(enc["vessels"], enc.get("nuclei"), self.rc.model.uni_branch)
        return c_uni if c_multi is None else torch.cat([c_uni, c_multi], 1)

    @torch.inference_mode()
    def with_context(self, latents: torch.Tensor, roles: list[str], context: np.ndarray | None) -> torch.Tensor:
        """The U-Net's conditions: each branch's latent in `latents` (`latent_conditions`) followed by its
        context channel when the run uses context (`context`: the windows, `PatchStore.context_windows`)."""
        if not self.rc.model.context_span:
            return latents
        if context is None:
            raise ValueError("this run conditions on context: pass the patches' context windows")
        ctx = to_latent_grid(context, latents.shape[-1], latents.device)
        c = latent_channels(self.rc)
        parts = []
        for j, r in enumerate(self.branch_roles(roles)):
            parts += [latents[:, j * c : (j + 1) * c], ctx[:, context_roles(roles).index(r)][:, None]]
        return torch.cat(parts, 1)

    @torch.inference_mode()
    def conditions(self, images: torch.Tensor, roles: list[str], context: np.ndarray | None = None) -> torch.Tensor:
        """images (B, C, P, P) in [-1, 1] → the U-Net's conditions (B, c_uni [+ c_multi] channels, p, p)."""
        return self.with_context(self.latent_conditions(images, roles), roles, context)

    def denoiser(self, conditions: torch.Tensor, k: int) -> GatedDenoiser:
        """The gated ε-model for K draws of each of the B patches whose `conditions` are given (draw-major)."""
        c = condition_channels(self.rc)
        c_uni = conditions[:, :c].repeat(k, 1, 1, 1)
        c_multi = conditions[:, c:].repeat(k, 1, 1, 1) if conditions.shape[1] > c else None
        return GatedDenoiser(
            self.model,
            c_uni,
            c_multi,
            self.rc.damm.gamma,
            self.rc.damm.dammp,
            self.cfg.amp,
            self.schedule if self.rc.schedule.objective == "v" else None,
        )

    @torch.inference_mode()
    def decode(self, z0: torch.Tensor, k: int) -> dict[str, np.ndarray]:
        """K draws of B latents (draw-major) → NP map in [0, 1] (B, 1, P, P): `draws.draw_stats` over the draws."""
        return widened(draw_stats(in_micro_batches(self.aes["target"].decode, z0.to(self.device)), k, self.cfg.interval), self.spread_scale)

    @torch.inference_mode()
    def decode_region(self, z: torch.Tensor, halo: int) -> dict[str, np.ndarray]:
        """K draws of one canvas region with `halo` latent pixels of context, (K, c, h + 2·halo, w + 2·halo)
        → NP map in [0, 1] (1, h·f, w·f): `draws.draw_stats` over the draws, decoded in tiles (local decoders)."""
        img = decode_tiled(z.to(self.device), self.aes["target"].decode, self.factor, ENCODE_TILE, halo)
        return crop(widened(draw_stats(img, len(z), self.cfg.interval), self.spread_scale), 0)

    @torch.inference_mode()
    def predict(
        self, images: torch.Tensor, roles: list[str], keys: torch.Tensor, context: np.ndarray | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Independent sampling: images (B, C, P, P) in [-1, 1] → NP map in [0, 1] (B, 1, P, P) — the mean of
        K draws, with their sd and interval for K > 1 (`draws.draw_stats`) —, mean divergence and multi-modal
        share per patch.
        The K draws of every patch are sampled as one batch of K·B from noise keyed per patch."""
        cond = self.conditions(images, roles, context)
        k, b = self.cfg.samples, len(keys)
        if k > 1:
            keys = torch.cat([draw_keys(keys, i) for i in range(k)])
        shape = (latent_channels(self.rc),) + tuple(cond.shape[2:])
        den = self.denoiser(cond, k)
        z0 = sample(den, keyed_normal(keys, 0, shape, self.device), self.plan, lambda i: keyed_normal(keys, i + 1, shape, self.device))
        stats = self.decode(z0, k)
        d, share = den.summary(k * b)
        return stats, d.reshape(k, b).mean(0), share.reshape(k, b).mean(0)
