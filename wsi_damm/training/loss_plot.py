"""loss.png of a trained run, drawn from its metrics CSV."""

from __future__ import annotations

import json

from wsi_damm.training.gate_regions import draw_gate_by_region
from wsi_damm.training.run_dir import (
    RunDir,
    load_run_config,
    read_metrics,
)


def plot_losses(run: RunDir) -> None:
    """loss.png: training and validation ε-loss per branch, the gate's multi-modal share, mean κ, and —
    for a store with region labels — the DFL label rate and mean κ per region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run.metrics)
    if not rows:
        return
    validation = json.loads(run.validation.read_text())["description"] if run.validation.exists() else None
    col = lambda k: [(r["step"], r[k]) for r in rows if r.get(k) not in ("", None)]  # noqa: E731
    regions = [k.removeprefix("dfl_label_rate_") for k in rows[0] if k.startswith("dfl_label_rate_")]
    regression = load_run_config(run).model.kind == "regression"  # one panel: no gate
    panels = 1 if regression else 3 if regions else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    axes = axes[0]
    ax1 = axes[0]
    for key, label, style in (
        ("loss", "train" if regression else "train total", "-"),  # a regression run has one loss: no total of parts
        ("l_uni", "train uni", ":"),
        ("l_multi", "train multi", ":"),
        ("val_loss", "val", "o-"),
        ("val_l_uni", "val uni", "s--"),
        ("val_l_multi", "val multi", "^--"),
    ):
        pts = col(key)
        if pts:
            ax1.plot(*zip(*pts), style, label=label, ms=3)
    ax1.set(
        xlabel="step",
        ylabel="L1 loss" if regression else "L1 ε-loss",
        title="Regression U-Net loss (train; val: EMA weights)" if regression else "Diffusion loss",
        yscale="log",
    )
    ax1.legend(fontsize=8)
    if not regression:
        _gate_panels(axes, rows, col, regions, load_run_config(run).damm.gamma)
    if validation:
        fig.suptitle(validation, fontsize=9)
    fig.tight_layout()
    fig.savefig(run.path / "loss.png", dpi=110)
    plt.close(fig)


def _gate_panels(axes, rows: list[dict], col, regions: list[str], gamma: float) -> None:
    """The DAMMP gate's share and mean κ through training, and per region what the DFL teaches it."""
    ax2 = axes[1]
    for key, label in (
        ("multi_share", "gate: multi-modal share (train)"),
        ("val_multi_share", "gate: multi-modal share (val)"),
        ("mean_kappa", "mean confidence κ"),
    ):
        pts = col(key)
        if pts:
            ax2.plot(*zip(*pts), label=label)
    warm = [r["step"] for r in rows if r.get("phase") == "warmup"]
    if warm:
        ax2.axvspan(0, max(warm), color="0.9", label="warm-up (plain cross-attention)")
    ax2.set(xlabel="step", ylim=(-0.05, 1.05), title="DAMMP gate")
    ax2.legend(fontsize=8)
    if regions and draw_gate_by_region(axes[2], rows, gamma):  # what the DFL teaches the gate, per region
        axes[2].set(title="gate by region (training batches)")
        axes[2].legend(fontsize=8)
