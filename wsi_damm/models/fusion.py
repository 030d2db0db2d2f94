"""MMFM and UAFM (DAMM-Diffusion §3.3), batch-independent.

Differences from the authors' code, on purpose:
- GroupNorm replaces BatchNorm inside MMFM: with BatchNorm an output depends on which other
  samples share the batch (their DAMMP phase normalises over one sample, warm-up over the batch).
- The confidence map κ can be computed from the uni feature alone (authors) or from both
  modalities (`confidence_input="both"`, our default): κ from vessels alone cannot see that the
  nuclei channel is misleading, which is exactly what the gate has to detect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsi_damm.models.blocks import group_norm


class SpatialAttention(nn.Module):
    """a(x) = x ⊙ σ(N(Conv1×1(ReLU(N(Conv1×1(x)))))) with a one-channel spatial map."""

    def __init__(self, ch: int, reduction: int = 4) -> None:
        super().__init__()
        mid = max(ch // reduction, 1)
        self.net = nn.Sequential(nn.Conv2d(ch, mid, 1), group_norm(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, 1, 1), nn.GroupNorm(1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.net(x))


class MMFM(nn.Module):
    """Spatial attention per modality → concat → squeeze-excitation → Conv1×1 + norm back to C."""

    def __init__(self, ch: int, reduction: int = 4) -> None:
        super().__init__()
        self.sa_uni, self.sa_multi = SpatialAttention(ch, reduction), SpatialAttention(ch, reduction)
        mid = max(2 * ch // reduction, 1)
        self.se = nn.Sequential(nn.Linear(2 * ch, mid), nn.ReLU(inplace=True), nn.Linear(mid, 2 * ch))
        self.out = nn.Sequential(nn.Conv2d(2 * ch, ch, 1), group_norm(ch))

    def forward(self, u: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.sa_uni(u), self.sa_multi(m)], dim=1)
        w = torch.sigmoid(self.se(x.mean(dim=(2, 3))))
        return self.out(x * w[:, :, None, None])


class ConcatFusion(nn.Module):
    """Ablation `--no-mmfm`: plain concat + Conv1×1."""

    def __init__(self, ch: int, reduction: int = 4) -> None:
        super().__init__()
        self.out = nn.Conv2d(2 * ch, ch, 1)

    def forward(self, u: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([u, m], dim=1))


class UAFM(nn.Module):
    """Cross-attention, queries from uni, keys/values from multi, keys scaled by confidence κ.

    softmax_j(q_i·(κ_j k_j)/√C)·v_j is exactly `scaled_dot_product_attention(q, k·κ, v)`.
    κ = σ(Linear(GroupNorm(·))) per position ∈ (0, 1); divergence d = 1 − mean κ.
    `use_confidence=False` is the plain cross-attention of the warm-up and of the ablation;
    κ is still returned (for the gate) but does not touch the attention.
    """

    def __init__(self, ch: int, heads: int = 4, confidence_input: str = "both") -> None:
        super().__init__()
        self.heads = heads if ch % heads == 0 else 1
        self.norm_q, self.norm_kv = group_norm(ch), group_norm(ch)
        self.q, self.k, self.v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.proj = nn.Linear(ch, ch)
        self.confidence_input = confidence_input
        cin = 2 * ch if confidence_input == "both" else ch
        self.conf_norm = group_norm(cin)
        self.conf = nn.Linear(cin, 1)

    def confidence(self, u: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        x = torch.cat([u, m], dim=1) if self.confidence_input == "both" else u
        x = self.conf_norm(x).flatten(2).transpose(1, 2)  # (B, L, C)
        return torch.sigmoid(self.conf(x))  # (B, L, 1)

    def forward(self, u: torch.Tensor, m: torch.Tensor, use_confidence: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = u.shape
        kappa = self.confidence(u, m)
        q = self.q(self.norm_q(u).flatten(2).transpose(1, 2))
        kv = self.norm_kv(m).flatten(2).transpose(1, 2)
        k, v = self.k(kv), self.v(kv)
        if use_confidence:
            k = k * kappa
        split = lambda x: x.view(b, h * w, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        attn = F.scaled_dot_product_attention(split(q), split(k), split(v))
        attn = attn.transpose(1, 2).reshape(b, h * w, c)
        out = u + self.proj(attn).transpose(1, 2).reshape(b, c, h, w)
        return out, kappa.view(b, h, w)
