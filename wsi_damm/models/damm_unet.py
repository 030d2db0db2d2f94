"""The two-branch DAMM U-Net: uni-modal branch on concat(z_t, c_uni), multi-modal
branch on concat(z_t, c_multi) with MMFM at every encoder stage and UAFM at the bottleneck.

Both branches share one time embedding (the authors' code builds a second, unused one in the uni
branch; we do not). The uni branch never sees the other modality, so ε_uni is a true uni-modal
prediction and the gate chooses between honest alternatives. Everything is batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wsi_damm.models.blocks import Downsample, ResBlock, TimeEmbedding, Upsample, group_norm
from wsi_damm.models.fusion import MMFM, UAFM, ConcatFusion


@dataclass(frozen=True)
class UNetShape:
    latent_channels: int
    channels: tuple[int, ...]
    res_blocks: int
    heads: int = 4
    dropout: float = 0.0
    context_channels: int = 0  # per branch: its condition's low-resolution surroundings, beside its latent


class Branch(nn.Module):
    """Encoder levels (n blocks) → middle (two ResBlocks, fusion between) → decoder (n+1 blocks) with skips."""

    def __init__(self, shape: UNetShape, emb_dim: int) -> None:
        super().__init__()
        chs, nb = shape.channels, shape.res_blocks
        self.inp = nn.Conv2d(2 * shape.latent_channels + shape.context_channels, chs[0], 3, padding=1)
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        prev = chs[0]
        for i, ch in enumerate(chs):
            self.enc.append(nn.ModuleList([ResBlock(prev if j == 0 else ch, ch, emb_dim, shape.dropout) for j in range(nb)]))
            prev = ch
            self.down.append(Downsample(ch) if i < len(chs) - 1 else nn.Identity())
        self.mid1 = ResBlock(chs[-1], chs[-1], emb_dim, shape.dropout)
        self.mid2 = ResBlock(chs[-1], chs[-1], emb_dim, shape.dropout)
        self.dec = nn.ModuleList()
        self.up = nn.ModuleList()
        prev = chs[-1]
        for i in reversed(range(len(chs))):
            ch = chs[i]
            self.dec.append(nn.ModuleList([ResBlock(prev + ch if j == 0 else ch, ch, emb_dim, shape.dropout) for j in range(nb + 1)]))
            prev = ch
            self.up.append(Upsample(ch) if i > 0 else nn.Identity())
        self.out = nn.Sequential(group_norm(chs[0]), nn.SiLU(), nn.Conv2d(chs[0], shape.latent_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def encode(self, x: torch.Tensor, emb: torch.Tensor, fuse=None, stages: list | None = None):
        """Returns (h after mid1, skips). `fuse(i, h)` rewrites stage i; `stages` records them."""
        h = self.inp(x)
        skips = []
        for i, (blocks, down) in enumerate(zip(self.enc, self.down)):
            for block in blocks:
                h = block(h, emb)
            if fuse is not None:
                h = fuse(i, h)
            if stages is not None:
                stages.append(h)
            skips.append(h)
            h = down(h)
        return self.mid1(h, emb), skips

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        h = self.mid2(h, emb)
        for blocks, up, skip in zip(self.dec, self.up, reversed(skips)):
            h = torch.cat([h, skip], dim=1)
            for block in blocks:
                h = block(h, emb)
            h = up(h)
        return self.out(h)


class DammUNet(nn.Module):
    """forward(z_t, t, c_uni, c_multi) → (ε_uni, ε_multi, κ); c_multi None → uni branch only. Each condition is
    its modality's latent, followed by its context channels when the shape has them."""

    def __init__(
        self,
        shape: UNetShape,
        mmfm: bool = True,
        fusion: str = "uafm",
        confidence_input: str = "both",
        mmfm_reduction: int = 4,
    ) -> None:
        super().__init__()
        if fusion not in ("uafm", "cross-attention"):
            raise ValueError(f"fusion must be 'uafm' or 'cross-attention', got {fusion!r}")
        self.shape, self.fusion = shape, fusion
        emb_dim = 4 * shape.channels[0]
        self.time = TimeEmbedding(shape.channels[0], emb_dim)
        self.uni = Branch(shape, emb_dim)
        self.multi = Branch(shape, emb_dim)
        fuse_cls = MMFM if mmfm else ConcatFusion
        self.stage_fusion = nn.ModuleList([fuse_cls(ch, mmfm_reduction) for ch in shape.channels])
        self.uafm = UAFM(shape.channels[-1], shape.heads, confidence_input)

    def forward(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        c_uni: torch.Tensor,
        c_multi: torch.Tensor | None = None,
        use_confidence: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        emb = self.time(t)
        stages: list[torch.Tensor] = []
        u_mid, u_skips = self.uni.encode(torch.cat([z_t, c_uni], 1), emb, stages=stages)
        eps_uni = self.uni.decode(u_mid, u_skips, emb)
        if c_multi is None:
            return eps_uni, None, None
        m_mid, m_skips = self.multi.encode(torch.cat([z_t, c_multi], 1), emb, fuse=lambda i, h: self.stage_fusion[i](stages[i], h))
        fused, kappa = self.uafm(u_mid, m_mid, use_confidence=use_confidence and self.fusion == "uafm")
        eps_multi = self.multi.decode(fused, m_skips, emb)
        return eps_uni, eps_multi, kappa

    def parameter_counts(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {
            "uni_branch": count(self.uni),
            "multi_branch": count(self.multi),
            "mmfm": count(self.stage_fusion),
            "uafm": count(self.uafm),
            "time_embedding": count(self.time),
            "total": count(self),
        }
