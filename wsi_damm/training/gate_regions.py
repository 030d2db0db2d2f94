"""The DAMMP gate's training signal per annotated region: what the divergence feedback loss is told.

For each training sample the DFL label is y = 1 when the multi-modal branch's loss is no larger than
the uni-modal one's; the gate learns its confidence κ from that label. Counting y and κ per region
of a labelled patch store (e.g. the simulator's informative / divergent mask) shows whether the data
ever ask the gate to distrust nuclei where they mislead.
"""

from __future__ import annotations

import torch

from wsi_damm.diffusion.damm import divergence, per_sample_l1

FIELDS = ("dfl_label_rate", "mean_kappa", "samples")


class GateByRegion:
    """Running sums per region between two log rows; `row()` returns them as metric columns and resets."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = dict(sorted(names.items()))
        self.size = max(self.names) + 1
        self.sums = torch.zeros(3, self.size, dtype=torch.float64)

    @property
    def columns(self) -> list[str]:
        return [f"{field}_{name}" for name in self.names.values() for field in FIELDS]

    @torch.no_grad()
    def add(self, regions: torch.Tensor, eps_uni: torch.Tensor, eps_multi: torch.Tensor, kappa: torch.Tensor, target: torch.Tensor) -> None:
        """regions (B,) labels (−1: none) of the samples whose outputs are given."""
        keep = regions >= 0
        if not bool(keep.any()):
            return
        y = (per_sample_l1(eps_multi.float(), target) <= per_sample_l1(eps_uni.float(), target)).double()
        k = 1.0 - divergence(kappa).double()
        g = regions[keep].long().cpu()
        for i, values in enumerate((y[keep].cpu(), k[keep].cpu(), torch.ones(int(keep.sum()), dtype=torch.float64))):
            self.sums[i] += torch.bincount(g, weights=values, minlength=self.size)[: self.size]

    def row(self) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {}
        for label, name in self.names.items():
            n = float(self.sums[2, label])
            out[f"dfl_label_rate_{name}"] = float(self.sums[0, label]) / n if n else ""
            out[f"mean_kappa_{name}"] = float(self.sums[1, label]) / n if n else ""
            out[f"samples_{name}"] = int(n)
        self.sums.zero_()
        return out


def gate_in_training(metrics: list[dict]) -> dict[str, dict]:
    """Per region, over the DAMMP phase of a run's metrics rows: the DFL label rate (share of samples on
    which the multi-modal loss was no larger) and mean κ, weighted by the samples each row counted."""
    out = {}
    names = [k.removeprefix("samples_") for k in (metrics[0] if metrics else {}) if k.startswith("samples_")]
    for name in names:
        rows = [r for r in metrics if r.get("phase") == "dammp" and r.get(f"samples_{name}") not in ("", None, 0)]
        n = sum(r[f"samples_{name}"] for r in rows)
        if n:
            out[name] = {
                "samples": int(n),
                "dfl_label_rate": sum(r[f"samples_{name}"] * r[f"dfl_label_rate_{name}"] for r in rows) / n,
                "mean_kappa": sum(r[f"samples_{name}"] * r[f"mean_kappa_{name}"] for r in rows) / n,
            }
    return out


def draw_gate_by_region(ax, rows: list[dict], gamma: float | None = None) -> bool:
    """On a matplotlib axis: per region, the DFL label rate (solid) and mean κ (dashed) of a run's metrics rows
    against the step, the warm-up shaded and, given γ, the line 1 − γ above which the gate fuses. False when
    the rows carry no regions (a store without labels)."""
    regions = [k.removeprefix("dfl_label_rate_") for k in (rows[0] if rows else {}) if k.startswith("dfl_label_rate_")]
    if not regions:
        return False
    warm = [r["step"] for r in rows if r.get("phase") == "warmup"]
    if warm:
        ax.axvspan(0, max(warm), color="0.92", label="warm-up (κ takes no part)")
    if gamma is not None:
        ax.axhline(1 - gamma, color="0.4", ls=":", lw=1, label=f"κ above which the gate fuses (1 − γ = {1 - gamma:g})")
    for i, name in enumerate(regions):
        for key, style, what in (("dfl_label_rate", "-", "DFL label rate (multi ≤ uni loss)"), ("mean_kappa", "--", "mean κ")):
            pts = [(r["step"], r[f"{key}_{name}"]) for r in rows if r.get(f"{key}_{name}") not in ("", None)]
            if pts:
                ax.plot(*zip(*pts), style, color=f"C{i}", lw=1.3, label=f"{name}: {what}")
    ax.set(xlabel="step", ylim=(-0.03, 1.03))
    return True
