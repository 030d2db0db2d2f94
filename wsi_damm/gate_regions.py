"""The DAMMP gate's training signal per annotated region: what the divergence feedback loss is told.

For each training sample the DFL label is y = 1 when the multi-modal branch's loss is no larger than
the uni-modal one's; the gate learns its confidence κ from that label. Counting y and κ per region
of a labelled patch store (e.g. the simulator's informative / divergent mask) shows whether the data
ever ask the gate to distrust nuclei where they mislead.
"""

from __future__ import annotations

import torch

from .diffusion.damm import divergence, per_sample_l1

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
            out[name] = {"samples": int(n), "dfl_label_rate": sum(r[f"samples_{name}"] * r[f"dfl_label_rate_{name}"] for r in rows) / n,
                         "mean_kappa": sum(r[f"samples_{name}"] * r[f"mean_kappa_{name}"] for r in rows) / n}
    return out
