"""The pipeline's stages, one module each, in the order data flows: tile → train → predict → stitch →
evaluate (→ export). Each takes dataclass configs; `wsi_damm.api` (and so `wsi_damm.tile`, …) wraps
them as functions with the CLI's option names."""
