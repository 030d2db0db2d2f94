"""`predict --sampling canvas | shifted`: a prediction store's slides sampled on their latent canvases,
streamed in window rows with the state in zarr (a killed step is redone from the untouched previous one),
then each patch decoded with canvas context around it. Design and reasons: docs/design/seamless.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import zarr

from wsi_damm.diffusion.noise import canvas_key, canvas_normal
from wsi_damm.sampling.draws import STATS, crop
from wsi_damm.sampling.fusion import canvas_step, row_crops
from wsi_damm.sampling.predictor import PredictConfig, Predictor
from wsi_damm.sampling.windows import LATENT_WINDOW, Windows, context_band, owner, region_blocks, step_windows, window_crops
from wsi_damm.slides.ome import writable
from wsi_damm.tiling.store import PatchStore, read_rows, to_model_range
from wsi_damm.training.latent_canvas import ENCODE_HALO, ENCODE_TILE, check_aligned, coverage, encode_tiled, paste_patches
from wsi_damm.training.run_dir import condition_channels, latent_channels
from wsi_damm.util.distributed import Ranks
from wsi_damm.util.errors import InputError
from wsi_damm.util.heap import release_free_memory
from wsi_damm.util.progress import progress_bar

DECODE_HALO = 8  # latent pixels of canvas decoded around each window: past the tiny decoder's receptive field
SHIFT_MARGIN = DECODE_HALO  # latent pixels around the tissue windows a shifted grid samples too: decoding reads sampled context
SWEEP_WINDOWS = 128  # windows per denoiser call (whole window rows): a row of 17 alone pads to 32, nearly half wasted


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
    it (so overlapping patches decode alike and patch borders carry no decoder edge), the draws' statistics
    (`draws.draw_stats`), with the gate's divergence and multi-modal share averaged over steps; shard by shard.
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
        names = [name for name in STATS if name in root]
        stats = {name: np.zeros((b - a, 1, p * f, p * f), np.float32) for name in names}
        for si in np.unique(coords[a:b, 0]):
            sel = np.nonzero(coords[a:b, 0] == si)[0]
            canvas = work[f"slide_{si}"][f"x_{steps % 2}"]
            windows, slide_windows = coords[a + sel, 1:] // f, coords[coords[:, 0] == si, 1:] // f
            if not local:
                z0 = window_crops(canvas, windows, slide_windows, p, halo, margin).reshape(-1, c, p + 2 * halo, p + 2 * halo)
                got = crop(predictor.decode(z0, k), np.s_[:, :, halo * f : (halo + p) * f, halo * f : (halo + p) * f])
                for name in names:
                    stats[name][sel] = got[name]
                continue
            for block in region_blocks(windows, p):
                (y0, x0), (y1, x1) = windows[block].min(0), windows[block].max(0) + p
                z = context_band(canvas, int(y0), int(y1), slide_windows, p, halo, margin, mirror_edges=True)[:, :, :, x0 : x1 + 2 * halo]
                got = predictor.decode_region(z, halo)
                for j, (y, x) in zip(sel[block], windows[block]):
                    for name in names:
                        stats[name][j] = got[name][:, (y - y0) * f : (y - y0 + p) * f, (x - x0) * f : (x - x0 + p) * f]
        for name in names:
            root[name][a:b] = stats[name].astype(np.float16)
        gate_d = np.asarray(work["gate_divergence"][:, a:b])
        root["divergence"][a:b] = gate_d.mean(0) if nuclei else np.full(b - a, np.nan, np.float32)
        root["multimodal_fraction"][a:b] = np.asarray(work["gate_share"][:, a:b]).mean(0) if nuclei else np.zeros(b - a, np.float32)
        root["shard_done"][shard] = 1
        release_free_memory()
