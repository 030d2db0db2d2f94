"""Samplers against diffusers' pinned numbers and the exact solution of a Gaussian toy."""

from __future__ import annotations

import math

import pytest
import torch

from wsi_damm.diffusion.samplers import ddim_grid, ddim_step, sample_ddim, sample_dpmpp_2m, timestep_for_lambda
from wsi_damm.diffusion.schedule import NoiseSchedule

from .reference import REFERENCE, fixed


@pytest.fixture(scope="module")
def ref():
    return REFERENCE


def test_grid_looks_up_the_next_entry():
    grid = ddim_grid(1000, 150)
    assert grid[0] == 999 and grid[1] == 992 and grid[-1] == 0 and len(grid) == 150
    assert all(a > b for a, b in zip(grid, grid[1:]))


def test_ddim_step_matches_reference(ref):
    s = NoiseSchedule.make()
    r = ref["ddim_step"]
    x, eps = fixed((1, 4, 4, 4), 0.3), 0.8 * fixed((1, 4, 4, 4), 1.1)
    a_t, a_prev = float(s.alphas_cumprod[999]), float(s.alphas_cumprod[992])
    x_prev, x0 = ddim_step(x, eps, a_t, a_prev, 0.0, None)
    assert abs(x_prev.sum().item() - r["eta0"]["sum_x_prev"]) <= r["tolerance"]
    assert abs(x0.sum().item() - r["eta0"]["sum_pred_x0"]) <= r["tolerance"] * 100
    torch.testing.assert_close(x_prev[0, 0, 0], torch.tensor(r["eta0"]["x_prev_0_0_0_first4"], dtype=torch.float64), atol=1e-5, rtol=0)
    sigma = math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    assert sigma == pytest.approx(r["eta1"]["sigma"], abs=1e-6)
    x_prev1, _ = ddim_step(x, eps, a_t, a_prev, 1.0, fixed((1, 4, 4, 4), 2.0))
    assert abs(x_prev1.sum().item() - r["eta1"]["sum_x_prev"]) <= r["tolerance"]


def _gaussian_toy(mu=0.5, s=0.3):
    """Data N(μ, s²): the exact ε-prediction and the exact probability-flow solution are closed-form."""
    sched = NoiseSchedule.make()
    ac = sched.alphas_cumprod

    lam = 0.5 * (torch.log(ac) - torch.log1p(-ac))

    def abar(t):  # λ linear between integer steps: the same convention as the sampler's t(λ)
        t = t.double()
        lo = t.floor().long().clamp(0, 999)
        hi = (lo + 1).clamp(max=999)
        w = t - lo.double()
        return torch.sigmoid(2 * (lam[lo] * (1 - w) + lam[hi] * w))

    def eps_fn(x, t):
        a = abar(t).view(-1, 1)
        x0 = mu + a.sqrt() * s**2 * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    def exact(x_T):
        aT, a0 = float(ac[999]), float(ac[0])
        z = (x_T - math.sqrt(aT) * mu) / math.sqrt(aT * s**2 + 1 - aT)
        x_t0 = math.sqrt(a0) * mu + math.sqrt(a0 * s**2 + 1 - a0) * z
        return mu + math.sqrt(a0) * s**2 * (x_t0 - math.sqrt(a0) * mu) / (a0 * s**2 + 1 - a0)

    return sched, eps_fn, exact


def test_dpmpp_20_beats_ddim_150_on_the_gaussian_toy():
    sched, eps_fn, exact = _gaussian_toy()
    x_T = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = exact(x_T)
    err = lambda x: float((x - want).abs().max())  # noqa: E731
    ddim150 = err(sample_ddim(eps_fn, x_T.clone(), sched, 150))
    ddim50 = err(sample_ddim(eps_fn, x_T.clone(), sched, 50))
    dpm20 = err(sample_dpmpp_2m(eps_fn, x_T.clone(), sched, 20))
    dpm50 = err(sample_dpmpp_2m(eps_fn, x_T.clone(), sched, 50))
    dpm150 = err(sample_dpmpp_2m(eps_fn, x_T.clone(), sched, 150))
    karras20 = err(sample_dpmpp_2m(eps_fn, x_T.clone(), sched, 20, spacing="karras"))
    assert ddim150 < ddim50 and dpm150 < dpm50 < dpm20  # both converge (DPM: second order)
    assert dpm20 < ddim150 / 5 and karras20 < ddim150  # 20 DPM++ steps beat 150 DDIM steps


def test_lambda_to_timestep_is_the_inverse_on_integer_steps():
    sched = NoiseSchedule.make()
    lam = 0.5 * (torch.log(sched.alphas_cumprod) - torch.log1p(-sched.alphas_cumprod))
    t = timestep_for_lambda(sched, lam[[0, 10, 500, 999]])
    torch.testing.assert_close(t, torch.tensor([0.0, 10.0, 500.0, 999.0], dtype=torch.float64), atol=1e-6, rtol=0)
