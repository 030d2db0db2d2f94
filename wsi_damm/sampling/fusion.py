"""One sampler step over a whole latent canvas: every window denoised, their x̂0 fused per latent pixel
(MultiDiffusion's per-step fusion with Gaussian weights), every pixel advanced by the sampler's own rule;
swept window row by window row so memory follows the canvas's width. See docs/design/seamless.md."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from wsi_damm.diffusion.samplers import Plan
from wsi_damm.sampling.windows import Windows, fusion_weights

# denoise(window indices, crops (K·n, C, p, p) draw-major, step) → ε of the same shape
Denoise = Callable[[np.ndarray, torch.Tensor, int], torch.Tensor]


# noise(step, y0, y1) → (K, C, y1 − y0, W) standard normals of those canvas rows
Noise = Callable[[int, int, int], torch.Tensor]


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
