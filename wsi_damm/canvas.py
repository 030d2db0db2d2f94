"""Whole-slide sampling on a shared latent canvas: overlapping patches denoised in lockstep.

Independent sampling gives each patch its own noise and trajectory; neighbours then disagree by
more than any blending window hides, and the map shows the patch grid. Here every sampler step
runs the model on every patch window of the slide's latent canvas, fuses the windows' x̂0
estimates per latent pixel (Σ w·x̂0 / Σ w with a Gaussian window w: MultiDiffusion's per-step
fusion, Bar-Tal et al. 2023, with Mixture-of-Diffusers weights that trust window centres most),
and advances every pixel with the sampler's own rule (`Plan.update`) from the fused x̂0 — so the
canvas holds one trajectory and neighbouring windows agree by construction. DPM-Solver++(2M)
reads the previous step's fused x̂0 from the canvas, never a per-window history; DDIM's η noise
is drawn per canvas pixel. The patch grid stays fixed (DiffInfinite's random shifts would need
conditions re-encoded at every shift), so the cost per step equals independent sampling's.

The canvas is swept window row by window row: a row's windows are denoised as a batch, their
x̂0 accumulated, and the latent rows no later window touches are finalised and written. Only a
band of rows is in memory, so memory follows slide width, not area. State lives in arrays with
two slots (numpy in tests, chunked zarr on disk for slides), so a step killed half way is redone
from the previous step's untouched state. Noise is keyed by slide, draw, step and latent position
(`noise.canvas_normal`): results do not depend on batch size, order, ranks or resume. Finally
each patch is decoded from its window with DECODE_HALO latent pixels of canvas around it, so
overlapping patches decode alike and the decoder's edge effects stay outside the patch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import zarr

from .diffusion.noise import canvas_key, canvas_normal
from .diffusion.samplers import Plan
from .distributed import Ranks
from .errors import InputError
from .merge import window
from .ome import writable
from .progress import progress_bar
from .run_dir import condition_channels, latent_channels
from .store import PatchStore, read_rows, to_model_range

if TYPE_CHECKING:
    from .stages.predict import PredictConfig, Predictor

# denoise(window indices, crops (K·n, C, p, p) draw-major, step) → ε of the same shape
Denoise = Callable[[np.ndarray, torch.Tensor, int], torch.Tensor]
# noise(step, y0, y1) → (K, C, y1 − y0, W) standard normals of those canvas rows
Noise = Callable[[int, int, int], torch.Tensor]
LATENT_WINDOW = "gaussian"
DECODE_HALO = 8  # latent pixels of canvas decoded around each window: past the tiny decoder's receptive field


@dataclass(frozen=True)
class Windows:
    """Patch windows on a latent canvas: top-left corners `yx` (n, 2), sorted by row then column, side `p`."""

    yx: np.ndarray
    p: int

    def __post_init__(self) -> None:
        order = np.lexsort((self.yx[:, 1], self.yx[:, 0]))
        if not (order == np.arange(len(order))).all():
            raise ValueError("windows must be sorted by row, then column")

    def __len__(self) -> int:
        return len(self.yx)

    def rows(self) -> list[tuple[int, int]]:
        """Index ranges [a, b) of the windows sharing a top row."""
        starts = np.nonzero(np.diff(self.yx[:, 0]))[0] + 1
        bounds = [0, *starts.tolist(), len(self.yx)]
        return list(zip(bounds[:-1], bounds[1:]))


def fusion_weights(p: int) -> torch.Tensor:
    """(p, p) weights of a window's x̂0 in the fused canvas: centres count most, borders ≥ 1e-3."""
    return torch.from_numpy(window(LATENT_WINDOW, p))


def canvas_step(plan: Plan, i: int, windows: Windows, x_in, x0_in, x_out, x0_out, denoise: Denoise, noise: Noise,
                write: bool = True) -> None:
    """Sampler step `i` over the canvas. Arrays are (K, C, H, W) (numpy or zarr): `x_in`, `x0_in` hold
    the state after step i − 1 (unread at i = 0: x_T is `noise(0, …)`), `x_out`, `x0_out` receive
    the state after step i and the fused x̂0. Pixels no window covers keep their value.
    `write=False` (ranks other than the first) denoises its share and writes nothing."""
    p = windows.p
    w = fusion_weights(p)
    rows = windows.rows()
    lo, num, den = 0, None, None  # Σ w·x̂0 and Σ w over canvas rows [lo, lo + len(den))

    def read(y0: int, y1: int) -> torch.Tensor:
        return noise(0, y0, y1) if i == 0 else torch.from_numpy(np.asarray(x_in[:, :, y0:y1, :]))

    def finalise(f1: int) -> None:
        """Rows [lo, f1) are complete: fused x̂0, then the sampler's update, written."""
        nonlocal lo, num, den
        x = read(lo, f1)
        n, d = num[:, :, : f1 - lo], den[: f1 - lo]
        covered = d > 0
        x0 = torch.where(covered, n / d.clamp_min(1e-30), x)
        prev = torch.from_numpy(np.asarray(x0_in[:, :, lo:f1, :])) if (plan.kind == "dpm++" and i > 0) else None
        eta_noise = noise(i + 1, lo, f1) if plan.needs_noise(i) else None
        x_next = torch.where(covered, plan.update(i, x, x0, prev, eta_noise), x)
        if write:
            x_out[:, :, lo:f1, :] = x_next.numpy()
            x0_out[:, :, lo:f1, :] = x0.numpy()
        num, den, lo = num[:, :, f1 - lo :], den[f1 - lo :], f1

    for r, (a, b) in enumerate(rows):
        y = int(windows.yx[a, 0])
        band = read(y, y + p)
        k, c, _, width = band.shape
        xs = windows.yx[a:b, 1]
        crops = torch.stack([band[:, :, :, x : x + p] for x in xs], 1).reshape(k * (b - a), c, p, p)
        eps = denoise(np.arange(a, b), crops, i).to(crops.dtype)
        x0_w = plan.x0(i, crops, eps).reshape(k, b - a, c, p, p)
        if den is None or len(den) == 0:  # the rows above are all written
            lo, num, den = y, torch.zeros(k, c, p, width), torch.zeros(p, width)
        if y + p > lo + len(den):  # grow the band downwards
            extra = y + p - (lo + len(den))
            num = torch.cat([num, torch.zeros(k, c, extra, width)], 2)
            den = torch.cat([den, torch.zeros(extra, width)], 0)
        for j, x in enumerate(xs):
            num[:, :, y - lo : y - lo + p, x : x + p] += w * x0_w[:, j]
            den[y - lo : y - lo + p, x : x + p] += w
        end = lo + len(den)
        finalise(min(int(windows.yx[rows[r + 1][0], 0]), end) if r + 1 < len(rows) else end)


# ---------------------------------------------------------------------------------------------
# A prediction store's slides sampled on canvases: the driver behind `predict --sampling canvas`.


def _shards_of(ranks: Ranks, done: np.ndarray) -> list[int]:
    return [i for i in range(len(done)) if i % ranks.world == ranks.rank and not done[i]]


def _canvas_array(group: zarr.Group, name: str, shape: tuple[int, ...], rows: int) -> zarr.Array:
    """A float32 (K, C, H, W) canvas chunked in bands of `rows` latent rows (a window row's
    finalised rows are whole chunks); uncompressed: the state is noise-like."""
    if name in group:
        return writable(group[name])
    chunks = (shape[0], shape[1], max(1, min(rows, shape[2])), min(1024, shape[3]))
    return writable(group.create_array(name, shape=shape, dtype=np.float32, chunks=chunks, compressors=None, fill_value=0))


def _gather(ranks: Ranks, part: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's slice (along dim 0, equal shares but the last) joined in rank order, on every rank."""
    if ranks.world == 1:
        return part
    share = -(-total // ranks.world)
    padded = torch.zeros((share,) + tuple(part.shape[1:]), dtype=part.dtype)
    padded[: len(part)] = part
    pieces = [torch.zeros_like(padded) for _ in range(ranks.world)]
    dist.all_gather(pieces, padded)
    return torch.cat(pieces)[:total]


def sample_canvases(root: zarr.Group, source: Path, conditions: PatchStore, predictor: Predictor, cfg: PredictConfig, ranks: Ranks,
                    progress: bool) -> None:
    """Fill the prediction store `root` (rows = `conditions` rows) by canvas sampling, resumably:
    condition latents per patch (once), then every slide's canvas step by step, then every patch
    decoded from the final canvas. Work state lives in `root/canvas` until the store is complete."""
    f, k = predictor.factor, cfg.samples
    n, p_px = len(conditions), int(conditions.attrs["patch_size"])
    p, c = p_px // f, latent_channels(predictor.rc)
    s = int(root.attrs["shard_patches"])
    roles = conditions.roles
    plan = predictor.plan
    work_plan = {"sampler": cfg.sampler, "steps": plan.steps, "eta": cfg.eta, "samples": k, "seed": cfg.seed, "window": LATENT_WINDOW,
                 "nuclei": predictor.uses_nuclei(roles)}
    if ranks.main:
        work = root.require_group("canvas")
        if "plan" in work.attrs and dict(work.attrs)["plan"] != work_plan:
            raise InputError(source, "was started with other sampling options", "rerun with the same options, or --overwrite")
        work.attrs["plan"] = work_plan
        cc = condition_channels(predictor.rc) * (2 if predictor.uses_nuclei(roles) else 1)
        if "cond" not in work:
            work.create_array("cond", shape=(n, cc, p, p), dtype=np.float32, chunks=(1, cc, p, p), shards=(s, cc, p, p),
                              compressors=None, fill_value=0)
            work.create_array("cond_done", shape=root["shard_done"].shape, dtype=np.uint8, chunks=(1,), fill_value=0)
            work.create_array("steps_done", shape=(len(conditions.slides),), dtype=np.int32, chunks=(1,), fill_value=0)
            for name in ("gate_divergence", "gate_share"):
                work.create_array(name, shape=(plan.steps, n), dtype=np.float32, chunks=(1, n), fill_value=np.nan)
    ranks.barrier()
    work = root["canvas"]
    _encode_conditions(work, conditions, predictor, s, ranks, progress)
    ranks.barrier()
    coords = conditions.coords
    bar = progress_bar(total=plan.steps * n, desc=f"sampling ({plan.kind}, {plan.steps} steps, canvas)", unit="patch-step",
               disable=None if (progress and ranks.main) else True)
    for si, entry in enumerate(conditions.slides):
        rows = np.nonzero(coords[:, 0] == si)[0]
        if not len(rows):
            continue
        _sample_slide(work, si, entry, rows, coords[rows, 1:] // f, p, c, int(conditions.attrs["stride"]) // f, predictor, cfg, ranks, bar)
    bar.close()
    _decode(root, work, conditions, predictor, cfg, p, c, ranks, progress)


def _encode_conditions(work: zarr.Group, conditions: PatchStore, predictor: Predictor, s: int, ranks: Ranks, progress: bool) -> None:
    cond, done = work["cond"], work["cond_done"]
    n = cond.shape[0]
    todo = _shards_of(ranks, np.asarray(done[:]))
    for shard in progress_bar(todo, desc="encoding conditions", unit="shard", disable=None if (progress and ranks.main) else True):
        a, b = shard * s, min((shard + 1) * s, n)
        images = to_model_range(read_rows(conditions.images, np.arange(a, b)))
        rows = np.arange(a, b)
        cond[a:b] = predictor.conditions(images, conditions.roles, predictor.context(conditions, rows)).cpu().numpy()
        done[shard] = 1


def _sample_slide(work: zarr.Group, si: int, entry: dict, rows: np.ndarray, yx: np.ndarray, p: int, c: int, stride_rows: int,
                  predictor: Predictor, cfg: PredictConfig, ranks: Ranks, bar) -> None:
    """Every step of one slide's canvas; `rows` its store rows (sorted by y, then x), `yx` their latent corners."""
    f, k, plan = predictor.factor, cfg.samples, predictor.plan
    height, width = (int(v) // f for v in entry["shape"])
    windows = Windows(yx.astype(np.int64), p)
    shape = (k, c, height, width)
    if ranks.main:
        for name in ("x_0", "x_1", "x0_0", "x0_1"):
            _canvas_array(work.require_group(f"slide_{si}"), name, shape, stride_rows)
    ranks.barrier()
    group = work[f"slide_{si}"]
    xs, x0s = [writable(group[f"x_{j}"]) for j in (0, 1)], [writable(group[f"x0_{j}"]) for j in (0, 1)]
    cond, steps_done = work["cond"], work["steps_done"]
    key = canvas_key(cfg.seed, entry["slide_id"])
    first = int(steps_done[si])
    bar.update(first * len(rows))

    def noise(step: int, y0: int, y1: int) -> torch.Tensor:
        return canvas_normal(key, k, step, c, y0, y1, 0, width)

    gate_d = np.full(len(rows), np.nan, np.float32)
    gate_share = np.zeros(len(rows), np.float32)

    def denoise(idx: np.ndarray, crops: torch.Tensor, i: int) -> torch.Tensor:
        """ε of a window row's crops; ranks take equal shares of the windows and gather the results."""
        m, tail = len(idx), tuple(crops.shape[1:])
        share = -(-m // ranks.world)
        mine = np.arange(ranks.rank * share, min(m, (ranks.rank + 1) * share))
        crops = crops.view(k, m, *tail)
        eps = torch.zeros((len(mine), k) + tail)  # window-major, to gather along windows
        gate = torch.zeros((len(mine), 2))
        for j in range(0, len(mine), cfg.batch_size):
            sel = mine[j : j + cfg.batch_size]
            den = predictor.denoiser(torch.from_numpy(read_rows(cond, rows[idx[sel]])).to(predictor.device), k)
            x = crops[:, sel].reshape(k * len(sel), *tail).to(predictor.device)
            with torch.inference_mode():
                out = den(x, plan.t_batch(i, len(x), x.device)).float().cpu()
            eps[j : j + len(sel)] = out.view(k, len(sel), *tail).transpose(0, 1)
            d, sh = den.summary(k * len(sel))
            gate[j : j + len(sel)] = torch.from_numpy(np.stack([d.reshape(k, -1).mean(0), sh.reshape(k, -1).mean(0)], 1))
        eps, gate = _gather(ranks, eps, m), _gather(ranks, gate, m).numpy()
        gate_d[idx], gate_share[idx] = gate[:, 0], gate[:, 1]
        bar.update(m)
        return eps.transpose(0, 1).reshape(k * m, *tail)

    for i in range(first, plan.steps):
        canvas_step(plan, i, windows, xs[i % 2], x0s[i % 2], xs[(i + 1) % 2], x0s[(i + 1) % 2], denoise, noise, write=ranks.main)
        if ranks.main:
            work["gate_divergence"][i, rows[0] : rows[-1] + 1] = gate_d
            work["gate_share"][i, rows[0] : rows[-1] + 1] = gate_share
            steps_done[si] = i + 1  # after the step's state: a flag never names unwritten data
        ranks.barrier()


def window_crops(canvas, windows: np.ndarray, all_windows: np.ndarray, p: int, halo: int) -> torch.Tensor:
    """(K, n, C, p + 2·halo, p + 2·halo): the `windows` (n, 2) of a (K, C, H, W) canvas with `halo`
    latent pixels of context around each; context no window of `all_windows` covers (outside the
    tissue or the canvas) is zero, as the decoder saw at the borders of its training patches."""
    k, c, height, width = canvas.shape
    y0, y1 = max(0, int(windows[:, 0].min()) - halo), min(height, int(windows[:, 0].max()) + p + halo)
    band = torch.from_numpy(np.asarray(canvas[:, :, y0:y1, :]))
    covered = torch.zeros(y1 - y0, width, dtype=torch.bool)
    for y, x in all_windows[(all_windows[:, 0] < y1) & (all_windows[:, 0] + p > y0)]:
        covered[max(0, y - y0) : y + p - y0, x : x + p] = True
    band = torch.where(covered, band, torch.zeros(()))
    top, bottom = halo - (int(windows[:, 0].min()) - y0), halo - (y1 - int(windows[:, 0].max()) - p)
    band = torch.nn.functional.pad(band, (halo, halo, top, bottom))  # zeros beyond the canvas
    ys, xs = windows[:, 0] - y0 + top - halo, windows[:, 1]
    side = p + 2 * halo
    return torch.stack([band[:, :, y : y + side, x : x + side] for y, x in zip(ys, xs)], 1)


def _decode(root: zarr.Group, work: zarr.Group, conditions: PatchStore, predictor: Predictor, cfg: PredictConfig, p: int, c: int,
            ranks: Ranks, progress: bool) -> None:
    """Every patch's NP map decoded from its window of the final canvas with DECODE_HALO latent pixels of
    canvas around it (so overlapping patches decode alike and patch borders carry no decoder edge),
    mean and sd over draws, with the gate's divergence and multi-modal share averaged over steps;
    shard by shard."""
    f, k, steps = predictor.factor, cfg.samples, predictor.plan.steps
    s = int(root.attrs["shard_patches"])
    n = len(conditions)
    coords = conditions.coords
    nuclei = predictor.uses_nuclei(conditions.roles)
    halo = DECODE_HALO
    todo = _shards_of(ranks, np.asarray(root["shard_done"][:]))
    for shard in progress_bar(todo, desc="decoding", unit="shard", disable=None if (progress and ranks.main) else True):
        a, b = shard * s, min((shard + 1) * s, n)
        crops = []
        for si in np.unique(coords[a:b, 0]):
            sel = np.nonzero(coords[a:b, 0] == si)[0] + a
            slide_windows = coords[coords[:, 0] == si, 1:] // f
            crops.append(window_crops(work[f"slide_{si}"][f"x_{steps % 2}"], coords[sel, 1:] // f, slide_windows, p, halo))
        z0 = torch.cat(crops, 1).reshape(k * (b - a), c, p + 2 * halo, p + 2 * halo)
        mean, sd = predictor.decode(z0, k)
        inner = np.s_[:, :, halo * f : (halo + p) * f, halo * f : (halo + p) * f]
        root["pred"][a:b] = mean[inner].astype(np.float16)
        if "pred_sd" in root:
            root["pred_sd"][a:b] = sd[inner].astype(np.float16)
        gate_d = np.asarray(work["gate_divergence"][:, a:b])
        root["divergence"][a:b] = gate_d.mean(0) if nuclei else np.full(b - a, np.nan, np.float32)
        root["multimodal_fraction"][a:b] = np.asarray(work["gate_share"][:, a:b]).mean(0) if nuclei else np.zeros(b - a, np.float32)
        root["shard_done"][shard] = 1
