"""wsi-damm: whole-slide nanoparticle maps from CD31 + DAPI with DAMM-Diffusion.

The pipeline from Python, with the CLI's option names and defaults (see `wsi_damm.api`):
`synth`, `tile`, `train`, `predict`, `stitch`, `evaluate`, `compare`, `export`."""

__version__ = "0.1.0"

from .api import compare, evaluate, export, predict, stitch, synth, tile, train  # noqa: E402 (after __version__, which stages read)

__all__ = ["__version__", "compare", "evaluate", "export", "predict", "stitch", "synth", "tile", "train"]
