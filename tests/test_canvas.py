"""Canvas sampling: a lone window is plain sampling; overlapping windows agree only when fused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_damm.diffusion.noise import canvas_normal
from wsi_damm.diffusion.samplers import ddim_plan, dpm_plan, sample
from wsi_damm.diffusion.schedule import NoiseSchedule
from wsi_damm.evaluation.metrics import seam_score, seam_sums
from wsi_damm.sampling.fusion import canvas_step
from wsi_damm.sampling.windows import Windows
from wsi_damm.stitching.merge import BlendMerger, window
from wsi_damm.tiling.grid import grid_positions

SCHEDULE = NoiseSchedule.make()
PLANS = {"ddim-eta0": ddim_plan(SCHEDULE, 12, 0.0), "ddim-eta1": ddim_plan(SCHEDULE, 12, 1.0), "dpm++": dpm_plan(SCHEDULE, 8)}


def run_canvas(plan, windows: Windows, shape: tuple[int, int, int, int], eps_fn, key: int = 7) -> np.ndarray:
    """All steps of `plan` on an in-memory canvas; eps_fn(window indices, crops, t) -> ε."""
    k, c, h, w = shape
    xs = [np.zeros(shape, np.float32) for _ in range(2)]
    x0s = [np.zeros(shape, np.float32) for _ in range(2)]
    noise = lambda step, y0, y1: canvas_normal(key, k, step, c, y0, y1, 0, w)  # noqa: E731
    for i in range(plan.steps):
        denoise = lambda idx, crops, i=i: eps_fn(idx, crops, plan.t_batch(i, len(crops), "cpu"))  # noqa: E731
        canvas_step(plan, i, windows, xs[i % 2], x0s[i % 2], xs[(i + 1) % 2], x0s[(i + 1) % 2], denoise, noise)
    return xs[plan.steps % 2]


def toy_eps(x: torch.Tensor, t: torch.Tensor, mu: float = 0.5, s: float = 0.3) -> torch.Tensor:
    """Exact ε of data N(μ, s²) per element (the samplers' Gaussian toy)."""
    a = SCHEDULE.alpha_bar_at(t).float().view(-1, *([1] * (x.ndim - 1)))
    x0 = mu + a.sqrt() * s**2 * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)
    return (x - a.sqrt() * x0) / (1 - a).sqrt()


@pytest.mark.parametrize("name", list(PLANS))
def test_a_lone_window_is_plain_sampling(name):
    plan, k, c, p = PLANS[name], 2, 3, 16
    got = run_canvas(plan, Windows(np.array([[0, 0]]), p), (k, c, p, p), lambda idx, crops, t: toy_eps(crops, t))
    x_t = canvas_normal(7, k, 0, c, 0, p, 0, p)
    want = sample(lambda x, t: toy_eps(x, t), x_t, plan, lambda i: canvas_normal(7, k, i + 1, c, 0, p, 0, p))
    # the canvas fuses w·x̂0 / w and re-derives ε from x̂0: float32 rounding only
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=2e-5)


def test_overlapping_windows_leave_no_seams_only_when_fused():
    """A stand-in denoiser like a small conv net whose answer depends on the noise it starts from:
    x̂0 = smooth truth + a 5 × 5 box blur of the crop / √ᾱ_t (zero padded at the crop's border).
    Sampled alone, each window follows its own noise to its own answer and the blend shows the
    grid; fused on the canvas every step, neighbours see the same pixels and agree."""
    from scipy import ndimage

    p, stride, size = 16, 12, 64
    truth = ndimage.gaussian_filter(np.random.default_rng(1).normal(size=(size, size)), 3).astype(np.float32) * 4
    pos = grid_positions(size, p, stride)
    yx = np.array([(y, x) for y in pos for x in pos])
    windows = Windows(yx, p)
    plan = PLANS["dpm++"]

    def eps_of(x, t, g):
        a = SCHEDULE.alpha_bar_at(t).float().view(-1, 1, 1, 1)
        x0 = g + torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=True) / a.sqrt().clamp_min(0.05)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    def crops_of(idx):
        return torch.stack([torch.from_numpy(truth[y : y + p, x : x + p]) for y, x in yx[idx]])[:, None]

    fused = run_canvas(plan, windows, (1, 1, size, size), lambda idx, crops, t: eps_of(crops, t, crops_of(idx)))[0, 0]
    merger = BlendMerger(0, size, 0, size, window("gaussian", p), 1)
    alone = [
        sample(lambda x, t, j=j: eps_of(x, t, crops_of([j])), canvas_normal(100 + j, 1, 0, 1, 0, p, 0, p), plan)[0, 0].numpy()
        for j in range(len(yx))
    ]
    merger.aggregate([np.stack(alone)], yx, np.zeros((len(yx), 2), np.float32))
    blended = merger.finalize()[0][0]
    covered = np.ones((size, size), bool)
    score_fused, score_alone = seam_score(seam_sums(fused, covered, stride)), seam_score(seam_sums(blended, covered, stride))
    assert score_alone > 1.5, score_alone  # the grid shows
    assert score_fused <= 1.15, score_fused  # it does not


def test_decode_crops_carry_canvas_context_and_zeros_elsewhere():
    from wsi_damm.sampling.windows import window_crops

    canvas = np.arange(2 * 1 * 20 * 30, dtype=np.float32).reshape(2, 1, 20, 30) + 1
    windows = np.array([[0, 0], [0, 8], [12, 22]])
    covered = np.zeros((20, 30), bool)
    for y, x in windows:
        covered[y : y + 8, x : x + 8] = True
    want = np.pad(np.where(covered, canvas, 0), ((0, 0), (0, 0), (3, 3), (3, 3)))  # zero context outside windows and canvas
    crops = window_crops(canvas, windows[[1, 2]], windows, p=8, halo=3)
    assert crops.shape == (2, 2, 1, 14, 14)
    for j, (y, x) in enumerate(windows[[1, 2]]):
        np.testing.assert_array_equal(crops[:, j].numpy(), want[:, :, y : y + 14, x : x + 14])
    assert crops[:, 0, :, 3:11, :3].min() > 0  # the neighbouring window (0, 0) is context


def test_shifted_grids_leave_no_seams_without_fusion():
    """The same stand-in denoiser on a grid of non-overlapping windows: kept in place every step, its
    windows disagree at their borders and the map shows the grid; shifted at random every step
    (DiffInfinite), every border is crossed by some window most steps, the last step fuses two grids
    half a cell apart, and the grid is gone."""
    from scipy import ndimage

    from wsi_damm.sampling.windows import step_windows

    p, size = 16, 96
    truth = ndimage.gaussian_filter(np.random.default_rng(1).normal(size=(size, size)), 3).astype(np.float32) * 4
    tissue = Windows(np.array([(y, x) for y in range(0, size, p) for x in range(0, size, p)]), p)
    plan = dpm_plan(SCHEDULE, 16)

    def eps_of(x, t, yx):
        g = torch.stack([torch.from_numpy(truth[y : y + p, x : x + p]) for y, x in yx])[:, None]
        a = SCHEDULE.alpha_bar_at(t).float().view(-1, 1, 1, 1)
        x0 = g + torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=True) / a.sqrt().clamp_min(0.05)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    calls: list[np.ndarray] = []

    def run(shift: bool, group: int = 1) -> np.ndarray:
        shape = (1, 1, size, size)
        xs, x0s = [np.zeros(shape, np.float32) for _ in range(2)], [np.zeros(shape, np.float32) for _ in range(2)]
        noise = lambda step, y0, y1: canvas_normal(3, 1, step, 1, y0, y1, 0, size)  # noqa: E731
        for i in range(plan.steps):
            w = step_windows(tissue, size, size, 3, i, plan.steps) if shift else tissue

            def denoise(idx, crops, i=i, w=w):
                calls.append((w.yx, idx))
                return eps_of(crops, plan.t_batch(i, len(crops), "cpu"), w.yx[idx])

            canvas_step(plan, i, w, xs[i % 2], x0s[i % 2], xs[(i + 1) % 2], x0s[(i + 1) % 2], denoise, noise, group=group)
        return xs[plan.steps % 2][0, 0]

    covered = np.ones((size, size), bool)
    fixed, shifted = seam_score(seam_sums(run(False), covered, p)), seam_score(seam_sums(run(True), covered, p))
    assert fixed > 1.5, fixed
    assert shifted <= 1.15, shifted
    # several window rows per denoiser call (full batches) change nothing: the same windows, the same map
    calls.clear()
    grouped = run(True, group=15)
    np.testing.assert_array_equal(grouped, run(True, group=1)[...])
    sizes = [len(idx) for _, idx in calls]
    assert max(sizes) <= 15 and max(sizes) > 7, sizes  # rows of 6 or 7 windows: two per call
    for yx, idx in calls:  # whole rows, in order
        assert (np.diff(idx) == 1).all()
        for y in np.unique(yx[idx, 0]):
            assert (yx[idx, 0] == y).sum() == (yx[:, 0] == y).sum()


def test_shifted_windows_tile_the_tissue_and_its_margin():
    """Brute force: the windows of a shifted grid lie in the canvas, cover every pixel of the tissue
    windows grown by the margin, overlap only where clipped at the canvas edge, and skip cells that
    touch no grown tissue; `owner` finds a window holding each point; `coverage` matches painting."""
    from wsi_damm.sampling.windows import owner, shifted_windows
    from wsi_damm.training.latent_canvas import coverage

    rng = np.random.default_rng(4)
    h, w, p, m = 90, 131, 16, 3
    yx = np.array(sorted({(int(y), int(x)) for y, x in zip(rng.integers(0, h - p, 14) // 4 * 4, rng.integers(0, w - p, 14) // 4 * 4)}))
    grown = np.zeros((h, w), bool)
    plain = np.zeros((h, w), bool)
    for y, x in yx:
        grown[max(0, y - m) : y + p + m, max(0, x - m) : x + p + m] = True
        plain[y : y + p, x : x + p] = True
    np.testing.assert_array_equal(coverage(yx, p, 0, h, w).numpy(), plain)
    np.testing.assert_array_equal(coverage(yx, p, 20, 61, w).numpy(), plain[20:61])
    for dy, dx in ((0, 0), (5, 11), (15, 1)):
        win = shifted_windows(Windows(yx, p), h, w, dy, dx, margin=m)
        assert (win.yx >= 0).all() and (win.yx[:, 0] + p <= h).all() and (win.yx[:, 1] + p <= w).all()
        count = np.zeros((h, w), int)
        for y, x in win.yx:
            count[y : y + p, x : x + p] += 1
            assert grown[y : y + p, x : x + p].any()  # every window touches the grown tissue
        assert (count[grown] >= 1).all()
        yy, xx = np.nonzero(count > 1)  # cells overlap only where clipped into the canvas
        assert ((yy < p) | (yy >= h - p) | (xx < p) | (xx >= w - p)).all()
        points = np.argwhere(grown)
        o = owner(win, points)
        held = win.yx[o]
        assert ((held <= points) & (points < held + p)).all()
