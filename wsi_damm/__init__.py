"""wsi-damm: whole-slide nanoparticle maps from CD31 + DAPI with DAMM-Diffusion.

The pipeline from Python, with the CLI's option names and defaults (see `wsi_damm.api`):
`synth`, `tile`, `train`, `predict`, `calibrate`, `stitch`, `evaluate`, `compare`, `export`."""

from wsi_damm._version import __version__
from wsi_damm.api import calibrate, compare, evaluate, export, predict, stitch, synth, tile, train

__all__ = ["__version__", "calibrate", "compare", "evaluate", "export", "predict", "stitch", "synth", "tile", "train"]
