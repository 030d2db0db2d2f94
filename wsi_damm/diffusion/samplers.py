"""Samplers as a time grid plus a pure per-step rule, and loops over a model callable `eps_fn(x, t) -> ε`
(k-diffusion style).

- DDIM with exact grid look-up: the previous timestep is the next grid entry, never t − T//N
  (diffusers' `step()` gets this wrong for `linspace`/`trailing` spacings). η selectable; the
  last step goes to ᾱ = 1, i.e. returns the x̂0 prediction.
- DPM-Solver++(2M) on a log-SNR-uniform grid (or Karras σ spacing): 10–30 steps. Fractional
  timesteps are passed to the model (its time embedding is continuous).

A `Plan` states each step's model time and its update as a function of (x, x̂0, previous x̂0,
noise) only, so the same rule advances one patch (`sample`) or, pixel by pixel, a whole-slide
latent canvas whose x̂0 was fused from many overlapping patches (`canvas`).
Noise is drawn through `noise_fn(step) -> tensor`, so callers decide how it is seeded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from wsi_damm.diffusion.schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]
SAMPLERS = ("ddim", "dpm++")


def ddim_grid(T: int, steps: int) -> list[int]:
    """Descending integer timesteps from T−1 to 0, evenly spread (rounded)."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    grid = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().flip(0)
    return sorted(set(grid.tolist()), reverse=True)


def ddim_step(
    x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float, eta: float, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from ᾱ_t to ᾱ_prev; returns (x_prev, x̂0)."""
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return _ddim_from(x0, eps, a_t, a_prev, eta, noise), x0


def _ddim_from(x0: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float, eta: float, noise: torch.Tensor | None) -> torch.Tensor:
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(max(0.0, 1 - a_t / a_prev))
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(0.0, 1 - a_prev - sigma**2)) * eps
    if sigma > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


def timestep_for_lambda(schedule: NoiseSchedule, lam: torch.Tensor) -> torch.Tensor:
    """Fractional t with λ(t) = lam, by linear interpolation of the discrete (decreasing) λ table."""
    table = schedule.lambdas.flip(0)  # increasing in λ, index T−1−t
    idx = torch.searchsorted(table, lam.clamp(table[0], table[-1])).clamp(1, len(table) - 1)
    lo, hi = table[idx - 1], table[idx]
    frac = (lam - lo) / (hi - lo)
    pos = (idx - 1).double() + frac
    return (len(table) - 1) - pos


def dpm_grid(schedule: NoiseSchedule, steps: int, spacing: str = "logsnr", rho: float = 7.0) -> torch.Tensor:
    """λ values (increasing) where the model is evaluated: uniform in log-SNR, or Karras σ spacing."""
    lam = schedule.lambdas
    lam_min, lam_max = float(lam[-1]), float(lam[0])
    if spacing == "logsnr":
        return torch.linspace(lam_min, lam_max, steps, dtype=torch.float64)
    if spacing == "karras":
        s_max, s_min = math.exp(-lam_min), math.exp(-lam_max)  # σ/α = e^{−λ}
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        sig = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        return -torch.log(sig)
    raise ValueError(f"unknown spacing {spacing!r}; use logsnr or karras")


@dataclass(frozen=True)
class Plan:
    """A sampler's steps: model time, x_t = α·x̂0 + σ·ε at each step, and the update to the next state.

    `kind` "ddim": `times` the integer grid, `a` its ᾱ and `a_next` the next entry's (1 after the
    last). `kind` "dpm++": `times` fractional, `lams` the log-SNR grid."""

    kind: str
    times: list[float]
    alpha: list[float]
    sigma: list[float]
    a: list[float] = ()
    a_next: list[float] = ()
    lams: list[float] = ()
    eta: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.times)

    def t_batch(self, i: int, n: int, device: torch.device | str) -> torch.Tensor:
        """The model's time input at step i for a batch of n (integers for DDIM, fractions for DPM++)."""
        if self.kind == "ddim":
            return torch.full((n,), int(self.times[i]), device=device, dtype=torch.long)
        return torch.full((n,), self.times[i], device=device, dtype=torch.float32)

    def needs_noise(self, i: int) -> bool:
        return self.kind == "ddim" and self.eta > 0 and i + 1 < self.steps

    def x0(self, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂0 from the model's ε at step i."""
        return (x - self.sigma[i] * eps) / self.alpha[i]

    def update(
        self,
        i: int,
        x: torch.Tensor,
        x0: torch.Tensor,
        prev_x0: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The state after step i from x_t, x̂0 (and, for DPM++(2M), the previous step's x̂0); ε is
        derived from them unless given. After the last step: x̂0 itself."""
        if self.kind == "ddim":
            if eps is None:
                eps = (x - self.alpha[i] * x0) / self.sigma[i]
            return _ddim_from(x0, eps, self.a[i], self.a_next[i], self.eta, noise)
        if i == self.steps - 1:
            return x0
        h = self.lams[i + 1] - self.lams[i]
        if prev_x0 is None:
            d = x0
        else:
            r = (self.lams[i] - self.lams[i - 1]) / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        return (self.sigma[i + 1] / self.sigma[i]) * x - self.alpha[i + 1] * math.expm1(-h) * d


def ddim_plan(schedule: NoiseSchedule, steps: int = 150, eta: float = 0.0) -> Plan:
    grid = ddim_grid(schedule.T, steps)
    ac = schedule.alphas_cumprod
    a = [float(ac[t]) for t in grid]
    a_next = a[1:] + [1.0]
    return Plan("ddim", [float(t) for t in grid], [math.sqrt(v) for v in a], [math.sqrt(1 - v) for v in a], a, a_next, eta=eta)


def dpm_plan(schedule: NoiseSchedule, steps: int = 20, spacing: str = "logsnr") -> Plan:
    lams = dpm_grid(schedule, steps, spacing)
    ts = timestep_for_lambda(schedule, lams)
    alpha = torch.sqrt(torch.sigmoid(2 * lams))  # α² = e^{2λ}/(1+e^{2λ})
    sigma = torch.sqrt(torch.sigmoid(-2 * lams))
    return Plan("dpm++", [float(t) for t in ts], [float(v) for v in alpha], [float(v) for v in sigma], lams=[float(v) for v in lams])


def make_plan(sampler: str, schedule: NoiseSchedule, steps: int, eta: float = 0.0, spacing: str = "logsnr") -> Plan:
    if sampler == "ddim":
        return ddim_plan(schedule, steps, eta)
    if sampler == "dpm++":
        return dpm_plan(schedule, steps, spacing)
    raise ValueError(f"unknown sampler {sampler!r}; use {' or '.join(SAMPLERS)}")


def sample(eps_fn: EpsFn, x: torch.Tensor, plan: Plan, noise_fn: NoiseFn | None = None) -> torch.Tensor:
    """Run `plan` from x_T through the model: the final x̂0."""
    prev_x0 = None
    for i in range(plan.steps):
        eps = eps_fn(x, plan.t_batch(i, x.shape[0], x.device)).to(x.dtype)
        x0 = plan.x0(i, x, eps)
        noise = noise_fn(i) if (noise_fn is not None and plan.needs_noise(i)) else None
        x, prev_x0 = plan.update(i, x, x0, prev_x0, noise, eps=eps), x0
    return x


def sample_ddim(
    eps_fn: EpsFn, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 150, eta: float = 0.0, noise_fn: NoiseFn | None = None
) -> torch.Tensor:
    return sample(eps_fn, x, ddim_plan(schedule, steps, eta), noise_fn)


def sample_dpmpp_2m(eps_fn: EpsFn, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 20, spacing: str = "logsnr") -> torch.Tensor:
    """DPM-Solver++(2M), data prediction, multistep; ends with the x̂0 of the last evaluation."""
    return sample(eps_fn, x, dpm_plan(schedule, steps, spacing))
