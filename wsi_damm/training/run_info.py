"""Summary of a training run directory for `wsi-damm info RUN_DIR`."""

from __future__ import annotations

import json
from pathlib import Path

from wsi_damm.training.config import sampling_for
from wsi_damm.training.regression import build_regression
from wsi_damm.training.run_dir import RunDir, build_autoencoder, build_unet, load_run_config, read_metrics, weights_of
from wsi_damm.util.files import read_json

AUTHORS_UNET_PARAMS = 112_800_000  # measured from the authors' code (paper preset)


def run_summary(path: Path) -> dict:
    run = RunDir(path)
    cfg = load_run_config(run)
    regression = cfg.model.kind == "regression"
    counts = {"total": sum(p.numel() for p in build_regression(cfg).parameters())} if regression else build_unet(cfg).parameter_counts()
    ae_params = None if regression else sum(p.numel() for p in build_autoencoder(cfg).parameters())
    rows = read_metrics(run.metrics)
    state = json.loads(run.state.read_text()) if run.state.exists() else {}
    last_val = next((r for r in reversed(rows) if r.get("val_loss") not in ("", None)), {})
    summary = {
        "path": str(run.path),
        "model": "regression U-Net (L1)" if regression else "DAMM-Diffusion",
        "preset": cfg.preset,
        "patch_size": cfg.patch_size,
        "roles": list(cfg.roles),
        "parameters": counts,
        "autoencoder_parameters_each": ae_params,
        "steps_planned": cfg.train.steps,
        "steps_done": int(rows[-1]["step"]) if rows else 0,
        "last_val_loss": last_val.get("val_loss"),
        "validation": json.loads(run.validation.read_text())["description"] if run.validation.exists() else None,
        "finished": weights_of(run, cfg).exists(),
        "ablations": None
        if regression
        else {
            "mmfm": cfg.model.mmfm,
            "fusion": cfg.model.fusion,
            "dammp": cfg.damm.dammp,
            "dfl": cfg.damm.dfl,
            "uni_branch": cfg.model.uni_branch,
            "gamma": cfg.damm.gamma,
        },
        # what `predict --sampling auto` will do with it
        "recipe": {"sampling": sampling_for(cfg)}
        if regression
        else {"latents": cfg.model.latents, "local_autoencoders": cfg.autoencoder.local, "sampling": sampling_for(cfg)},
    }
    summary = {k: v for k, v in summary.items() if v is not None or k in ("last_val_loss", "validation")}
    if run.ae_ceiling.exists():  # decode(encode(x)) against x on held-out patches: the best any map can be
        ceiling = read_json(run.ae_ceiling)
        summary["autoencoder_ceiling"] = {
            role: f"r {c['pearson_r']:.3f}, mean {c['mean_ratio']:.2f}×, spread {c['spread_ratio']:.2f}×, {c['psnr']:.2f} dB"
            + (" — COLLAPSED" if role in ceiling["collapsed"] else "")
            for role, c in ceiling["roles"].items()
        }
        summary["autoencoder_ceiling"]["measured on"] = ceiling["patches"]
    if cfg.preset == "paper":
        summary["authors_unet_parameters"] = AUTHORS_UNET_PARAMS
    if "ddp_param_checksums" in state:
        summary["ddp_param_checksums"] = state["ddp_param_checksums"]
    return summary
