"""Noise schedule, DAMM gate and losses. The schedule never imports a model."""
