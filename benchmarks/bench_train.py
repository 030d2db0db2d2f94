"""Training and sampling throughput at the `paper` preset on CPU, three ways, all built from our
modules in this process, so each ratio isolates one change:

- authors: their DAMMP-phase `_step` — for each sample of the batch, encode its three images with
  the frozen autoencoders (latents not cached), run the two-branch U-Net on a micro-batch of one,
  pick the loss by that sample's divergence, backward; then one optimiser step;
- per-sample, cached: the same per-sample loop on latents encoded once beforehand (what caching
  alone buys: authors → per-sample cached);
- ours: cached latents and one batched forward/backward with the per-sample gate as `torch.where`,
  channels_last, SDPA attention, bf16 autocast when the CPU has native bf16 (what batching buys:
  per-sample cached → ours).

Reverse step: one denoising step (both branches + gate) for the batch vs per sample.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import json
import time
from pathlib import Path

import torch
from _common import machine, peak_rss_mb  # noqa: E402

from wsi_damm.diffusion.damm import DammLoss, damm_loss, divergence, gate
from wsi_damm.diffusion.schedule import NoiseSchedule
from wsi_damm.training.config import PRESETS
from wsi_damm.training.run_dir import build_autoencoder, build_unet


def _cpu_has_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text() or "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitive cache)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="batch 8 and one timed repeat")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", type=Path, help="also write the results here (e.g. benchmarks/results/train/bench_train.json)")
    args = ap.parse_args()
    batch = 8 if args.quick else args.batch
    repeats = 1 if args.quick else 2
    torch.manual_seed(0)
    cfg = PRESETS["paper"]
    c, lat, patch = cfg.autoencoder.latent_channels, 16, 256
    sched = NoiseSchedule.make()
    loss_cfg = DammLoss()
    bf16 = _cpu_has_bf16()

    model = build_unet(cfg)
    aes = [build_autoencoder(cfg).eval() for _ in range(3)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, patch, patch) * 2 - 1
    with torch.no_grad():
        cached = [ae.encode(images[:, i : i + 1]) for i, ae in enumerate(aes)]  # what our trainer caches
    t = torch.randint(0, sched.T, (batch,))
    noise = torch.randn(batch, c, lat, lat)

    def reference_step() -> None:
        opt.zero_grad(set_to_none=True)
        for i in range(batch):
            with torch.no_grad():
                zv, zn, zt = (ae.encode(images[i : i + 1, k : k + 1]) for k, ae in enumerate(aes))
            z_t = sched.q_sample(zt, t[i : i + 1], noise[i : i + 1])
            eu, em, kappa = model(z_t, t[i : i + 1], zv, zn)
            loss, _ = damm_loss(eu, em, kappa, noise[i : i + 1], loss_cfg, warmup=False)
            (loss / batch).backward()
        opt.step()

    def cached_step() -> None:
        opt.zero_grad(set_to_none=True)
        for i in range(batch):
            zv, zn, zt = (x[i : i + 1] for x in cached)
            z_t = sched.q_sample(zt, t[i : i + 1], noise[i : i + 1])
            eu, em, kappa = model(z_t, t[i : i + 1], zv, zn)
            loss, _ = damm_loss(eu, em, kappa, noise[i : i + 1], loss_cfg, warmup=False)
            (loss / batch).backward()
        opt.step()

    def reference_reverse() -> None:
        with torch.no_grad():
            for i in range(batch):
                eu, em, kappa = model(noise[i : i + 1], t[i : i + 1], cached[0][i : i + 1], cached[1][i : i + 1])
                eps = eu if float(divergence(kappa)) >= loss_cfg.gamma else em
                sched.q_sample(eps, t[i : i + 1], eps)

    fast = model.to(memory_format=torch.channels_last)
    cl = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    zv, zn, zt = (cl(x) for x in cached)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def our_step() -> None:
        opt.zero_grad(set_to_none=True)
        z_t = cl(sched.q_sample(zt, t, noise))
        with autocast():
            eu, em, kappa = fast(z_t, t, zv, zn)
        loss, _ = damm_loss(eu, em, kappa, noise, loss_cfg, warmup=False)
        loss.backward()
        opt.step()

    def our_reverse() -> None:
        with torch.inference_mode(), autocast():
            eu, em, kappa = fast(cl(noise), t, zv, zn)
            eps = gate(eu, em, divergence(kappa), loss_cfg.gamma)
            sched.q_sample(eps.float(), t, eps.float())

    model.to(memory_format=torch.contiguous_format)
    ref_train = batch / _time(reference_step, repeats)
    cached_train = batch / _time(cached_step, repeats)
    ref_rev = batch / _time(reference_reverse, repeats)
    model.to(memory_format=torch.channels_last)
    ours_train = batch / _time(our_step, repeats)
    ours_rev = batch / _time(our_reverse, repeats)
    common = {
        **machine(),
        "cpu_bf16": bf16,
        "batch": batch,
        "latents": f"{c}x{lat}x{lat}",
        "unet_parameters": model.parameter_counts()["total"],
        "peak_rss_mb_ours": round(peak_rss_mb(), 1),
        "peak_rss_mb_reference": "same process (shared model)",
    }
    results = [
        {
            "name": "train_step_paper_preset",
            "unit": "patches / s",
            "ours": round(ours_train, 3),
            "reference": round(ref_train, 3),
            "per_sample_cached": round(cached_train, 3),
            "ratio": round(ours_train / ref_train, 2),
            "ratio_from_caching": round(cached_train / ref_train, 2),
            "ratio_from_batching": round(ours_train / cached_train, 2),
            "reference_is": "the authors' per-sample loop, encoding each sample's three images every step",
            "target_ratio": 5.0,
            **common,
        },
        {
            "name": "reverse_step_paper_preset",
            "unit": "patches / s",
            "ours": round(ours_rev, 3),
            "reference": round(ref_rev, 3),
            "ratio": round(ours_rev / ref_rev, 2),
            "reference_is": "per-sample loop on cached latents (sampling encodes nothing)",
            "target_ratio": 5.0,
            **common,
        },
    ]
    for row in results:
        print(json.dumps(row))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
