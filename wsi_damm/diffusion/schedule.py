"""Discrete noise schedules (T steps) and the forward process q(z_t | z_0)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ_t for t = 0 … T−1 (float64 on CPU: coefficients are looked up, then cast)."""

    alphas_cumprod: torch.Tensor

    @property
    def T(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def make(cls, kind: str = "scaled_linear", T: int = 1000, beta_start: float = 0.002, beta_end: float = 0.02) -> NoiseSchedule:
        """`scaled_linear` (authors' default: linspace(√β0, √β1, T)²), `linear`, or `cosine`."""
        if kind == "scaled_linear":
            betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64) ** 2
        elif kind == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif kind == "cosine":  # Nichol & Dhariwal 2021, s = 0.008, β clipped at 0.999
            s = 0.008
            steps = torch.arange(T + 1, dtype=torch.float64) / T
            f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"unknown schedule {kind!r}; use scaled_linear, linear or cosine")
        return cls(torch.cumprod(1 - betas, dim=0))

    @property
    def lambdas(self) -> torch.Tensor:
        """λ_t = log α_t − log σ_t = ½ log(ᾱ_t / (1 − ᾱ_t)), decreasing in t: the samplers' time axis."""
        a = self.alphas_cumprod
        return 0.5 * (torch.log(a) - torch.log1p(-a))

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1−ᾱ_t)) shaped to broadcast over `like` (B, …)."""
        a = self.alphas_cumprod[t.cpu()].to(device=like.device, dtype=like.dtype)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a.sqrt().view(shape), (1 - a).sqrt().view(shape)

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε."""
        a, s = self.coefficients(t, z0)
        return a * z0 + s * noise

    def alpha_bar_at(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at integer or fractional t (log-SNR linear between steps, as the samplers assume)."""
        lam = self.lambdas
        t = t.detach().double().cpu().clamp(0, self.T - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.T - 1)
        w = t - lo.double()
        return torch.sigmoid(2 * (lam[lo] * (1 - w) + lam[hi] * w))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR_t = ᾱ_t / (1 − ᾱ_t) at integer t, float64 on CPU."""
        a = self.alphas_cumprod[t.cpu()]
        return a / (1 - a)

    def min_snr_weights(self, t: torch.Tensor, gamma: float, objective: str) -> torch.Tensor:
        """(B,) per-sample loss weights of Min-SNR-γ (Hang et al., ICCV 2023): the loss of each timestep weighted as
        if the network predicted z_0 with weight min(SNR, γ), so the nearly noiseless steps — many and easy — no
        longer crowd out the noisy ones that decide where bright, rare structure goes. Dividing by the objective's
        own weight (SNR for ε, SNR + 1 for v) leaves each timestep's optimum where it was."""
        snr = self.snr(t)
        own = snr if objective == "eps" else snr + 1
        return (snr.clamp(max=gamma) / own).float()

    def v_target(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ ε − √(1−ᾱ) z_0 (Salimans & Ho 2022)."""
        a, s = self.coefficients(t, z0)
        return a * noise - s * z0

    def eps_from_v(self, z_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """ε = √(1−ᾱ) z_t + √ᾱ v, at integer or fractional t."""
        a = self.alpha_bar_at(t).to(device=z_t.device, dtype=z_t.dtype).view((-1,) + (1,) * (z_t.ndim - 1))
        return (1 - a).sqrt() * z_t + a.sqrt() * v
