"""wsi-damm: whole-slide nanoparticle maps from CD31 + DAPI with DAMM-Diffusion."""

__version__ = "0.1.0"
