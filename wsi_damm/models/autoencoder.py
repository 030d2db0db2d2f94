"""Per-modality KL autoencoder: image (1, P, P) in [-1, 1] ↔ latent (c, P/f, P/f).

f = 1 is the identity (pixel-space diffusion, used in tests). By default (the paper's kind) GroupNorm
makes a patch's latents depend on the whole patch, and nearest-neighbour upsampling leaves a texture of
period f in decoded maps. `local=True` normalises per pixel (`PixelNorm`) or not at all (`local_norm="none"`) and upsamples bilinearly:
encoder and decoder then act locally, so a slide encoded or decoded in tiles with a halo
(`latent_canvas.encode_tiled`) equals the slide done whole — what canvas sampling needs. No perceptual loss (it would need
downloaded weights): L1 + a small KL weight, optionally + (1 − SSIM).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsi_damm.models.blocks import Downsample, ResBlock, Upsample, norm_layer


def to_power(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """An image in [-1, 1] with its intensity in [0, 1] raised to `gamma` (values below 0 count as 0)."""
    return x if gamma == 1 else 2 * ((x + 1) / 2).clamp(min=0) ** gamma - 1


class Autoencoder(nn.Module):
    """`gamma` < 1 codes the intensity raised to that power and decodes back (`to_power`): dim values, most of a
    sparse stain, get a larger share of the code's range, so the background level and faint signal are
    reconstructed finely in linear units. Pointwise, so it keeps a local autoencoder local."""

    def __init__(
        self,
        factor: int = 4,
        latent_channels: int = 4,
        channels: tuple[int, ...] = (32, 64),
        local: bool = False,
        local_norm: str = "pixel",
        gamma: float = 1.0,
        standardise: bool = False,
        refit: bool = False,
    ) -> None:
        super().__init__()
        if factor not in (1, 2, 4, 8, 16):
            raise ValueError(f"downsampling factor must be 1, 2, 4, 8 or 16, got {factor}")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.factor = factor
        self.gamma = 1.0 if factor == 1 else gamma
        self.latent_channels = 1 if factor == 1 else latent_channels
        self.register_buffer("scale", torch.ones(()))  # latents × scale have unit variance
        if standardise and factor > 1:  # set from the training patches by `standardise_on`; saved with the weights
            self.register_buffer("coded_mean", torch.zeros(()))
            self.register_buffer("coded_sd", torch.ones(()))
        if refit and factor > 1:  # set from the training patches by `refit_on` after training; saved with the weights
            self.register_buffer("decoded_gain", torch.ones(()))
            self.register_buffer("decoded_shift", torch.zeros(()))
        if factor == 1:
            return
        levels = int(math.log2(factor))
        norm, up = (local_norm, "bilinear") if local else ("group", "nearest")
        chs = [channels[min(i, len(channels) - 1)] for i in range(levels + 1)]
        # resolution drops before width grows: full-resolution layers stay thin (CPU-friendly)
        enc: list[nn.Module] = [nn.Conv2d(1, chs[0], 3, padding=1)]
        for i in range(levels):
            enc += [Downsample(chs[i]), ResBlock(chs[i], chs[i + 1], norm=norm)]
        enc += [
            ResBlock(chs[-1], chs[-1], norm=norm),
            norm_layer(norm, chs[-1]),
            nn.SiLU(),
            nn.Conv2d(chs[-1], 2 * latent_channels, 3, padding=1),
        ]
        self.encoder = nn.Sequential(*enc)
        with torch.no_grad():  # start with a narrow posterior: early training is not drowned in sampling noise
            self.encoder[-1].bias[latent_channels:].fill_(-6.0)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, chs[-1], 3, padding=1), ResBlock(chs[-1], chs[-1], norm=norm)]
        for i in reversed(range(levels)):
            dec += [ResBlock(chs[i + 1], chs[i], norm=norm), Upsample(chs[i], up)]
        dec += [norm_layer(norm, chs[0]), nn.SiLU(), nn.Conv2d(chs[0], 1, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def standardises(self) -> bool:
        return hasattr(self, "coded_sd")

    @torch.no_grad()
    def standardise_on(self, x: torch.Tensor) -> None:
        """Measure the coded intensity's mean and sd on `x` (training patches); the network then sees and returns the
        standardised value. A stain whose structure spans a few per cent of the range reaches the first layer at
        unit scale, as GroupNorm gives the paper's autoencoder per patch — but with fixed numbers, so it stays local."""
        if self.standardises:
            coded = to_power(x, self.gamma)
            self.coded_mean.fill_(float(coded.mean()))
            self.coded_sd.fill_(max(float(coded.std()), 1e-3))

    @property
    def refits(self) -> bool:
        return hasattr(self, "decoded_gain")

    @torch.no_grad()
    def refit_on(self, x: torch.Tensor, batch: int = 64) -> None:
        """Fit the decoder's output, in coded units, to the coded input by least squares (one gain and one shift) over `x`
        (training patches), through the posterior mean as `encode` gives it. Training can leave the output's overall
        gain off by tens of per cent from seed to seed on a sparse stain, while its correlation with the input is high;
        the fit removes that drift and leaves the structure alone. Pointwise, so it keeps a local autoencoder local."""
        if not self.refits:
            return
        self.decoded_gain.fill_(1.0)
        self.decoded_shift.fill_(0.0)
        s = torch.zeros(5, dtype=torch.float64)  # Σd, Σc, Σd², Σdc, n: d the decoder's output, c the coded input
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            d = self.decoder(self.moments(xb)[0]).double().flatten()
            c = self._coded(xb).double().flatten()
            s += torch.stack([d.sum(), c.sum(), (d * d).sum(), (d * c).sum(), torch.tensor(float(d.numel()), dtype=torch.float64)]).cpu()
        sd, sc, sdd, sdc, n = s.tolist()
        var = sdd / n - (sd / n) ** 2
        if var <= 1e-12:  # a constant output: nothing to scale
            return
        gain = (sdc / n - sd * sc / n**2) / var
        self.decoded_gain.fill_(gain)
        self.decoded_shift.fill_(sc / n - gain * sd / n)

    def _coded(self, x: torch.Tensor) -> torch.Tensor:
        """The network's input and reconstruction target: the intensity to `gamma`, standardised if `standardises`."""
        coded = to_power(x, self.gamma)
        return (coded - self.coded_mean) / self.coded_sd if self.standardises else coded

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.factor == 1:
            return x, torch.full_like(x, -30.0)
        mean, logvar = self.encoder(self._coded(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic scaled latent (the posterior mean), what the diffusion model sees."""
        return self.moments(x)[0] * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.scale
        if self.factor == 1:
            return z
        coded = self.decoder(z)
        if self.refits:
            coded = coded * self.decoded_gain + self.decoded_shift
        if self.standardises:
            coded = coded * self.coded_sd + self.coded_mean
        return to_power(coded, 1 / self.gamma)

    def loss(self, x: torch.Tensor, kl_weight: float, ssim_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L1 (+ KL, + 1 − SSIM) in the coded intensity (after `gamma`, standardised if `standardises`)."""
        mean, logvar = self.moments(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        recon = self.decoder(z)
        x = self._coded(x)
        l1 = (recon - x).abs().mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        total = l1 + kl_weight * kl
        stats = {"l1": l1.detach(), "kl": kl.detach()}
        if ssim_weight > 0:
            unit = (lambda v: v * self.coded_sd + self.coded_mean) if self.standardises else (lambda v: v)  # SSIM's constants assume [0, 1]
            s = ssim_torch((unit(recon) + 1) / 2, (unit(x) + 1) / 2)
            total = total + ssim_weight * (1 - s)
            stats["ssim"] = s.detach()
        return total, stats


def ssim_torch(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5, c1: float = 1e-4, c2: float = 9e-4) -> torch.Tensor:
    """Mean SSIM of images in [0, 1] with an 11-tap Gaussian window (valid region), differentiable."""
    r = 5
    g = torch.exp(-(torch.arange(-r, r + 1, dtype=a.dtype, device=a.device) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :])[None, None].expand(a.shape[1], 1, -1, -1)
    f = lambda x: F.conv2d(x, win, groups=a.shape[1])  # noqa: E731
    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return s.mean()
