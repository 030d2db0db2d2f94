"""A deterministic image-to-image U-Net (the pix2pix generator without its GAN): CD31 [+ DAPI] → NP.

What a user would train instead of a diffusion model. It works in pixel space, sees the same
patches as the diffusion model and is trained with L1 on the measured NP channel.
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_damm.models.blocks import Downsample, ResBlock, Upsample, group_norm


class RegressionUNet(nn.Module):
    """Encoder–decoder with skip connections; one ResBlock per level, widths `channels`."""

    def __init__(self, in_channels: int, channels: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        c_prev = channels[0]
        for i, c in enumerate(channels):
            self.down.append(ResBlock(c_prev, c))
            self.pool.append(Downsample(c) if i < len(channels) - 1 else nn.Identity())
            c_prev = c
        self.mid = ResBlock(c_prev, c_prev)
        self.up = nn.ModuleList()
        self.unpool = nn.ModuleList()
        for i, c in reversed(list(enumerate(channels))):
            self.up.append(ResBlock(c_prev + c, c))
            self.unpool.append(Upsample(c) if i > 0 else nn.Identity())
            c_prev = c
        self.out = nn.Sequential(group_norm(c_prev), nn.SiLU(), nn.Conv2d(c_prev, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, P, P) in [-1, 1] → (B, 1, P, P) in [-1, 1]; P divisible by 2^(levels − 1)."""
        h = self.stem(x)
        skips = []
        for block, pool in zip(self.down, self.pool):
            h = block(h)
            skips.append(h)
            h = pool(h)
        h = self.mid(h)
        for block, unpool in zip(self.up, self.unpool):
            h = unpool(block(torch.cat([h, skips.pop()], 1)))
        return torch.tanh(self.out(h))
