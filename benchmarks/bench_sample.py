"""Sampling throughput: DPM-Solver++(2M) 20 steps (ours, default) vs DDIM 150 steps (the paper's
setting), both through the real gated denoiser, at the `tiny` and `paper` presets on CPU; and a
slide without DAPI (uni-modal branch only, the multi-modal branch never computed) vs both branches.

Weights are random: speed does not depend on them. Quality of the two samplers is compared on
real predictions in the divergence study, not here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from wsi_damm.diffusion.samplers import sample_ddim, sample_dpmpp_2m
from wsi_damm.diffusion.schedule import NoiseSchedule
from wsi_damm.stages.predict import GatedDenoiser
from wsi_damm.training.config import PRESETS
from wsi_damm.training.run_dir import build_unet


def _rate(sample, batch: int) -> float:
    t0 = time.perf_counter()
    sample()
    return batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny preset only, fewer DDIM steps scaled up")
    args = ap.parse_args()
    torch.manual_seed(0)
    sched = NoiseSchedule.make()
    cases = [("tiny", 16, 32)] if args.quick else [("tiny", 16, 32), ("paper", 8, 16)]
    for preset, batch, lat in cases:
        cfg = PRESETS[preset]
        c = cfg.autoencoder.latent_channels
        model = build_unet(cfg).eval()
        cond = torch.randn(batch, c, lat, lat)
        den = GatedDenoiser(model, cond, cond.clone(), cfg.damm.gamma, True, amp=False)
        x = torch.randn(batch, c, lat, lat)
        with torch.inference_mode():
            den(x, torch.zeros(batch))  # warm-up
            ddim_steps = 30 if args.quick else 150
            ddim = _rate(lambda: sample_ddim(den, x.clone(), sched, ddim_steps), batch) * ddim_steps / 150
            dpm = _rate(lambda: sample_dpmpp_2m(den, x.clone(), sched, 20), batch)
        print(
            json.dumps(
                {
                    "name": f"sampling_{preset}_preset",
                    "unit": "patches / s (whole reverse process)",
                    "ours": round(dpm, 3),
                    "reference": round(ddim, 3),
                    "ratio": round(dpm / ddim, 2),
                    "target_ratio": 150 / 20 * 0.9,
                    "ours_is": "DPM-Solver++(2M), 20 steps",
                    "reference_is": "DDIM, 150 steps" + (" (timed at 30, scaled)" if args.quick else ""),
                    "batch": batch,
                    "latents": f"{c}x{lat}x{lat}",
                    "cores": os.cpu_count(),
                    "torch": torch.__version__,
                    "machine": platform.machine(),
                }
            )
        )
        with torch.inference_mode():
            uni = GatedDenoiser(model, cond, None, cfg.damm.gamma, True, amp=False)
            only_uni = _rate(lambda: sample_dpmpp_2m(uni, x.clone(), sched, 20), batch)
            both = _rate(lambda: sample_dpmpp_2m(den, x.clone(), sched, 20), batch)
        print(
            json.dumps(
                {
                    "name": f"sampling_without_nuclei_{preset}_preset",
                    "unit": "patches / s (DPM-Solver++ 20 steps)",
                    "ours": round(only_uni, 3),
                    "reference": round(both, 3),
                    "ratio": round(only_uni / both, 2),
                    "ours_is": "uni-modal branch only (no DAPI)",
                    "reference_is": "both branches + DAMMP gate",
                    "batch": batch,
                    "latents": f"{c}x{lat}x{lat}",
                    "cores": os.cpu_count(),
                    "torch": torch.__version__,
                }
            )
        )


if __name__ == "__main__":
    main()
