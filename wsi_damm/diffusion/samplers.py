"""Samplers as plain functions over a model callable `eps_fn(x, t) -> ε` (k-diffusion style).

- DDIM with exact grid look-up: the previous timestep is the next grid entry, never t − T//N
  (diffusers' `step()` gets this wrong for `linspace`/`trailing` spacings). η selectable; the
  last step goes to ᾱ = 1, i.e. returns the x̂0 prediction.
- DPM-Solver++(2M) on a log-SNR-uniform grid (or Karras σ spacing): 10–30 steps. Fractional
  timesteps are passed to the model (its time embedding is continuous).

Noise is drawn through `noise_fn(step) -> tensor`, so callers decide how it is seeded (per patch).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]


def ddim_grid(T: int, steps: int) -> list[int]:
    """Descending integer timesteps from T−1 to 0, evenly spread (rounded)."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    grid = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().flip(0)
    return sorted(set(grid.tolist()), reverse=True)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float, eta: float, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from ᾱ_t to ᾱ_prev; returns (x_prev, x̂0)."""
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(max(0.0, 1 - a_t / a_prev))
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(0.0, 1 - a_prev - sigma**2)) * eps
    if sigma > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def sample_ddim(eps_fn: EpsFn, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 150, eta: float = 0.0, noise_fn: NoiseFn | None = None) -> torch.Tensor:
    grid = ddim_grid(schedule.T, steps)
    ac = schedule.alphas_cumprod
    for i, t in enumerate(grid):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = eps_fn(x, t_batch).to(x.dtype)
        a_prev = float(ac[grid[i + 1]]) if i + 1 < len(grid) else 1.0
        noise = noise_fn(i) if (eta > 0 and noise_fn is not None and i + 1 < len(grid)) else None
        x, _ = ddim_step(x, eps, float(ac[t]), a_prev, eta, noise)
    return x


def _lambdas(schedule: NoiseSchedule) -> torch.Tensor:
    a = schedule.alphas_cumprod
    return 0.5 * (torch.log(a) - torch.log1p(-a))  # λ = log α − log σ


def timestep_for_lambda(schedule: NoiseSchedule, lam: torch.Tensor) -> torch.Tensor:
    """Fractional t with λ(t) = lam, by linear interpolation of the discrete (decreasing) λ table."""
    table = _lambdas(schedule).flip(0)  # increasing in λ, index T−1−t
    idx = torch.searchsorted(table, lam.clamp(table[0], table[-1])).clamp(1, len(table) - 1)
    lo, hi = table[idx - 1], table[idx]
    frac = (lam - lo) / (hi - lo)
    pos = (idx - 1).double() + frac
    return (len(table) - 1) - pos


def dpm_grid(schedule: NoiseSchedule, steps: int, spacing: str = "logsnr", rho: float = 7.0) -> torch.Tensor:
    """λ values (increasing) where the model is evaluated: uniform in log-SNR, or Karras σ spacing."""
    lam = _lambdas(schedule)
    lam_min, lam_max = float(lam[-1]), float(lam[0])
    if spacing == "logsnr":
        return torch.linspace(lam_min, lam_max, steps, dtype=torch.float64)
    if spacing == "karras":
        s_max, s_min = math.exp(-lam_min), math.exp(-lam_max)  # σ/α = e^{−λ}
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        sig = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        return -torch.log(sig)
    raise ValueError(f"unknown spacing {spacing!r}; use logsnr or karras")


def sample_dpmpp_2m(eps_fn: EpsFn, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 20, spacing: str = "logsnr") -> torch.Tensor:
    """DPM-Solver++(2M), data prediction, multistep; ends with the x̂0 of the last evaluation."""
    lams = dpm_grid(schedule, steps, spacing)
    ts = timestep_for_lambda(schedule, lams)
    alpha = torch.sqrt(torch.sigmoid(2 * lams))  # α² = e^{2λ}/(1+e^{2λ})
    sigma = torch.sqrt(torch.sigmoid(-2 * lams))
    prev_x0 = None
    for i in range(steps):
        t_batch = torch.full((x.shape[0],), float(ts[i]), device=x.device, dtype=torch.float32)
        eps = eps_fn(x, t_batch).to(x.dtype)
        x0 = (x - float(sigma[i]) * eps) / float(alpha[i])
        if i == steps - 1:
            return x0
        h = float(lams[i + 1] - lams[i])
        if prev_x0 is None:
            d = x0
        else:
            r = float(lams[i] - lams[i - 1]) / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = (float(sigma[i + 1]) / float(sigma[i])) * x - float(alpha[i + 1]) * math.expm1(-h) * d
        prev_x0 = x0
    return x
