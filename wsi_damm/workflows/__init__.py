"""Workflows built on the pipeline stages: the simulator and its data set, the demo, the
ablation study and the blurred-vessel baseline. Nothing in the stages imports them."""
