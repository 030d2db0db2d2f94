"""DAMM-Diffusion pieces against hand computations and published reference numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsi_damm.diffusion.damm import DammLoss, branch_conditions, damm_loss, dfl, divergence, gate
from wsi_damm.models.autoencoder import Autoencoder
from wsi_damm.models.blocks import PixelNorm
from wsi_damm.models.damm_unet import DammUNet, UNetShape
from wsi_damm.models.fusion import MMFM, UAFM, ConcatFusion
from wsi_damm.training.config import PRESETS, resolve
from wsi_damm.training.run_dir import build_unet
from wsi_damm.util.errors import InputError


def small_unet(**kw) -> DammUNet:
    """A small U-Net whose zero-initialised output convolutions are made random, so outputs move."""
    torch.manual_seed(0)
    model = DammUNet(UNetShape(2, (8, 16), 1, heads=2), **kw).eval()
    for branch in (model.uni, model.multi):
        torch.nn.init.normal_(branch.out[-1].weight, std=0.1)
    return model


@pytest.mark.parametrize("factor", [1, 4, 8, 16])
def test_autoencoder_shapes(factor):
    ae = Autoencoder(factor, 4, (8, 16)).eval()
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    z = ae.encode(x)
    c = 1 if factor == 1 else 4
    assert z.shape == (2, c, 64 // factor, 64 // factor)
    assert ae.decode(z).shape == x.shape
    if factor == 1:
        assert torch.equal(ae.decode(ae.encode(x)), x) and not list(ae.parameters())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_pixel_norm_is_a_layer_norm_of_each_pixel(memory_format):
    """Against numpy, pixel by pixel: (x − mean) / sqrt(var + eps) over the channels, then scale and shift."""
    g = torch.Generator().manual_seed(3)
    norm = PixelNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(6, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(6, generator=g))
    x = (torch.randn(2, 6, 5, 7, generator=g) * 3 + 1).contiguous(memory_format=memory_format)
    got = norm(x).detach().numpy()
    a = x.numpy().astype(np.float64)
    ref = (a - a.mean(1, keepdims=True)) / np.sqrt(a.var(1, keepdims=True) + norm.eps)
    ref = ref * norm.weight.detach().numpy()[:, None, None] + norm.bias.detach().numpy()[:, None, None]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,latent", [("tiny", 32), ("paper", 16)])
def test_unet_shapes_per_preset(preset, latent):
    model = build_unet(PRESETS[preset]).eval()
    c = PRESETS[preset].autoencoder.latent_channels
    z = torch.randn(2, c, latent, latent)
    with torch.no_grad():
        eu, em, kappa = model(z, torch.tensor([0, 999]), z, z)
    bottleneck = latent // 2 ** (len(PRESETS[preset].model.channels) - 1)
    assert eu.shape == em.shape == z.shape and kappa.shape == (2, bottleneck, bottleneck)
    assert ((kappa > 0) & (kappa < 1)).all()


def test_paper_preset_parameter_count_near_authors():
    total = build_unet(PRESETS["paper"]).parameter_counts()["total"]
    assert abs(total - 112.8e6) / 112.8e6 < 0.10


def test_sdpa_with_kappa_is_the_explicit_formula():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8)
    kappa = torch.rand(2, 1, 12, 1)
    explicit = torch.softmax(q @ (kappa * k).transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k * kappa, v), explicit, atol=1e-5, rtol=1e-5)


def test_uafm_forward_equals_hand_computation():
    torch.manual_seed(2)
    uafm = UAFM(8, heads=1).eval()
    u, m = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    out, kappa = uafm(u, m)
    flat = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731
    q = uafm.q(flat(uafm.norm_q(u)))
    kv = flat(uafm.norm_kv(m))
    k, v = uafm.k(kv), uafm.v(kv)
    kap = torch.sigmoid(uafm.conf(flat(uafm.conf_norm(torch.cat([u, m], 1)))))
    attn = torch.softmax(q @ (kap * k).transpose(1, 2) / math.sqrt(8), -1) @ v
    want = u + uafm.proj(attn).transpose(1, 2).reshape(2, 8, 3, 3)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kappa, kap.view(2, 3, 3))


def test_gate_picks_uni_exactly_where_divergence_reaches_gamma():
    eu, em = torch.zeros(4, 2, 3, 3), torch.ones(4, 2, 3, 3)
    kappa = torch.tensor([0.9, 0.5, 0.49, 0.2]).view(4, 1, 1).expand(4, 2, 2)
    d = divergence(kappa)
    torch.testing.assert_close(d, torch.tensor([0.1, 0.5, 0.51, 0.8]))
    out = gate(eu, em, d, 0.5)
    assert out[0].eq(1).all() and out[1].eq(0).all() and out[2].eq(0).all() and out[3].eq(0).all()
    assert gate(eu, em, d, 0.6)[2].eq(1).all()  # γ moves the boundary


def test_dfl_on_hand_made_numbers():
    kappa = torch.tensor([0.8, 0.3]).view(2, 1, 1)
    l_uni, l_multi = torch.tensor([0.5, 0.2]), torch.tensor([0.4, 0.6])  # multi helps sample 0 only → y = [1, 0]
    want = -(math.log(0.8) + math.log(1 - 0.3)) / 2 + 0.1 * ((0.8 - 0.5) ** 2 + (0.3 - 0.5) ** 2) / 2
    assert dfl(kappa, l_uni, l_multi, gamma=0.5, beta=0.1).item() == pytest.approx(want, rel=1e-6)


def test_loss_selection_per_sample():
    noise = torch.zeros(2, 1, 2, 2)
    eu, em = torch.full((2, 1, 2, 2), 0.4), torch.full((2, 1, 2, 2), 0.2)
    kappa = torch.tensor([0.9, 0.1]).view(2, 1, 1)  # d = [0.1, 0.9]: sample 0 fused, sample 1 uni only
    cfg = DammLoss(gamma=0.5, alpha=0.0)
    loss, stats = damm_loss(eu, em, kappa, noise, cfg, warmup=False)
    assert loss.item() == pytest.approx(((0.4 + 0.2) / 2 + 0.4) / 2)
    assert stats["multi_share"].item() == 0.5
    warm, _ = damm_loss(eu, em, kappa, noise, cfg, warmup=True)
    assert warm.item() == pytest.approx(0.3)
    no_gate, _ = damm_loss(eu, em, kappa, noise, DammLoss(dammp=False), warmup=False)
    assert no_gate.item() == pytest.approx(0.3)
    with_dfl, s = damm_loss(eu, em, kappa, noise, DammLoss(alpha=1.0), warmup=False)
    without, _ = damm_loss(eu, em, kappa, noise, DammLoss(alpha=1.0, dfl=False), warmup=False)
    assert with_dfl.item() == pytest.approx(without.item() + s["dfl"].item())
    # multi_loss "always": both branches learn from every sample; the gate's share and the DFL are as before
    always, s_always = damm_loss(eu, em, kappa, noise, DammLoss(alpha=1.0, multi_always=True), warmup=False)
    assert always.item() == pytest.approx(0.3 + s["dfl"].item()) and s_always["multi_share"].item() == 0.5
    # damm.loss = "l2": the same selection on squared errors
    squared, _ = damm_loss(eu, em, kappa, noise, DammLoss(gamma=0.5, alpha=0.0, squared=True), warmup=False)
    assert squared.item() == pytest.approx(((0.4**2 + 0.2**2) / 2 + 0.4**2) / 2)
    # per-sample weights (damm.min_snr) scale each sample's error before the mean; the gate's choice is unchanged
    weighted, s_w = damm_loss(eu, em, kappa, noise, cfg, warmup=False, weights=torch.tensor([2.0, 0.5]))
    assert weighted.item() == pytest.approx((2.0 * (0.4 + 0.2) / 2 + 0.5 * 0.4) / 2) and s_w["multi_share"].item() == 0.5


def test_a_squared_error_denoiser_learns_the_mean_where_l1_learns_the_median():
    """Why damm.loss = "l2" exists: fitted to a sparse target (signal in 30 % of otherwise alike samples), the
    constant minimising the mean absolute error is the background (the median), the squared error's the mean."""
    from wsi_damm.diffusion.damm import per_sample_loss

    target = torch.tensor([0.0] * 7 + [1.0] * 3).view(10, 1, 1, 1)
    grid = torch.linspace(0, 1, 1001)
    best = {
        squared: grid[torch.stack([per_sample_loss(torch.full_like(target, c), target, squared).mean() for c in grid]).argmin()]
        for squared in (False, True)
    }
    assert best[False].item() == pytest.approx(0.0, abs=1e-3) and best[True].item() == pytest.approx(0.3, abs=1e-3)


def _inputs(b=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    z, cu, cm = (torch.randn(b, 2, 8, 8, generator=g) for _ in range(3))
    return z, torch.tensor([10, 500, 900])[:b], cu, cm


def test_uni_branch_never_sees_the_other_modality_and_batches_are_independent():
    model = small_unet()
    z, t, cu, cm = _inputs()
    with torch.no_grad():
        eu, em, k = model(z, t, cu, cm)
        eu2, em2, _ = model(z, t, cu, cm + 1.0)
        torch.testing.assert_close(eu, eu2)
        assert not torch.allclose(em, em2)
        one = model(z[:1], t[:1], cu[:1], cm[:1])  # GroupNorm: a sample's output ignores its batch-mates
        torch.testing.assert_close(one[0], eu[:1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one[1], em[:1], atol=1e-5, rtol=1e-5)
        only_uni = model(z, t, cu, None)
        assert only_uni[1] is None and only_uni[2] is None
        torch.testing.assert_close(only_uni[0], eu)


def test_ablation_no_mmfm_swaps_the_fusion_modules():
    full, plain = small_unet(), small_unet(mmfm=False)
    assert all(isinstance(m, MMFM) for m in full.stage_fusion)
    assert all(isinstance(m, ConcatFusion) for m in plain.stage_fusion)
    assert plain.parameter_counts()["mmfm"] < full.parameter_counts()["mmfm"]


def test_ablation_cross_attention_ignores_confidence():
    z, t, cu, cm = _inputs()
    for fusion, should_change in (("uafm", True), ("cross-attention", False)):
        model = small_unet(fusion=fusion)
        with torch.no_grad():
            before = model(z, t, cu, cm)[1]
            model.uafm.conf.bias.add_(2.0)
            after = model(z, t, cu, cm)[1]
        assert (not torch.allclose(before, after)) == should_change, fusion
    model = small_unet()
    with torch.no_grad():  # the warm-up's plain cross-attention is the same switch at run time
        a = model(z, t, cu, cm, use_confidence=False)[1]
        model.uafm.conf.bias.add_(2.0)
        torch.testing.assert_close(a, model(z, t, cu, cm, use_confidence=False)[1])


def test_ablation_uni_branch_on_nuclei_swaps_conditions():
    v, n = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    cu, cm = branch_conditions(v, n, "vessels")
    assert cu.eq(0).all() and cm.eq(1).all()
    cu, cm = branch_conditions(v, n, "nuclei")
    assert cu.eq(1).all() and cm.eq(0).all()
    cu, cm = branch_conditions(v, None, "vessels")  # a slide without DAPI: the multi-modal partner is absent
    assert cu.eq(0).all() and cm is None
    with pytest.raises(ValueError, match="reads nuclei"):
        branch_conditions(v, None, "nuclei")
    # the flag reaches the run's config, and only the two modalities are accepted
    assert resolve("tiny", flags={"model": {"uni_branch": "nuclei"}}).model.uni_branch == "nuclei"
    assert resolve("tiny").model.uni_branch == "vessels"
    with pytest.raises(InputError, match="--uni-branch"):
        resolve("tiny", flags={"model": {"uni_branch": "target"}})


def test_confidence_from_uni_only_reproduces_authors_and_is_blind_to_nuclei():
    model = small_unet(confidence_input="uni")
    z, t, cu, cm = _inputs()
    with torch.no_grad():
        k1 = model(z, t, cu, cm)[2]
        k2 = model(z, t, cu, cm * 3)[2]
    torch.testing.assert_close(k1, k2)  # κ sees only vessels: why our default also looks at nuclei
    both = small_unet()
    with torch.no_grad():
        assert not torch.allclose(both(z, t, cu, cm)[2], both(z, t, cu, cm * 3)[2])


def test_a_standardising_autoencoder_codes_the_standard_score_and_decodes_it_back():
    """The encoder sees (coded − mean) / sd with the mean and sd measured on the training patches, the decoder's output
    is mapped back; checked against the closed form with encoder and decoder replaced by the identity. Weights saved
    before the option (no mean or sd in them) still load into an autoencoder that does not standardise."""
    x = torch.rand(3, 1, 8, 8) * 0.2 - 1  # a dim stain: intensities in [0, 0.1]
    ae = Autoencoder(4, 1, (8, 16), local=True, local_norm="none", gamma=0.5, standardise=True)
    ae.standardise_on(x)
    coded = 2 * ((x + 1) / 2) ** 0.5 - 1
    torch.testing.assert_close(ae.coded_mean, coded.mean())
    torch.testing.assert_close(ae.coded_sd, coded.std())

    class MeanAndLogvar(torch.nn.Module):
        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return torch.cat([v, v], 1)

    ae.encoder, ae.decoder = MeanAndLogvar(), torch.nn.Identity()
    standard = (coded - coded.mean()) / coded.std()
    torch.testing.assert_close(ae.moments(x)[0], standard)
    torch.testing.assert_close(ae.decode(standard), x, atol=1e-5, rtol=0)
    assert float(standard.std()) == pytest.approx(1.0, abs=1e-5)
    plain = Autoencoder(4, 1, (8, 16), local=True, local_norm="none")
    plain.standardise_on(x)  # a no-op: nothing to measure
    assert not plain.standardises and not any("coded_" in k for k in plain.state_dict())
    assert {"coded_mean", "coded_sd"} <= set(Autoencoder(4, 1, (8, 16), local=True, standardise=True).state_dict())


def test_a_refit_autoencoder_fits_its_output_gain_and_shift_by_least_squares():
    """`refit_on`: one gain and one shift on the decoder's output, in coded units, least squares against the coded input.
    A decoder that returns a known affine of its input is undone exactly; on a random network the fit equals numpy's
    degree-1 polyfit of the coded input on the raw output. Weights saved before the option (no gain or shift) still
    load into an autoencoder that does not refit."""
    x = torch.rand(3, 1, 8, 8) * 0.2 - 1  # a dim stain
    ae = Autoencoder(4, 1, (8, 16), local=True, local_norm="none", standardise=True, refit=True)
    ae.standardise_on(x)

    class MeanAndLogvar(torch.nn.Module):
        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return torch.cat([v, v], 1)

    class TooDim(torch.nn.Module):  # what the last steps of training can leave: the right structure, the wrong gain
        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return 0.6 * v - 0.3

    ae.encoder, ae.decoder = MeanAndLogvar(), TooDim()
    assert float((ae.decode(ae.encode(x)) - x).abs().max()) > 0.05
    ae.refit_on(x, batch=2)  # in batches: the sums, not one batch's fit
    assert float(ae.decoded_gain) == pytest.approx(1 / 0.6, rel=1e-5)
    assert float(ae.decoded_shift) == pytest.approx(0.3 / 0.6, rel=1e-5)
    torch.testing.assert_close(ae.decode(ae.encode(x)), x, atol=1e-5, rtol=0)

    torch.manual_seed(0)
    net = Autoencoder(4, 2, (8, 16), local=True, local_norm="none", standardise=True, refit=True).eval()
    y = torch.rand(4, 1, 16, 16) * 2 - 1
    net.standardise_on(y)
    net.refit_on(y, batch=3)
    with torch.no_grad():
        raw = net.decoder(net.moments(y)[0]).flatten().double().numpy()
    gain, shift = np.polyfit(raw, net._coded(y).flatten().double().numpy(), 1)
    assert float(net.decoded_gain) == pytest.approx(gain, rel=1e-4)
    assert float(net.decoded_shift) == pytest.approx(shift, rel=1e-4, abs=1e-6)

    old = {k: v for k, v in net.state_dict().items() if not k.startswith("decoded_")}
    before = Autoencoder(4, 2, (8, 16), local=True, local_norm="none", standardise=True)
    before.load_state_dict(old)  # strict: nothing missing, nothing extra
    assert not before.refits


def test_a_power_coded_autoencoder_codes_the_power_and_decodes_it_back():
    """`gamma`: the encoder sees the intensity (in [0, 1]) raised to gamma, the decoder's output is raised to 1 / gamma;
    checked against the closed form on an encoder / decoder pair replaced by the identity."""
    from wsi_damm.models.autoencoder import to_power

    x = torch.linspace(-1, 1, 11).reshape(1, 1, 1, 11)
    want = 2 * ((x + 1) / 2) ** 0.5 - 1
    torch.testing.assert_close(to_power(x, 0.5), want)
    torch.testing.assert_close(to_power(to_power(x, 0.5), 2.0), x, atol=1e-6, rtol=0)
    assert to_power(x, 1.0) is x
    ae = Autoencoder(4, 1, (8, 16), local=True, local_norm="none", gamma=0.5)

    class MeanAndLogvar(torch.nn.Module):  # the encoder replaced: its input as the mean (and as the log-variance)
        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return torch.cat([v, v], 1)

    ae.encoder, ae.decoder = MeanAndLogvar(), torch.nn.Identity()  # moments() then returns the coded image
    torch.testing.assert_close(ae.moments(x)[0], want)
    torch.testing.assert_close(ae.decode(want), x, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="gamma"):
        Autoencoder(4, 1, (8, 16), gamma=1.5)
