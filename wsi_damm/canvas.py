"""Whole-slide sampling on a shared latent canvas: overlapping patches denoised in lockstep.

Independent sampling gives each patch its own noise and trajectory; neighbours then disagree by
more than any blending window hides, and the map shows the patch grid. Here every sampler step
runs the model on every patch window of the slide's latent canvas, fuses the windows' x̂0
estimates per latent pixel (Σ w·x̂0 / Σ w with a Gaussian window w: MultiDiffusion's per-step
fusion, Bar-Tal et al. 2023, with Mixture-of-Diffusers weights that trust window centres most),
and advances every pixel with the sampler's own rule (`Plan.update`) from the fused x̂0 — so the
canvas holds one trajectory and neighbouring windows agree by construction. DPM-Solver++(2M)
reads the previous step's fused x̂0 from the canvas, never a per-window history; DDIM's η noise
is drawn per canvas pixel.

Two window layouts. "canvas": the tissue patches, overlapping, fused every step. "shifted"
(DiffInfinite, Aversa et al. 2023): a grid of patch-sized windows at an offset drawn anew each step,
so every pixel has one prediction per step and no window border stays put; the last step fuses two
grids half a window apart. Shifted windows need conditions cut anywhere, so they sample runs
trained on canvas latents (`latent_canvas`), whose conditions come from the slide encoded in tiles.

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

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import zarr

from .diffusion.noise import canvas_key, canvas_normal
from .diffusion.samplers import Plan
from .distributed import Ranks
from .errors import InputError
from .heap import release_free_memory
from .latent_canvas import ENCODE_HALO, ENCODE_TILE, check_aligned, coverage, encode_tiled, paste_patches
from .merge import window
from .ome import writable
from .predictor import PredictConfig, Predictor
from .progress import progress_bar
from .run_dir import condition_channels, latent_channels
from .store import PatchStore, read_rows, to_model_range

# denoise(window indices, crops (K·n, C, p, p) draw-major, step) → ε of the same shape
Denoise = Callable[[np.ndarray, torch.Tensor, int], torch.Tensor]
# noise(step, y0, y1) → (K, C, y1 − y0, W) standard normals of those canvas rows
Noise = Callable[[int, int, int], torch.Tensor]
LATENT_WINDOW = "gaussian"
DECODE_HALO = 8  # latent pixels of canvas decoded around each window: past the tiny decoder's receptive field
SHIFT_MARGIN = DECODE_HALO  # latent pixels around the tissue windows a shifted grid samples too: decoding reads sampled context
SWEEP_WINDOWS = 128  # windows per denoiser call (whole window rows): a row of 17 alone pads to 32, nearly half wasted


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


def grid_shift(key: int, step: int, p: int) -> tuple[int, int]:
    """The (dy, dx) offset in [0, p) of step `step`'s window grid: keyed by canvas and step only, so a
    resumed or multi-rank run shifts alike."""
    digest = hashlib.blake2b(f"{key}|{step}|shift".encode(), digest_size=8).digest()
    v = int.from_bytes(digest, "little")
    return v % p, (v >> 32) % p


def shifted_windows(tissue: Windows, height: int, width: int, dy: int, dx: int, margin: int = 0) -> Windows:
    """The windows of a grid of side-p cells whose lines pass through (dy, dx), clipped into the
    canvas, that touch a tissue window grown by `margin`: together they cover every such pixel, each
    (but for the clipped last row and column) exactly once (DiffInfinite's shifted tiling)."""
    p, m = tissue.p, margin
    ys = np.unique(np.clip(np.arange(dy - p, height, p), 0, height - p))
    xs = np.unique(np.clip(np.arange(dx - p, width, p), 0, width - p))
    ty, tx = tissue.yx[:, 0], tissue.yx[:, 1]
    out = []
    for y in ys:  # one pass per grid row: the grown tissue windows within reach, their columns as intervals
        near = tx[(ty > y - p - m) & (ty < y + p + m)]
        if not len(near):
            continue
        d = np.zeros(width + 1, np.int32)
        np.add.at(d, np.clip(near - m - p + 1, 0, width), 1)
        np.add.at(d, np.clip(near + p + m, 0, width), -1)
        touching = d.cumsum()[xs] > 0
        out.append(np.stack([np.full(touching.sum(), y), xs[touching]], 1))
    return Windows(np.concatenate(out).astype(np.int64) if out else np.zeros((0, 2), np.int64), p)


def step_windows(tissue: Windows, height: int, width: int, key: int, step: int, steps: int, margin: int = 0) -> Windows:
    """The windows of shifted-grid step `step` of `steps`. The last step fuses two grids half a cell
    apart: its x̂0 becomes the map, and one grid alone would leave the borders of its windows in it."""
    p = tissue.p
    dy, dx = grid_shift(key, step, p)
    grid = shifted_windows(tissue, height, width, dy, dx, margin)
    if step < steps - 1:
        return grid
    other = shifted_windows(tissue, height, width, (dy + p // 2) % p, (dx + p // 2) % p, margin)
    return Windows(np.unique(np.concatenate([grid.yx, other.yx]), axis=0), p)


def owner(windows: Windows, points: np.ndarray) -> np.ndarray:
    """For each canvas point (m, 2), the index of a window of a shifted grid that contains it (the one
    with the largest corner at or before it; the points must lie under the windows)."""
    ys = np.unique(windows.yx[:, 0])
    row = ys[np.searchsorted(ys, points[:, 0], side="right") - 1]
    keys = windows.yx[:, 0] * (1 << 32) + windows.yx[:, 1]
    return np.searchsorted(keys, row * (1 << 32) + points[:, 1], side="right") - 1


def fuse_sweep(
    windows: Windows,
    width: int,
    values: Callable[[int, int], torch.Tensor],
    emit: Callable[[int, int, torch.Tensor, torch.Tensor], None],
    group: int = 1,
) -> None:
    """Σ w·v and Σ w of every window's values over the canvas, swept window row by window row:
    `values(a, b)` gives the (K, b − a, C, p, p) values of windows [a, b) — whole window rows, as
    many as fit in `group` windows (at least one), so the denoiser's batches are full, not padded
    row by row;
    `emit(y0, y1, num, den)` receives each band of canvas rows no later window touches. Only a band
    of rows is ever held, so memory follows canvas width."""
    p = windows.p
    w = fusion_weights(p)
    rows = windows.rows()
    lo, num, den = 0, None, None  # Σ w·v and Σ w over canvas rows [lo, lo + len(den))
    held, held_a, held_b = None, 0, 0  # values of windows [held_a, held_b)
    for r, (a, b) in enumerate(rows):
        y = int(windows.yx[a, 0])
        if b > held_b:  # fetch this row and the next ones, up to `group` windows
            last = r
            while last + 1 < len(rows) and rows[last + 1][1] - a <= max(group, b - a):
                last += 1
            held_a, held_b = a, rows[last][1]
            held = values(held_a, held_b)
        v = held[:, a - held_a : b - held_a]
        k, c = v.shape[0], v.shape[2]
        if den is None or len(den) == 0:  # the rows above are all emitted
            lo, num, den = y, torch.zeros(k, c, p, width), torch.zeros(p, width)
        if y + p > lo + len(den):  # grow the band downwards
            extra = y + p - (lo + len(den))
            num = torch.cat([num, torch.zeros(k, c, extra, width)], 2)
            den = torch.cat([den, torch.zeros(extra, width)], 0)
        for j, x in enumerate(windows.yx[a:b, 1]):
            num[:, :, y - lo : y - lo + p, x : x + p] += w * v[:, j]
            den[y - lo : y - lo + p, x : x + p] += w
        end = lo + len(den)
        f1 = min(int(windows.yx[rows[r + 1][0], 0]), end) if r + 1 < len(rows) else end
        emit(lo, f1, num[:, :, : f1 - lo], den[: f1 - lo])
        num, den, lo = num[:, :, f1 - lo :], den[f1 - lo :], f1


def row_crops(yx: np.ndarray, p: int, band_at: Callable[[int], torch.Tensor], dim: int) -> torch.Tensor:
    """The p × p windows at `yx` (sorted by row, then column) cut from the bands `band_at(y)` (…, p, W)
    of their rows — one read per window row — stacked along `dim` in the order of `yx`."""
    crops = []
    for y in np.unique(yx[:, 0]):
        band = band_at(int(y))
        crops += [band[..., x : x + p] for x in yx[yx[:, 0] == y, 1]]
    return torch.stack(crops, dim)


def canvas_step(
    plan: Plan,
    i: int,
    windows: Windows,
    x_in,
    x0_in,
    x_out,
    x0_out,
    denoise: Denoise,
    noise: Noise,
    write: bool = True,
    owned: Callable[[int, int], torch.Tensor] | None = None,
    group: int = 1,
) -> None:
    """Sampler step `i` over the canvas. Arrays are (K, C, H, W) (numpy or zarr): `x_in`, `x0_in` hold
    the state after step i − 1 (unread at i = 0: x_T is `noise(0, …)`), `x_out`, `x0_out` receive
    the state after step i and the fused x̂0. Pixels no window covers keep their value.
    `owned(y0, y1)` (shifted grids): the pixels the sampler advances; a window reaching past them
    reads there a zero x̂0 noised to step i's level, (σ_i / σ_0)·x_T, and nothing there is written.
    `write=False` (ranks other than the first) denoises its share and writes nothing. `denoise` gets
    whole window rows, up to `group` windows (at least one row)."""
    p = windows.p

    def read(y0: int, y1: int) -> torch.Tensor:
        x = noise(0, y0, y1) if i == 0 else torch.from_numpy(np.asarray(x_in[:, :, y0:y1, :]))
        if owned is not None and i > 0:
            x = torch.where(owned(y0, y1), x, noise(0, y0, y1) * (plan.sigma[i] / plan.sigma[0]))
        return x

    def values(a: int, b: int) -> torch.Tensor:
        crops = row_crops(windows.yx[a:b], p, lambda y: read(y, y + p), dim=1)
        k, c = crops.shape[0], crops.shape[2]
        crops = crops.reshape(k * (b - a), c, p, p)
        eps = denoise(np.arange(a, b), crops, i).to(crops.dtype)
        return plan.x0(i, crops, eps).reshape(k, b - a, c, p, p)

    def emit(lo: int, f1: int, num: torch.Tensor, den: torch.Tensor) -> None:
        """Rows [lo, f1) are complete: fused x̂0, then the sampler's update, written."""
        x = read(lo, f1)
        covered = den > 0
        if owned is not None:
            covered = covered & owned(lo, f1)
        x0 = torch.where(covered, num / den.clamp_min(1e-30), x)
        prev = torch.from_numpy(np.asarray(x0_in[:, :, lo:f1, :])) if (plan.kind == "dpm++" and i > 0) else None
        eta_noise = noise(i + 1, lo, f1) if plan.needs_noise(i) else None
        x_next = torch.where(covered, plan.update(i, x, x0, prev, eta_noise), x)
        if write:
            x_out[:, :, lo:f1, :] = x_next.numpy()
            x0_out[:, :, lo:f1, :] = x0.numpy()

    fuse_sweep(windows, int(x_out.shape[-1]), values, emit, group)


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


def sample_canvases(
    root: zarr.Group, source: Path, conditions: PatchStore, predictor: Predictor, cfg: PredictConfig, ranks: Ranks, progress: bool
) -> None:
    """Fill the prediction store `root` (rows = `conditions` rows) by canvas sampling, resumably:
    condition latents per patch, or per slide as one canvas (canvas-latent runs), once; then every
    slide's canvas step by step, then every patch decoded from the final canvas. Work state lives in
    `root/canvas` until the store is complete."""
    f, k = predictor.factor, cfg.samples
    n, p_px = len(conditions), int(conditions.attrs["patch_size"])
    p, c = p_px // f, latent_channels(predictor.rc)
    s = int(root.attrs["shard_patches"])
    roles = conditions.roles
    plan = predictor.plan
    work_plan = {
        "sampler": cfg.sampler,
        "steps": plan.steps,
        "eta": cfg.eta,
        "samples": k,
        "seed": cfg.seed,
        "window": LATENT_WINDOW,
        "grid": "shifted" if cfg.sampling == "shifted" else "tissue",
        "nuclei": predictor.uses_nuclei(roles),
    }
    if ranks.main:
        work = root.require_group("canvas")
        if "plan" in work.attrs and dict(work.attrs)["plan"] != work_plan:
            raise InputError(source, "was started with other sampling options", "rerun with the same options, or --overwrite")
        work.attrs["plan"] = work_plan
        cc = condition_channels(predictor.rc) * (2 if predictor.uses_nuclei(roles) else 1)
        if "cond" not in work:
            work.create_array(
                "cond", shape=(n, cc, p, p), dtype=np.float32, chunks=(1, cc, p, p), shards=(s, cc, p, p), compressors=None, fill_value=0
            )
            work.create_array("cond_done", shape=root["shard_done"].shape, dtype=np.uint8, chunks=(1,), fill_value=0)
            work.create_array("steps_done", shape=(len(conditions.slides),), dtype=np.int32, chunks=(1,), fill_value=0)
            for name in ("gate_divergence", "gate_share"):
                work.create_array(name, shape=(plan.steps, n), dtype=np.float32, chunks=(1, n), fill_value=np.nan)
    ranks.barrier()
    work = root["canvas"]
    if predictor.rc.model.latents != "canvas":  # else the conditions are cut from each slide's condition canvas
        _encode_conditions(work, conditions, predictor, s, ranks, progress)
    ranks.barrier()
    coords = conditions.coords
    bar = progress_bar(
        total=plan.steps * n,
        desc=f"sampling ({plan.kind}, {plan.steps} steps, canvas)",
        unit="patch-step",
        disable=None if (progress and ranks.main) else True,
    )
    for si, entry in enumerate(conditions.slides):
        rows = np.nonzero(coords[:, 0] == si)[0]
        if not len(rows):
            continue
        _sample_slide(
            work, si, entry, conditions, rows, coords[rows, 1:] // f, p, c, int(conditions.attrs["stride"]) // f, predictor, cfg, ranks, bar
        )
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


def _condition_canvas(
    work: zarr.Group, si: int, conditions: PatchStore, rows: np.ndarray, predictor: Predictor, height: int, width: int, stride_rows: int
) -> None:
    """The slide's conditions as one (1, C, H, W) latent canvas: its tiled inputs reassembled band by band
    (glass where no patch lies) and encoded in tiles with a halo (`encode_tiled`), so any window cut
    from it is what the run's canvas-latent training cut. Built once per slide, resumably."""
    group = work[f"slide_{si}"]
    f, patch = predictor.factor, int(conditions.attrs["patch_size"])
    cc = latent_channels(predictor.rc) * (2 if predictor.uses_nuclei(conditions.roles) else 1)  # context is cut per window
    canvas = _canvas_array(group, "cond", (1, cc, height, width), stride_rows)
    if group.attrs.get("cond_canvas_done", False):
        return
    yx = conditions.coords[rows, 1:]
    check_aligned(yx, f, conditions.path)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return predictor.latent_conditions(x, conditions.roles, micro_batches=False)

    for y0 in range(0, height, ENCODE_TILE):
        y1 = min(height, y0 + ENCODE_TILE)
        ya, yb = max(0, y0 - ENCODE_HALO), min(height, y1 + ENCODE_HALO)
        near = (yx[:, 0] < yb * f) & (yx[:, 0] + patch > ya * f)
        image = paste_patches(to_model_range(read_rows(conditions.images, rows[near])), yx[near], ya * f, yb * f, width * f)
        with torch.inference_mode():
            z = encode_tiled(image[None], encode, f)
        canvas[:, :, y0:y1, :] = z[:, :, y0 - ya : y1 - ya].float().cpu().numpy()
        del image, z
        release_free_memory()
    group.attrs["cond_canvas_done"] = True


def _sample_slide(
    work: zarr.Group,
    si: int,
    entry: dict,
    conditions: PatchStore,
    rows: np.ndarray,
    yx: np.ndarray,
    p: int,
    c: int,
    stride_rows: int,
    predictor: Predictor,
    cfg: PredictConfig,
    ranks: Ranks,
    bar,
) -> None:
    """Every step of one slide's canvas; `rows` its store rows (sorted by y, then x), `yx` their latent corners.
    `cfg.sampling` "canvas": every step denoises the tissue windows and fuses their overlaps;
    "shifted": every step denoises the cells of a grid shifted by `grid_shift`, conditions cut from
    the condition canvas, and the gate of the cell holding each patch's centre is that patch's."""
    f, k, plan = predictor.factor, cfg.samples, predictor.plan
    height, width = (int(v) // f for v in entry["shape"])
    tissue = Windows(yx.astype(np.int64), p)
    shifted = cfg.sampling == "shifted"
    from_canvas = predictor.rc.model.latents == "canvas"  # conditions cut from the condition canvas
    shape = (k, c, height, width)
    if ranks.main:
        for name in ("x_0", "x_1", "x0_0", "x0_1"):
            _canvas_array(work.require_group(f"slide_{si}"), name, shape, stride_rows)
        if from_canvas:
            _condition_canvas(work, si, conditions, rows, predictor, height, width, stride_rows)
    ranks.barrier()
    group = work[f"slide_{si}"]
    xs, x0s = [writable(group[f"x_{j}"]) for j in (0, 1)], [writable(group[f"x0_{j}"]) for j in (0, 1)]
    cond, steps_done = work["cond"], work["steps_done"]
    key = canvas_key(cfg.seed, entry["slide_id"])
    first = int(steps_done[si])
    bar.update(first * len(rows))
    centres = yx + p // 2

    def noise(step: int, y0: int, y1: int) -> torch.Tensor:
        return canvas_normal(key, k, step, c, y0, y1, 0, width)

    def owned(y0: int, y1: int) -> torch.Tensor:
        return coverage(tissue.yx - SHIFT_MARGIN, p + 2 * SHIFT_MARGIN, y0, y1, width)

    def conditions_of(windows: Windows, idx: np.ndarray) -> torch.Tensor:
        """The conditions of windows `idx` (sorted): patch encodings, or crops of the condition canvas (a
        run trained on canvas latents) with the context around each window where it was cut."""
        if not from_canvas:
            return torch.from_numpy(read_rows(cond, rows[idx]))
        crops = row_crops(windows.yx[idx], p, lambda y: torch.from_numpy(np.asarray(group["cond"][0, :, y : y + p, :])), dim=0)
        span = predictor.rc.model.context_span
        context = conditions.context_at(si, windows.yx[idx] * f, span) if span else None
        return predictor.with_context(crops, conditions.roles, context)

    def denoiser_over(windows: Windows, gate: np.ndarray):
        def denoise(idx: np.ndarray, crops: torch.Tensor, i: int) -> torch.Tensor:
            """ε of a window row's crops; ranks take equal shares of the windows and gather the results."""
            m, tail = len(idx), tuple(crops.shape[1:])
            share = -(-m // ranks.world)
            mine = np.arange(ranks.rank * share, min(m, (ranks.rank + 1) * share))
            crops = crops.view(k, m, *tail)
            eps = torch.zeros((len(mine), k) + tail)  # window-major, to gather along windows
            part = torch.zeros((len(mine), 2))
            for j in range(0, len(mine), cfg.batch_size):
                sel = mine[j : j + cfg.batch_size]
                den = predictor.denoiser(conditions_of(windows, idx[sel]).to(predictor.device), k)
                x = crops[:, sel].reshape(k * len(sel), *tail).to(predictor.device)
                with torch.inference_mode():
                    out = den(x, plan.t_batch(i, len(x), x.device)).float().cpu()
                eps[j : j + len(sel)] = out.view(k, len(sel), *tail).transpose(0, 1)
                d, sh = den.summary(k * len(sel))
                part[j : j + len(sel)] = torch.from_numpy(np.stack([d.reshape(k, -1).mean(0), sh.reshape(k, -1).mean(0)], 1))
            gate[idx] = _gather(ranks, part, m).numpy()
            return _gather(ranks, eps, m).transpose(0, 1).reshape(k * m, *tail)

        return denoise

    for i in range(first, plan.steps):
        windows = step_windows(tissue, height, width, key, i, plan.steps, SHIFT_MARGIN) if shifted else tissue
        gate = np.zeros((len(windows), 2), np.float32)
        canvas_step(
            plan,
            i,
            windows,
            xs[i % 2],
            x0s[i % 2],
            xs[(i + 1) % 2],
            x0s[(i + 1) % 2],
            denoiser_over(windows, gate),
            noise,
            write=ranks.main,
            owned=owned if shifted else None,
            group=SWEEP_WINDOWS,
        )
        if shifted:
            gate = gate[owner(windows, centres)]
        if ranks.main:
            work["gate_divergence"][i, rows[0] : rows[-1] + 1] = gate[:, 0]
            work["gate_share"][i, rows[0] : rows[-1] + 1] = gate[:, 1]
            steps_done[si] = i + 1  # after the step's state: a flag never names unwritten data
        release_free_memory()
        bar.update(len(rows))
        ranks.barrier()


def context_band(
    canvas, y0: int, y1: int, all_windows: np.ndarray, p: int, halo: int, margin: int = 0, mirror_edges: bool = False
) -> torch.Tensor:
    """(K, C, y1 − y0 + 2·halo, W + 2·halo): canvas rows [y0, y1) with `halo` latent pixels of context on
    every side; context no window of `all_windows` (grown by `margin`, the ring a shifted grid samples
    too) covers is zero; beyond the slide's edge it is zero, or the canvas mirrored (`mirror_edges`,
    local autoencoders: the edge then decodes like the inside)."""
    height, width = canvas.shape[-2:]
    a, b = max(0, y0 - halo), min(height, y1 + halo)
    band = torch.from_numpy(np.asarray(canvas[:, :, a:b, :]))
    band = torch.where(coverage(all_windows - margin, p + 2 * margin, a, b, width), band, torch.zeros(()))
    pad = (halo, halo, halo - (y0 - a), halo - (b - y1))  # beyond the canvas
    return torch.nn.functional.pad(band, pad, mode="reflect" if mirror_edges else "constant")


def window_crops(
    canvas, windows: np.ndarray, all_windows: np.ndarray, p: int, halo: int, margin: int = 0, mirror_edges: bool = False
) -> torch.Tensor:
    """(K, n, C, p + 2·halo, p + 2·halo): the `windows` (n, 2) of a (K, C, H, W) canvas with `halo`
    latent pixels of context around each, as `context_band` gives it."""
    y0 = int(windows[:, 0].min())
    band = context_band(canvas, y0, int(windows[:, 0].max()) + p, all_windows, p, halo, margin, mirror_edges)
    side = p + 2 * halo
    return torch.stack([band[:, :, y - y0 : y - y0 + side, x : x + side] for y, x in windows], 1)


def region_blocks(windows: np.ndarray, p: int, spare: float = 2.0) -> list[np.ndarray]:
    """The indices of `windows` (n, 2; sorted by row) in blocks of consecutive window rows whose bounding
    box is at most `spare` times the area of its rows' own spans (a block decoded as one region
    then wastes little on what lies between)."""
    blocks, cur, own = [], [], 0
    for y in np.unique(windows[:, 0]):
        idx = np.nonzero(windows[:, 0] == y)[0]
        span = int(windows[idx, 1].max()) + p - int(windows[idx, 1].min())
        if cur:
            sel = np.concatenate(cur + [idx])
            box = (int(windows[sel, 0].max()) + p - int(windows[sel, 0].min())) * (
                int(windows[sel, 1].max()) + p - int(windows[sel, 1].min())
            )
            if box > spare * (own + span * p):
                blocks.append(np.concatenate(cur))
                cur, own = [], 0
        cur.append(idx)
        own += span * p
    return blocks + ([np.concatenate(cur)] if cur else [])


def _decode(
    root: zarr.Group,
    work: zarr.Group,
    conditions: PatchStore,
    predictor: Predictor,
    cfg: PredictConfig,
    p: int,
    c: int,
    ranks: Ranks,
    progress: bool,
) -> None:
    """Every patch's NP map decoded from the final canvas with DECODE_HALO latent pixels of canvas around
    it (so overlapping patches decode alike and patch borders carry no decoder edge), mean and sd over
    draws, with the gate's divergence and multi-modal share averaged over steps; shard by shard.
    A local decoder decodes each block of the shard's patch rows as one region, in tiles
    (`decode_tiled`: every pixel once, not once per overlapping patch); a GroupNorm decoder, whose
    output depends on the whole input, decodes each patch's window alone."""
    f, k, steps = predictor.factor, cfg.samples, predictor.plan.steps
    s = int(root.attrs["shard_patches"])
    n = len(conditions)
    coords = conditions.coords
    nuclei = predictor.uses_nuclei(conditions.roles)
    halo, local = DECODE_HALO, predictor.rc.autoencoder.local
    margin = SHIFT_MARGIN if cfg.sampling == "shifted" else 0  # sampled context around the tissue windows
    todo = _shards_of(ranks, np.asarray(root["shard_done"][:]))
    for shard in progress_bar(todo, desc="decoding", unit="shard", disable=None if (progress and ranks.main) else True):
        a, b = shard * s, min((shard + 1) * s, n)
        mean = np.zeros((b - a, 1, p * f, p * f), np.float32)
        sd = np.zeros_like(mean)
        for si in np.unique(coords[a:b, 0]):
            sel = np.nonzero(coords[a:b, 0] == si)[0]
            canvas = work[f"slide_{si}"][f"x_{steps % 2}"]
            windows, slide_windows = coords[a + sel, 1:] // f, coords[coords[:, 0] == si, 1:] // f
            if not local:
                z0 = window_crops(canvas, windows, slide_windows, p, halo, margin).reshape(-1, c, p + 2 * halo, p + 2 * halo)
                m, d = predictor.decode(z0, k)
                inner = np.s_[:, :, halo * f : (halo + p) * f, halo * f : (halo + p) * f]
                mean[sel], sd[sel] = m[inner], d[inner]
                continue
            for block in region_blocks(windows, p):
                (y0, x0), (y1, x1) = windows[block].min(0), windows[block].max(0) + p
                z = context_band(canvas, int(y0), int(y1), slide_windows, p, halo, margin, mirror_edges=True)[:, :, :, x0 : x1 + 2 * halo]
                m, d = predictor.decode_region(z, halo)
                for j, (y, x) in zip(sel[block], windows[block]):
                    mean[j], sd[j] = (
                        m[:, (y - y0) * f : (y - y0 + p) * f, (x - x0) * f : (x - x0 + p) * f],
                        d[:, (y - y0) * f : (y - y0 + p) * f, (x - x0) * f : (x - x0 + p) * f],
                    )
        root["pred"][a:b] = mean.astype(np.float16)
        if "pred_sd" in root:
            root["pred_sd"][a:b] = sd.astype(np.float16)
        gate_d = np.asarray(work["gate_divergence"][:, a:b])
        root["divergence"][a:b] = gate_d.mean(0) if nuclei else np.full(b - a, np.nan, np.float32)
        root["multimodal_fraction"][a:b] = np.asarray(work["gate_share"][:, a:b]).mean(0) if nuclei else np.zeros(b - a, np.float32)
        root["shard_done"][shard] = 1
        release_free_memory()
