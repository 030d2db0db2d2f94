"""Latent canvases: tiled encoding and halo decoding equal whole-image coding for local autoencoders
(and not for GroupNorm ones), training crops are crops of the slide's encoding, on tissue, and a
canvas-latent run resumes bit for bit; a crop's context is cut where the crop was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from wsi_damm.models.autoencoder import Autoencoder
from wsi_damm.sampling.windows import window_crops
from wsi_damm.stages.train import run_training
from wsi_damm.tiling.context import CONTEXT_DOWNSAMPLE
from wsi_damm.tiling.store import PatchStore, read_rows, to_model_range
from wsi_damm.training.config import resolve
from wsi_damm.training.latent_canvas import GLASS, LatentCanvases, coverage, decode_tiled, encode_tiled, mirror
from wsi_damm.training.run_dir import RunDir
from wsi_damm.util.errors import InputError


def _ae(local: bool, local_norm: str = "pixel", gamma: float = 1.0, standardise: bool = False) -> Autoencoder:
    """Standardising ones (the tiny preset's kind) also refit their output, as the tiny preset does."""
    torch.manual_seed(0)
    ae = Autoencoder(4, 3, (8, 16), local, local_norm, gamma, standardise, refit=standardise).eval()
    dim = torch.rand(2, 1, 16, 16) * 0.3 - 1  # a dim stain: mean and sd far from 0 and 1
    ae.standardise_on(dim)
    ae.refit_on(dim)
    return ae


def test_tiled_encoding_is_whole_encoding_only_for_local_autoencoders():
    """The sparse recipe's target autoencoder (no norm, intensity coded as its square root) and the tiny preset's
    (no norm, standardised, output refit) included."""
    x = torch.rand(1, 1, 4 * 70, 4 * 90) * 2 - 1
    cases = ((True, "pixel", 1.0, False), (True, "none", 1.0, True), (True, "none", 0.5, True), (False, "pixel", 1.0, False))
    for local, norm, gamma, standardise in cases:
        ae = _ae(local, norm, gamma, standardise)
        with torch.no_grad():
            whole = ae.encode(mirror(x, 4 * 8))[:, :, 8:-8, 8:-8]  # the mirrored image encoded in one piece
            tiled = encode_tiled(x, ae.encode, 4, tile=32)
        err = float((whole - tiled).abs().max())
        if local:
            assert err < 1e-5, err
        else:  # GroupNorm: a latent depends on the whole tile
            assert err > 1e-2, err


def test_mirror_reflects_past_every_edge_even_for_small_images():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    m = mirror(x, 5)
    assert m.shape == (1, 1, 13, 14)
    np.testing.assert_array_equal(m[0, 0, 5:8, 5:9].numpy(), x[0, 0].numpy())
    np.testing.assert_array_equal(m[0, 0, 4, 5:9].numpy(), x[0, 0, 1].numpy())  # edge row not repeated
    np.testing.assert_array_equal(m[0, 0, 5:8, 4].numpy(), x[0, 0, :, 1].numpy())


@pytest.mark.parametrize("norm, gamma, standardise", [("pixel", 1.0, False), ("none", 0.5, False), ("none", 1.0, True)])
def test_a_window_decoded_with_its_halo_is_the_canvas_decoded_whole(norm, gamma, standardise):
    """So a map decoded patch by patch from a canvas has no seam, not even at the slide's edge."""
    ae = _ae(True, norm, gamma, standardise)
    z = torch.randn(2, 3, 40, 52)
    halo, p = 8, 16
    with torch.no_grad():
        whole = ae.decode(mirror(z, halo))[:, :, 4 * halo : -4 * halo, 4 * halo : -4 * halo]
        windows = np.array([[0, 0], [0, 36], [12, 20], [24, 36]])
        crops = window_crops(z.numpy(), windows, windows - 100, p, halo, margin=200, mirror_edges=True)  # all covered
        for j, (y, x) in enumerate(windows):
            dec = ae.decode(crops[:, j])[:, :, 4 * halo : 4 * (halo + p), 4 * halo : 4 * (halo + p)]
            np.testing.assert_allclose(dec.numpy(), whole[:, :, 4 * y : 4 * (y + p), 4 * x : 4 * (x + p)].numpy(), atol=1e-5)


def test_a_region_decoded_in_tiles_is_the_canvas_decoded_whole():
    """What `predict` does with a local decoder: each block of patch rows decoded once, in tiles with a
    halo, edges mirrored: equal to decoding the whole canvas (so to decoding each window alone)."""
    from wsi_damm.sampling.windows import context_band

    ae = _ae(True)
    z = torch.randn(2, 3, 40, 52)
    halo, p = 8, 16
    windows = np.array([[0, 0], [0, 36], [12, 20], [24, 36]])
    with torch.no_grad():
        whole = ae.decode(mirror(z, halo))[:, :, 4 * halo : -4 * halo, 4 * halo : -4 * halo]
        for y0, y1, x0, x1 in ((0, 40, 0, 52), (12, 40, 20, 52), (0, 28, 0, 36)):
            band = context_band(z.numpy(), y0, y1, windows - 100, p, halo, margin=200, mirror_edges=True)[:, :, :, x0 : x1 + 2 * halo]
            region = decode_tiled(band, ae.decode, 4, tile=12, halo=halo)
            assert region.shape == (2, 1, 4 * (y1 - y0), 4 * (x1 - x0))
            np.testing.assert_allclose(region.numpy(), whole[:, :, 4 * y0 : 4 * y1, 4 * x0 : 4 * x1].numpy(), atol=1e-5)


def test_region_blocks_join_patch_rows_while_their_box_stays_tight():
    from wsi_damm.sampling.windows import region_blocks

    p = 4
    rows = [(0, range(0, 40, 3)), (3, range(0, 40, 3)), (6, range(0, 7, 3)), (30, range(30, 40, 3)), (33, range(30, 40, 3))]
    windows = np.array([(y, x) for y, xs in rows for x in xs])
    blocks = region_blocks(windows, p)
    np.testing.assert_array_equal(np.concatenate(blocks), np.arange(len(windows)))  # every window once, in order
    for block in blocks:  # whole rows; the box within twice the rows' own area
        ys = np.unique(windows[block, 0])
        assert sum((windows[block, 0] == y).sum() for y in ys) == sum((windows[:, 0] == y).sum() for y in ys)
        own = sum(p * (windows[windows[:, 0] == y, 1].max() + p - windows[windows[:, 0] == y, 1].min()) for y in ys)
        box = np.ptp(windows[block, 0]) + p, np.ptp(windows[block, 1]) + p
        assert box[0] * box[1] <= 2 * own
    assert [np.unique(windows[b, 0]).tolist() for b in blocks] == [[0, 3, 6], [30, 33]]  # the gap between splits them


def test_training_crops_are_crops_of_the_slide_encoding_and_stay_on_tissue():
    rng = np.random.default_rng(2)
    size_y, size_x, patch, stride, f = 160, 208, 32, 24, 4
    image = torch.from_numpy(rng.uniform(-1, 1, (3, size_y, size_x)).astype(np.float32))
    corners = [(y, x) for y in range(0, size_y - patch + 1, stride) for x in range(0, size_x - patch + 1, stride)]
    corners = [c for c in corners if not (c[0] in (48, 72) and c[1] in (72, 96))]  # a hole in the tissue
    yx = np.array(corners)
    coords = np.concatenate([np.zeros((len(yx), 1), int), yx], 1)
    patches = torch.stack([image[:, y : y + patch, x : x + patch] for y, x in yx])
    aes = {r: _ae(True) for r in ("vessels", "nuclei", "target")}
    for k, ae in enumerate(aes.values()):  # three different encoders
        torch.manual_seed(k)
        for prm in ae.parameters():
            prm.data.add_(0.1 * torch.randn_like(prm))
    channel = {"vessels": 0, "nuclei": 1, "target": 2}
    canv = LatentCanvases(lambda rows: patches[rows], coords, {r: ae.encode for r, ae in aes.items()}, channel, f, patch)
    painted = np.zeros((size_y, size_x), bool)
    for y, x in yx:
        painted[y : y + patch, x : x + patch] = True
    seen = torch.where(torch.from_numpy(painted), image, torch.full_like(image, GLASS))[
        :, : yx[:, 0].max() + patch, : yx[:, 1].max() + patch
    ]
    rows = np.arange(len(yx))
    off = canv.offsets(rows, torch.Generator().manual_seed(0))
    assert (np.abs(off) <= patch // f // 2).all() and (off != 0).any(axis=1).mean() > 0.3
    lat = canv.batch(rows, off)
    p = patch // f
    cov = coverage(yx // f, p, 0, seen.shape[1] // f, seen.shape[2] // f).numpy()
    with torch.no_grad():
        for role, ae in aes.items():
            want = encode_tiled(seen[None, channel[role] : channel[role] + 1], ae.encode, f)[0]
            for j, ((y, x), (dy, dx)) in enumerate(zip(yx // f, off)):
                torch.testing.assert_close(lat[role][j], want[:, y + dy : y + dy + p, x + dx : x + dx + p], atol=1e-5, rtol=0)
                assert cov[y + dy : y + dy + p, x + dx : x + dx + p].all()  # the moved crop lies on tissue
    assert canv.sample_shape == (3, p, p) and len(canv) == len(yx)


def test_canvas_latents_need_local_autoencoders():
    with pytest.raises(InputError, match="--ae-local"):
        resolve("tiny", None, {"autoencoder": {"local": False}, "model": {"latents": "canvas"}})
    assert resolve("tiny", None, {"model": {"context_span": 2}}).model.latents == "canvas"  # context follows canvas crops
    with pytest.raises(InputError, match="local_norm"):
        resolve("tiny", None, {"autoencoder": {"local_norm": "group"}})  # GroupNorm is not local


def test_a_moved_crop_carries_the_context_of_where_it_was_cut(small_store):
    """Each condition role gets one more channel: the stored context image cut around the crop's own
    pixel position (patch position + offset), brute force here; the target gets none."""
    store = PatchStore.open(small_store)
    f, patch, span = 4, int(store.attrs["patch_size"]), 4
    rows = np.arange(len(store))
    coords = store.coords

    def encode(x: torch.Tensor) -> torch.Tensor:  # any local encoder will do
        return torch.nn.functional.avg_pool2d(x, f).repeat(1, 2, 1, 1)

    roles = ("vessels", "nuclei", "target")
    canv = LatentCanvases(
        lambda r: to_model_range(read_rows(store.images, r)),
        coords,
        {r: encode for r in roles},
        {r: store.roles.index(r) for r in roles},
        f,
        patch,
        context=lambda r, origins: store.context_windows(r, span, origins),
        context_roles=tuple(store.context_roles),
    )
    off = canv.offsets(rows, torch.Generator().manual_seed(3))
    lat = canv.batch(rows, off)
    p, side = patch // f, round(span * patch / CONTEXT_DOWNSAMPLE)
    assert side == p and lat["target"].shape[1] == 2 and lat["vessels"].shape[1] == lat["nuclei"].shape[1] == 3
    moved = 0
    for j in rows:
        image = np.asarray(store.root["context"][str(coords[j, 0])][:], np.float32)
        for origin, got in ((coords[j, 1:] + off[j] * f, lat), (coords[j, 1:], canv.batch(rows[j : j + 1]))):
            centre = (origin + patch / 2) / CONTEXT_DOWNSAMPLE
            top = np.rint(centre - side / 2).astype(int)
            want = np.zeros((image.shape[0], side, side), np.float32)
            for a in range(side):
                for b in range(side):
                    y, x = top[0] + a, top[1] + b
                    if 0 <= y < image.shape[1] and 0 <= x < image.shape[2]:
                        want[:, a, b] = image[:, y, x]
            k = j if got is lat else 0
            for c, role in enumerate(store.context_roles):
                torch.testing.assert_close(got[role][k, -1], torch.from_numpy(want[c] * 2 - 1), atol=1e-6, rtol=0)
        moved += not torch.equal(lat["vessels"][j, -1], canv.batch(rows[j : j + 1])["vessels"][0, -1])
    assert moved > len(rows) // 4  # the offsets move the context with the crop


def test_a_canvas_latent_run_resumes_bit_for_bit(small_store, tiny_toml, tmp_path):
    cfg = resolve("tiny", tiny_toml, {"autoencoder": {"local": True}, "model": {"latents": "canvas"}})
    full = run_training(small_store, tmp_path / "full", cfg, progress=False)
    part = tmp_path / "part"
    run_training(small_store, part, cfg, progress=False, stop_after=3)
    run_training(small_store, part, cfg, resume=True, progress=False)
    a, b = load_file(str(full.unet)), load_file(str(RunDir(part).unet))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
