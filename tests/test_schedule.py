"""The noise schedule against diffusers' published values (tests/data/diffusers_ddim.json)."""

from __future__ import annotations

import torch

from wsi_damm.diffusion.schedule import NoiseSchedule

from .reference import REFERENCE, fixed


def test_schedule_matches_reference():
    ref = REFERENCE
    s = NoiseSchedule.make("scaled_linear", 1000, 0.002, 0.02)
    for t, want in ref["alphas_cumprod"].items():
        assert abs(float(s.alphas_cumprod[int(t)]) - want) <= ref["alphas_cumprod_tolerance"]
    x0, eps = fixed((1, 4, 4, 4), 0.3, torch.float32), 0.8 * fixed((1, 4, 4, 4), 1.1, torch.float32)
    for t, want in zip((0, 499, 999), ref["add_noise"]["sums_at_t_0_499_999"]):
        got = s.q_sample(x0, torch.tensor([t]), eps).sum().item()
        assert abs(got - want) <= ref["add_noise"]["tolerance"]


def test_other_schedules_are_monotone():
    for kind in ("linear", "cosine"):
        a = NoiseSchedule.make(kind).alphas_cumprod
        assert a.shape == (1000,) and (a[1:] < a[:-1]).all() and 0 < a[-1] < a[0] < 1


def test_lambda_table_is_half_log_snr():
    s = NoiseSchedule.make()
    a = s.alphas_cumprod
    torch.testing.assert_close(s.lambdas, 0.5 * torch.log(a / (1 - a)))
    assert (s.lambdas[1:] < s.lambdas[:-1]).all()
