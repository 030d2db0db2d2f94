"""U-Net building blocks shared by both branches and the autoencoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count ≤ 32 dividing `channels` (batch-independent)."""
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels)


class PixelNorm(nn.Module):
    """Layer norm over the channels of each pixel, with a per-channel scale and shift: unlike GroupNorm it
    reads no statistic of the whole image, so a convolutional network built on it maps a crop of an
    image as it maps that region inside the whole (up to its reach)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused layer norm over the channel axis moved last: the same arithmetic as five elementwise
        # passes, in one kernel (these norms sit at full resolution in the autoencoders)
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """ "group": GroupNorm (statistics over the whole image); "pixel": PixelNorm (per pixel); "none": no
    normalisation (local like "pixel", and it keeps each pixel's activation magnitude)."""
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        return group_norm(channels)
    if kind == "pixel":
        return PixelNorm(channels)
    raise ValueError(f"unknown norm {kind!r}; use group, pixel or none")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) integer or float timesteps → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class TimeEmbedding(nn.Module):
    def __init__(self, base: int, dim: int) -> None:
        super().__init__()
        self.base = base
        self.mlp = nn.Sequential(nn.Linear(base, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.base))


class ResBlock(nn.Module):
    """Norm-SiLU-Conv ×2 (GroupNorm unless `norm` says otherwise) with an additive time-embedding shift; 1×1 skip when widths differ."""

    def __init__(self, cin: int, cout: int, emb_dim: int | None = None, dropout: float = 0.0, norm: str = "group") -> None:
        super().__init__()
        self.norm1, self.conv1 = norm_layer(norm, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout) if emb_dim else None
        self.norm2, self.conv2 = norm_layer(norm, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is not None and emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """2× upsampling then a 3×3 conv; "bilinear" leaves no period-2 texture for the conv to smooth."""

    def __init__(self, ch: int, mode: str = "nearest") -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest":
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode=self.mode, align_corners=False))
