"""What the study trains: its variants (the paper's ablations), its plans (full and quick) and their configs."""

from __future__ import annotations

from dataclasses import dataclass

from wsi_damm.training.config import RunConfig, merge, resolve
from wsi_damm.workflows.simulator import DIVERGENCE_LABELS

REGIONS = DIVERGENCE_LABELS


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    overrides: dict  # RunConfig overrides; {} = DAMM full
    trained_as: str | None = None  # predicts with another variant's run …
    no_nuclei: bool = False  # … without the nuclei channel


VARIANTS = (
    Variant("damm", "DAMM full", {}),
    Variant("uni_only", "uni-modal only (vessels)", {}, trained_as="damm", no_nuclei=True),
    Variant("no_dammp", "always fused (no DAMMP)", {"damm": {"dammp": False}}),
    Variant("no_mmfm", "no MMFM", {"model": {"mmfm": False}}),
    Variant("cross_attention", "cross-attention instead of UAFM", {"model": {"fusion": "cross-attention"}}),
)


REGRESSION_LABEL = "regression U-Net (L1; pix2pix generator, no GAN)"


SAMPLERS = (("ddim", 150), ("ddim", 50), ("dpm++", 20), ("dpm++", 10))


@dataclass(frozen=True)
class StudyPlan:
    size: int
    train_slides: int
    heldout_slides: int
    ae_steps: int
    steps: int
    seeds: tuple[int, ...]
    sample_steps: int = 20
    samples: int = 4  # draws per patch of the mean-of-draws rows; every model also gets a single-draw row
    samplers: tuple[tuple[str, int], ...] = SAMPLERS
    patch: int = 128
    overlap: int = 32
    heldout_size: int | None = None  # default: `size`


# Sized for about 2 hours on 2 cores: per seed an autoencoder set (300 steps), 4 diffusion models and a regression
# U-Net (600 steps each), and 11 maps per seed of two 1024² held-out slides (the demo trains 1000 steps on the same preset)
FULL = StudyPlan(size=2048, heldout_size=1024, train_slides=3, heldout_slides=2, ae_steps=300, steps=600, seeds=(0, 1, 2), sample_steps=10)


QUICK = StudyPlan(
    size=1024,
    train_slides=2,
    heldout_slides=2,
    ae_steps=30,
    steps=40,
    seeds=(0, 1),
    sample_steps=5,
    samples=2,
    samplers=(("ddim", 10), ("dpm++", 5)),
)


def variant_config(base: RunConfig, plan: StudyPlan, v: Variant, seed: int) -> RunConfig:
    cfg = merge(base, v.overrides, f"study variant {v.name}")
    # every training slide trains: the held-out slides are the test, no model selection happens
    return merge(cfg, {"train": {"steps": plan.steps, "seed": seed, "val_fraction": 0.0, "checkpoint_every": plan.steps}}, "study")


def base_config(preset: str, plan: StudyPlan) -> RunConfig:
    """The paper's recipe (GroupNorm autoencoders, patch latents, patch-by-patch sampling): its ablations are the paper's.
    The autoencoders' rate decays along a cosine: at a constant rate their ceiling over seeds was 0.64 ± 0.18 SSIM,
    so one seed's autoencoders decided every DAMM row; decayed, 0.75 ± 0.03. The target is coded as it is
    (`target_gamma` 1), as the paper codes it. A collapsed autoencoder is said, not fatal: the study's ceiling
    rows show what it cost every row above them."""
    return merge(
        resolve(preset),
        {
            "autoencoder": {"steps": plan.ae_steps, "local": False, "lr_schedule": "cosine", "target_gamma": 1.0, "on_collapse": "warn"},
            "model": {"latents": "patch"},
            "train": {"val_fraction": 0.0},
        },
        "study",
    )
