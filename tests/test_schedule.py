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


def test_min_snr_weights_give_every_objective_the_x0_weight_min_snr_gamma():
    """Min-SNR-γ (Hang et al. 2023) as a weight on x_0's squared error: min(SNR_t, γ)·‖x̂_0 − x_0‖². The ε and v errors
    of one x̂_0 at t are SNR_t and (SNR_t + 1) times that error, so each objective's weight must undo its own factor."""
    s = NoiseSchedule.make()
    t = torch.tensor([0, 50, 300, 999])
    g = torch.Generator().manual_seed(0)
    z0, eps, dx0 = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    a, sig = (c.double() for c in s.coefficients(t, z0))
    z_t = a * z0 + sig * eps
    x0_hat = z0 + 0.1 * dx0
    eps_hat = (z_t - a * x0_hat) / sig  # the ε and v a network predicting x0_hat implies
    v_hat = a * eps_hat - sig * x0_hat
    snr = (a / sig).flatten() ** 2
    want = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) * ((x0_hat - z0) ** 2).mean(dim=(1, 2, 3))
    for objective, pred, target in (("eps", eps_hat, eps), ("v", v_hat, s.v_target(z0, t, eps))):
        w = s.min_snr_weights(t, 5.0, objective).double()
        got = w * ((pred - target) ** 2).mean(dim=(1, 2, 3))
        assert torch.allclose(got, want, rtol=1e-5), objective
    # the nearly clean step is damped, the noisiest left alone (ε) or at its objective's own SNR / (SNR + 1) (v)
    w_eps = s.min_snr_weights(t, 5.0, "eps")
    assert w_eps[0] < 0.02 and w_eps[-1] == 1.0
