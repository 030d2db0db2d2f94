"""DAMMP: divergence, the per-sample gate, the per-sample loss selection and the DFL.

d = 1 − mean(κ) per sample. Training after warm-up: loss_i = L_uni,i if d_i ≥ γ else
(L_uni,i + L_multi,i)/2; y_i = 1 if L_multi,i ≤ L_uni,i; DFL = BCE(mean κ, y) + β(mean κ − (1−γ))²;
total = mean(loss) + α·DFL (with multi_always, loss_i = (L_uni,i + L_multi,i)/2 for every sample: the
gate then steers sampling only, never which branch learns). Warm-up (authors: 80 of 200 epochs): plain cross-attention and
(L_uni + L_multi)/2. Sampling: ε = where(d < γ, ε_multi, ε_uni) per sample. The authors loop
over samples one at a time; here every step is one batched expression.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DammLoss:
    gamma: float = 0.5
    alpha: float = 1e-4
    beta: float = 0.1
    dammp: bool = True  # False: always fuse (ablation "no DAMMP")
    dfl: bool = True
    multi_always: bool = False  # True: both branches learn from every sample (config damm.multi_loss = "always")
    squared: bool = False  # True: squared error (config damm.loss = "l2") instead of the authors' L1


def divergence(kappa: torch.Tensor) -> torch.Tensor:
    """(B, h, w) confidence → (B,) divergence d = 1 − mean κ."""
    return 1.0 - kappa.float().mean(dim=tuple(range(1, kappa.ndim)))


def use_multi(d: torch.Tensor, gamma: float, dammp: bool = True) -> torch.Tensor:
    """(B,) bool, the gate's decision: the multi-modal branch where d < γ (always, without DAMMP)."""
    return d < gamma if dammp else torch.ones_like(d, dtype=torch.bool)


def select(eps_uni: torch.Tensor, eps_multi: torch.Tensor, multi: torch.Tensor) -> torch.Tensor:
    """Per sample, the multi-modal output where `multi`, else the uni-modal one."""
    return torch.where(multi.view((-1,) + (1,) * (eps_uni.ndim - 1)), eps_multi, eps_uni)


def gate(eps_uni: torch.Tensor, eps_multi: torch.Tensor, d: torch.Tensor, gamma: float, dammp: bool = True) -> torch.Tensor:
    return select(eps_uni, eps_multi, use_multi(d, gamma, dammp))


def branch_conditions(vessels: torch.Tensor, nuclei: torch.Tensor | None, uni_branch: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(uni-modal condition, multi-modal partner): vessels alone by default; nuclei alone for the
    paper's Tab. 4 ablation (`uni_branch="nuclei"`). `nuclei` is None for slides without DAPI."""
    if uni_branch == "nuclei":
        if nuclei is None:
            raise ValueError("the uni-modal branch reads nuclei, but there is no nuclei channel")
        return nuclei, vessels
    return vessels, nuclei


def per_sample_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).abs().mean(dim=tuple(range(1, pred.ndim)))


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, squared: bool) -> torch.Tensor:
    """Mean absolute (the authors') or squared error per sample. Squared error is what makes the denoiser the
    conditional mean, the score a sampler needs; absolute error makes it the conditional median, which on a
    sparse target — signal in fewer than half of the samples that look alike — is the background."""
    if not squared:
        return per_sample_l1(pred, target)
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


def dfl(kappa: torch.Tensor, l_uni: torch.Tensor, l_multi: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """Divergence feedback loss: confidence should be high exactly where fusing helped."""
    c = kappa.float().mean(dim=tuple(range(1, kappa.ndim))).clamp(1e-6, 1 - 1e-6)
    y = (l_multi <= l_uni).float().detach()
    return F.binary_cross_entropy(c, y) + beta * ((c - (1 - gamma)) ** 2).mean()


def damm_loss(
    eps_uni: torch.Tensor,
    eps_multi: torch.Tensor | None,
    kappa: torch.Tensor | None,
    noise: torch.Tensor,
    cfg: DammLoss,
    warmup: bool,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and detached statistics (no device sync until the trainer logs them). `weights`: (B,) per-sample
    factors on both branches' errors (Min-SNR); the gate's label compares the two branches of one sample, so it is
    unchanged by them."""
    l_uni = per_sample_loss(eps_uni, noise, cfg.squared)
    if weights is not None:
        l_uni = l_uni * weights
    if eps_multi is None or kappa is None:  # uni-modal model
        loss = l_uni.mean()
        return loss, {"loss": loss.detach(), "l_uni": loss.detach()}
    l_multi = per_sample_loss(eps_multi, noise, cfg.squared)
    if weights is not None:
        l_multi = l_multi * weights
    both = 0.5 * (l_uni + l_multi)
    d = divergence(kappa)
    stats = {"l_uni": l_uni.mean().detach(), "l_multi": l_multi.mean().detach(), "mean_kappa": (1 - d.mean()).detach()}
    if warmup or not cfg.dammp:
        loss = both.mean()
        stats["multi_share"] = torch.ones((), device=loss.device)
    else:
        chosen = use_multi(d, cfg.gamma)
        loss = (both if cfg.multi_always else torch.where(chosen, both, l_uni)).mean()
        stats["multi_share"] = chosen.float().mean().detach()
        if cfg.dfl:
            feedback = dfl(kappa, l_uni, l_multi, cfg.gamma, cfg.beta)
            loss = loss + cfg.alpha * feedback
            stats["dfl"] = feedback.detach()
    stats["loss"] = loss.detach()
    return loss, stats
