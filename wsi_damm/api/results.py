"""What the API's functions return: the paths they wrote, counts and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PathLike = str | Path


@dataclass(frozen=True)
class SynthResult:
    slides: list[Path]  # the OME-TIFFs (CD31, DAPI, NP)
    clean: list[Path]  # noiseless NP fields (the oracle)
    divergence: list[Path]  # where DAPI misleads (region labels)


@dataclass(frozen=True)
class TileResult:
    store: Path
    patches: int
    patch_size: int
    roles: list[str]
    patches_per_slide: dict
    qc: Path  # one picture per slide: tissue outline and patch grid


@dataclass(frozen=True)
class TrainResult:
    run: Path
    weights: Path | None  # the trained model once done: unet_ema.safetensors (DAMM) or regression_ema.safetensors
    metrics: Path
    loss_plot: Path
    config: Path


@dataclass(frozen=True)
class PredictResult:
    store: Path
    patches: int
    maps: list[Path]  # MAP.ome.zarr per slide (empty with stitch=False)
    qc: Path
    sampling: str = "independent"  # the sampling used ("auto" resolved)


@dataclass(frozen=True)
class EvaluateResult:
    report: Path  # report.html
    metrics_path: Path
    metrics: dict = field(repr=False)
    viewers: list[Path] = field(default_factory=list)
