"""`wsi-damm predict`: whole slides → tissue patches → batched gated sampling → prediction store.

Slides are tiled exactly as in training (same patch size, level / µm per px, normalisation rule)
into a conditions store inside the output; then shard by shard the conditions are encoded, the
target latent is sampled with the DAMMP gate applied per sample at every step, decoded, and the
shard is marked done. Sampling noise is keyed per patch (seed, slide, y, x), so a patch's
prediction does not depend on batch size, order, resume or which rank computed it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import zarr

from ..canvas import sample_canvases
from ..config import RunConfig, sampling_for
from ..context import context_roles, to_latent_grid
from ..devices import check_device_name
from ..diffusion.damm import branch_conditions, divergence, select, use_multi
from ..diffusion.noise import draw_keys, keyed_normal, patch_key
from ..diffusion.samplers import make_plan, sample
from ..diffusion.schedule import NoiseSchedule
from ..distributed import Ranks, setup_ranks
from ..errors import InputError
from ..files import partial_path, prepare_output, publish
from ..heap import release_free_memory
from ..latent_canvas import ENCODE_TILE, decode_tiled
from ..merge import BLENDS
from ..precision import amp_mode, autocast
from ..progress import progress_bar
from ..qc import qc_folder
from ..run_dir import RunDir, build_schedule, condition_channels, latent_channels, load_autoencoders, load_run_config, load_unet
from ..slides import SlideSpec
from ..store import PatchStore, PredictionStore, create_prediction_store, read_rows, to_model_range
from .stitch import run_stitch
from .tile import TileConfig, run_tile

DEFAULT_STEPS = {"ddim": 150, "dpm++": 20}
MICRO_BATCH = 16  # samples per U-Net call, whatever the batch size: see GatedDenoiser._model
SAMPLING = ("auto", "canvas", "independent", "shifted")
CANVAS_SAMPLING = ("canvas", "shifted")  # the ones that sample on a latent canvas
RANKS_READY = "ranks_ready"


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
    samples: int = 1  # K draws per patch: the map is their mean, and their sd is stored beside it
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
        if self.sampling not in SAMPLING:
            raise InputError("--sampling", f"must be {' or '.join(SAMPLING)}, got {self.sampling!r}")
        amp_mode(self.amp)
        check_device_name(self.device)
        if not self.dist_timeout_min > 0:
            raise InputError("--dist-timeout", f"must be positive (minutes), got {self.dist_timeout_min}")


def draw_stats(img: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images (K·B, 1, …) in [-1, 1], draw-major → NP map in [0, 1]: mean and sd over the K draws."""
    img = (img.float().clamp(-1, 1) + 1) / 2
    img = img.view(k, -1, *img.shape[1:])
    return img.mean(0).cpu().numpy(), img.std(0, unbiased=False).cpu().numpy()


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


class GatedDenoiser:
    """ε(x, t) of the DAMM U-Net with the per-sample gate; remembers each sample's choices."""

    def __init__(self, model, c_uni: torch.Tensor, c_multi: torch.Tensor | None, gamma: float, dammp: bool, amp: str,
                 v_schedule: NoiseSchedule | None = None) -> None:
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

    @property
    def factor(self) -> int:
        """Pixels per latent pixel."""
        return self.rc.autoencoder.factor

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
        enc = {r: (in_micro_batches(self.aes[r].encode, x[:, roles.index(r) : roles.index(r) + 1]) if micro_batches
                   else self.aes[r].encode(x[:, roles.index(r) : roles.index(r) + 1]))
               for r in self.branch_roles(roles) if r in roles}
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
        return GatedDenoiser(self.model, c_uni, c_multi, self.rc.damm.gamma, self.rc.damm.dammp, self.cfg.amp,
                             self.schedule if self.rc.schedule.objective == "v" else None)

    @torch.inference_mode()
    def decode(self, z0: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """K draws of B latents (draw-major) → NP map in [0, 1] (B, 1, P, P): mean and sd over the draws."""
        return draw_stats(in_micro_batches(self.aes["target"].decode, z0.to(self.device)), k)

    @torch.inference_mode()
    def decode_region(self, z: torch.Tensor, halo: int) -> tuple[np.ndarray, np.ndarray]:
        """K draws of one canvas region with `halo` latent pixels of context, (K, c, h + 2·halo, w + 2·halo)
        → NP map in [0, 1] (1, h·f, w·f): mean and sd over the draws, decoded in tiles (local decoders)."""
        img = decode_tiled(z.to(self.device), self.aes["target"].decode, self.factor, ENCODE_TILE, halo)
        mean, sd = draw_stats(img, len(z))
        return mean[0], sd[0]

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, roles: list[str], keys: torch.Tensor,
                context: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Independent sampling: images (B, C, P, P) in [-1, 1] → NP map in [0, 1] (B, 1, P, P) — the mean of
        K draws —, its sd over the draws (zeros for K = 1), mean divergence and multi-modal share per patch.
        The K draws of every patch are sampled as one batch of K·B from noise keyed per patch."""
        cond = self.conditions(images, roles, context)
        k, b = self.cfg.samples, len(keys)
        if k > 1:
            keys = torch.cat([draw_keys(keys, i) for i in range(k)])
        shape = (latent_channels(self.rc),) + tuple(cond.shape[2:])
        den = self.denoiser(cond, k)
        z0 = sample(den, keyed_normal(keys, 0, shape, self.device), self.plan, lambda i: keyed_normal(keys, i + 1, shape, self.device))
        mean, sd = self.decode(z0, k)
        d, share = den.summary(k * b)
        return mean, sd, d.reshape(k, b).mean(0), share.reshape(k, b).mean(0)


def resolve_sampling(rc: RunConfig, sampling: str) -> str:
    """"auto": what the run was trained for (`config.sampling_for`)."""
    return sampling_for(rc) if sampling == "auto" else sampling


def condition_config(rc: RunConfig, cfg: PredictConfig) -> TileConfig:
    """How `predict` tiles a slide for a run: the run's patch size, resolution and percentiles."""
    cfg = replace(cfg, sampling=resolve_sampling(rc, cfg.sampling))
    p = int(rc.patch_size)
    overlap = cfg.overlap if cfg.overlap is not None else p // 4
    return TileConfig(patch_size=p, overlap=overlap, level=None if rc.mpp else (rc.level or 0), mpp=rc.mpp,
                      min_tissue=cfg.min_tissue, store_dtype=rc.store_dtype, shard_patches=cfg.shard_patches,
                      percentiles=tuple(rc.percentiles), tissue=cfg.tissue or rc.tissue, roi=cfg.roi,
                      align=rc.autoencoder.factor if cfg.sampling in CANVAS_SAMPLING else 1, np_scale=rc.np_scale)


def run_predict(
    run_dir: Path,
    specs: list[SlideSpec],
    out: Path,
    cfg: PredictConfig,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PredictionStore:
    cfg.validate()
    out = Path(out)
    ranks = setup_ranks(cfg.device, cfg.dist_timeout_min)
    rc = load_run_config(RunDir(run_dir))
    cfg = replace(cfg, sampling=resolve_sampling(rc, cfg.sampling))
    # prediction reads its inputs only: a measured NP channel, when the slide has one, is never tiled, so it
    # cannot change the tissue mask, the normalisation or which patches are predicted
    specs = [spec.without("target") for spec in specs]
    for spec in specs:
        if "vessels" not in spec.roles:
            raise InputError(spec.paths[0], "has no vessels (CD31) channel; prediction needs it")
        if rc.model.uni_branch == "nuclei" and not (cfg.nuclei and "nuclei" in spec.roles):
            raise InputError(run_dir, "this model's uni-modal branch reads nuclei, but the slide has no nuclei channel (or --no-nuclei was given)")
    if resume and not overwrite and Path(out).exists():  # killed after sampling, while writing the map: the store is done
        return _finished(out, run_dir, cfg)
    if rc.model.latents == "canvas" and cfg.sampling not in CANVAS_SAMPLING:
        raise InputError(run_dir, "was trained on canvas latents, which patch-by-patch sampling does not give it", "use --sampling shifted")
    if cfg.sampling == "shifted" and rc.model.latents != "canvas":
        raise InputError(run_dir, "was trained on patch latents; shifted-grid sampling cuts windows anywhere on the canvas",
                         "train with --latents canvas --ae-local")
    predictor = Predictor(Path(run_dir), ranks.device, cfg)  # weights are checked before anything is written
    cond_path = out.with_name(out.name + ".conditions.zarr")  # tiled inputs, removed once done
    partial = partial_path(out)
    ready = partial / RANKS_READY  # rank 0's set-up is done: the other ranks poll for it instead of waiting in a barrier
    if ranks.main:
        ready.unlink(missing_ok=True)  # left by a killed run
    ranks.barrier()
    if ranks.main:
        prepare_output(out, resume, overwrite, (cond_path, partial_path(cond_path)))
        if not cond_path.exists():
            run_tile(specs, cond_path, condition_config(rc, cfg), resume=True, progress=progress, qc=qc_folder(out))
            release_free_memory()
        if not (partial / "zarr.json").exists():
            conditions = PatchStore.open(cond_path)
            attrs = {"run_dir": str(Path(run_dir).resolve()), "predict": asdict(cfg), "roles": conditions.roles,
                     "np_normalisation": rc.np_scale.attrs(),
                     "nuclei": predictor.uses_nuclei(conditions.roles), "model": {"dammp": rc.damm.dammp, "gamma": rc.damm.gamma}}
            create_prediction_store(partial, conditions, attrs, with_sd=cfg.samples > 1)
        ready.touch()
    else:  # tiling a large slide can outlast the process-group timeout
        ranks.wait_until(ready.exists)
    ranks.barrier()
    conditions = PatchStore.open(cond_path)
    root = zarr.open_group(str(partial), mode="r+")
    if cfg.sampling in CANVAS_SAMPLING:
        sample_canvases(root, partial, conditions, predictor, cfg, ranks, progress)
    else:
        _sample_shards(root, conditions, predictor, cfg, ranks, progress)
    ranks.barrier()
    if ranks.main:
        if not np.asarray(root["shard_done"][:]).all():
            raise RuntimeError(f"{partial}: some shards were not predicted")
        if "canvas" in root:
            del root["canvas"]  # work state, not part of the store
        ready.unlink()
        root.attrs["complete"] = True
        publish(partial, out)
        shutil.rmtree(cond_path)
    ranks.barrier()
    return PredictionStore.open(out)


def _finished(out: Path, run_dir: Path, cfg: PredictConfig) -> PredictionStore:
    """A finished prediction store that `--resume` may reuse: same run, same settings; otherwise say what to do."""
    store = PredictionStore.open(out)
    same = store.attrs.get("run_dir") == str(Path(run_dir).resolve()) and store.attrs.get("predict") == json.loads(json.dumps(asdict(cfg)))
    if not same:
        raise InputError(out, "already holds a finished prediction made by another run or with other settings",
                         f"pass --overwrite to predict again, or map it as it is: wsi-damm stitch {out} --out <map> --resume")
    return store


def _sample_shards(root: zarr.Group, conditions: PatchStore, predictor: Predictor, cfg: PredictConfig, ranks: Ranks, progress: bool) -> None:
    s = int(root.attrs["shard_patches"])
    n = root["pred"].shape[0]
    done = np.asarray(root["shard_done"][:])
    mine = [i for i in range(len(done)) if i % ranks.world == ranks.rank]
    todo = [i for i in mine if not done[i]]
    coords = conditions.coords
    ids = [sl["slide_id"] for sl in conditions.slides]
    keys_all = torch.tensor([patch_key(cfg.seed, ids[c[0]], int(c[1]), int(c[2])) for c in coords], dtype=torch.int64)
    roles = conditions.roles
    group = max(1, cfg.batch_size // s)  # shards sampled together, so batches can exceed a shard
    bar = progress_bar(total=sum(min((i + 1) * s, n) - i * s for i in mine), initial=sum(min((i + 1) * s, n) - i * s for i in mine if done[i]),
               desc="predicting", unit="patch", disable=None if (progress and ranks.main) else True)
    for g in range(0, len(todo), group):
        shards = todo[g : g + group]
        spans = [(i * s, min((i + 1) * s, n)) for i in shards]
        rows = np.concatenate([np.arange(a, b) for a, b in spans])
        raw = read_rows(conditions.images, rows)
        images = to_model_range(raw)
        context = predictor.context(conditions, rows)
        parts = []
        for k in range(0, len(rows), cfg.batch_size):
            sl = slice(k, k + cfg.batch_size)
            parts.append(predictor.predict(images[sl], roles, keys_all[rows[sl]], None if context is None else context[sl]))
            bar.update(len(rows[sl]))
        pred, sd, dv, sh = (np.concatenate(x) for x in zip(*parts))
        pos = 0
        for shard, (a, b) in zip(shards, spans):
            root["pred"][a:b] = pred[pos : pos + b - a].astype(np.float16)
            if "pred_sd" in root:
                root["pred_sd"][a:b] = sd[pos : pos + b - a].astype(np.float16)
            root["divergence"][a:b] = dv[pos : pos + b - a]
            root["multimodal_fraction"][a:b] = sh[pos : pos + b - a]
            root["shard_done"][shard] = 1
            pos += b - a
    bar.close()


def default_map_path(pred_store: Path) -> Path:
    """`PRED.zarr` → `PRED.ome.zarr`."""
    pred_store = Path(pred_store)
    return pred_store.with_name(pred_store.name.removesuffix(".zarr") + ".ome.zarr")


@dataclass(frozen=True)
class Predicted:
    store: PredictionStore
    maps: list[Path]  # one per slide; empty when not stitched (or on ranks other than 0)


def predict_maps(run_dir: Path, specs: list[SlideSpec], out: Path, cfg: PredictConfig, stitch: bool = True,
                 map_path: Path | None = None, blend: str = "gaussian", tiff: Path | None = None, resume: bool = False,
                 overwrite: bool = False, progress: bool = True, tiff_units: str = "normalised") -> Predicted:
    """Predict every tissue patch into `out`, then (rank 0) stitch the whole-slide maps: `map_path`,
    by default `out` with `.ome.zarr`."""
    if blend not in BLENDS:
        raise InputError("--blend", f"unknown window {blend!r}; use {', '.join(BLENDS)}")
    store = run_predict(run_dir, specs, out, cfg, resume, overwrite, progress)
    if not stitch or int(os.environ.get("RANK", "0")) != 0:
        return Predicted(store, [])
    release_free_memory()  # what sampling freed, before the stitch's workers start
    maps = run_stitch(out, map_path or default_map_path(out), blend, tiff, progress=progress, resume=resume, tiff_units=tiff_units)
    return Predicted(store, maps)
