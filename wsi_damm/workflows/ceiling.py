"""The autoencoder ceiling: decode(encode(NP)) written as a whole-slide map and scored like a prediction.

A latent diffusion model can at best return what its target autoencoder decodes, so the map of
decode(encode(measured NP)) bounds every learned row from above, and decode(encode(noiseless NP))
bounds it against the noiseless field. Patches, mask, stitching and scoring are `predict`'s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wsi_damm.sampling.predictor import in_micro_batches
from wsi_damm.slides import SlideSpec, open_file
from wsi_damm.tiling.grid import read_scaled, unit_range
from wsi_damm.tiling.plan import plan_slide
from wsi_damm.training.run_dir import RunDir, load_autoencoders, load_run_config
from wsi_damm.workflows.patch_maps import patch_function_map, tiling

SOURCES = ("measured", "noiseless")


def ceiling_map(run_dir: Path, spec: SlideSpec, clean: Path | None, out: Path, source: str = "measured", progress: bool = True) -> Path:
    """decode(encode(NP)) of one slide as the OME-Zarr map `out`, with the run's target autoencoder; `source`
    is the measured NP channel or the noiseless field `clean` (normalised with the measured channel's range,
    as `evaluate` normalises it)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    run = RunDir(run_dir)
    rc = load_run_config(run)
    ae = load_autoencoders(run, rc)["target"]
    k = spec.roles.index("target")
    field = open_file(clean) if source == "noiseless" else None
    plan = plan_slide(spec, tiling(rc)) if field is not None else None

    def reconstruct(images: torch.Tensor, coords: np.ndarray, context: np.ndarray | None) -> torch.Tensor:
        if field is None:
            x = images[:, k : k + 1]
        else:
            p = images.shape[-1]
            x = (
                torch.from_numpy(
                    np.stack(
                        [
                            unit_range(read_scaled(field, plan.choice, int(y), int(xx), p, p)[0].astype(np.float32), plan.lo[k], plan.hi[k])
                            for _, y, xx in coords
                        ]
                    )[:, None]
                )
                * 2
                - 1
            )
        return (in_micro_batches(lambda t: ae.decode(ae.encode(t)), x).clamp(-1, 1) + 1) / 2

    try:
        return patch_function_map(rc, spec, out, reconstruct, {"ceiling": source}, progress)
    finally:
        if field is not None:
            field.close()
