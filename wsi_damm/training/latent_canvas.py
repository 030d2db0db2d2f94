"""Latent canvases: a slide's latents computed as one picture, and training crops cut from them.

A patch encoded on its own is not a crop of its slide's latents: GroupNorm makes every latent depend
on the whole patch (on the demo's model, crops of the whole-slide encoding differ from the patch
encodings by half the latents' mean magnitude, at the centre as at the border). A U-Net trained on
such patches expects their statistics in its conditions and noisy input; a window cut anywhere from a
canvas (shifted-grid sampling) does not have them, and its predictions stop following the vessels.
So canvas sampling uses local autoencoders (`autoencoder.local`), encodes slides in tiles with a halo
past the encoder's reach (`encode_tiled`, equal to encoding the slide whole), and trains
the U-Net (`model.latents = "canvas"`) on crops of those canvases — each at its patch's position moved
by a random offset of up to half a patch wherever the whole crop stays on tissue, which also shows the
model every position rather than the tiling grid. Offsets come from (seed, step): a resumed run draws
the same crops. A run conditioned on context (`model.context_span`) gets each crop's context window
centred where the crop was cut, as shifted-grid sampling cuts it for its windows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from wsi_damm.tiling.context import to_latent_grid
from wsi_damm.util.errors import InputError

ENCODE_HALO = 8  # latent pixels of image around each tile: past the tiny encoder's reach (≈ 28 px at f = 4)
ENCODE_TILE = 128  # latent pixels per tile side
GLASS = -1.0  # model-range value of pixels no patch covers: no signal, as glass


def coverage(yx: np.ndarray, p: int, y0: int, y1: int, width: int) -> torch.Tensor:
    """(y1 − y0, width) bool: the canvas rows [y0, y1) that some window of `yx` (n, 2) covers
    (corner counts summed twice: no loop over windows)."""
    yx = yx[(yx[:, 0] < y1) & (yx[:, 0] + p > y0)]
    d = np.zeros((y1 - y0 + 1, width + 1), np.int32)
    ya, yb = np.clip(yx[:, 0] - y0, 0, y1 - y0), np.clip(yx[:, 0] + p - y0, 0, y1 - y0)
    xa, xb = np.clip(yx[:, 1], 0, width), np.clip(yx[:, 1] + p, 0, width)
    for rows, cols, sign in ((ya, xa, 1), (ya, xb, -1), (yb, xa, -1), (yb, xb, 1)):
        np.add.at(d, (rows, cols), sign)
    return torch.from_numpy(d.cumsum(0).cumsum(1)[:-1, :-1] > 0)


def encode_tiled(
    x: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor], factor: int, tile: int = ENCODE_TILE, halo: int = ENCODE_HALO
) -> torch.Tensor:
    """(B, C, H, W) image (H, W multiples of `factor`) → (B, c, H/f, W/f) latents, encoded tile by tile with
    `halo` latent pixels of image around each tile and the tile's interior kept: with a local encoder
    this equals encoding the whole image, in bounded memory. The image is mirrored `halo` latent
    pixels past its edges first, so latents at the edge look like latents inside (no zero-padding rim)."""
    return map_tiled(mirror(x, halo * factor), encode, tile, halo, factor, 1)


def decode_tiled(
    z: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor], factor: int, tile: int = ENCODE_TILE, halo: int = ENCODE_HALO
) -> torch.Tensor:
    """(B, c, h + 2·halo, w + 2·halo) latents, a region with `halo` latent pixels of context around it →
    (B, C, h·f, w·f) the region decoded tile by tile, each tile with its halo: with a local decoder
    this equals decoding the whole, and a region costs its area once, not once per overlapping patch."""
    return map_tiled(z, decode, tile, halo, 1, factor)


def map_tiled(
    x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: int, halo: int, scale_in: int, scale_out: int
) -> torch.Tensor:
    """`fn` over `x` (B, C, H, W) cell by cell: a cell is `scale_in` input pixels and `scale_out` output
    pixels a side; `x` carries `halo` cells of context on every side. Tiles of `tile` cells are mapped
    with their halo and their interiors joined: (B, c, (H/scale_in − 2·halo)·scale_out, …)."""
    h, w = x.shape[-2] // scale_in - 2 * halo, x.shape[-1] // scale_in - 2 * halo
    out = None
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            th, tw = min(tile, h - ty), min(tile, w - tx)  # tile [ty, ty + th) sits at ty + halo in x
            y = fn(x[:, :, ty * scale_in : (ty + th + 2 * halo) * scale_in, tx * scale_in : (tx + tw + 2 * halo) * scale_in])
            if out is None:
                out = torch.zeros((x.shape[0], y.shape[1], h * scale_out, w * scale_out), dtype=y.dtype, device=y.device)
            out[:, :, ty * scale_out : (ty + th) * scale_out, tx * scale_out : (tx + tw) * scale_out] = y[
                :, :, halo * scale_out : (halo + th) * scale_out, halo * scale_out : (halo + tw) * scale_out
            ]
    return out


def mirror(x: torch.Tensor, pad: int) -> torch.Tensor:
    """(…, H, W) padded by `pad` on every side with its mirror image (edge pixel not repeated; as many
    reflections as a small image needs)."""
    while pad > 0:
        step = min(pad, x.shape[-2] - 1, x.shape[-1] - 1)
        if step < 1:
            return torch.nn.functional.pad(x, (pad,) * 4, mode="replicate")
        x = torch.nn.functional.pad(x, (step,) * 4, mode="reflect")
        pad -= step
    return x


def paste_patches(patches: torch.Tensor, yx: np.ndarray, y0: int, y1: int, width: int) -> torch.Tensor:
    """(C, y1 − y0, width) image rows [y0, y1) assembled from patches (n, C, P, P) at pixel corners `yx`
    (overlapping patches hold the same pixels); `GLASS` where none lies."""
    p = patches.shape[-1]
    band = torch.full((patches.shape[1], y1 - y0, width), GLASS, dtype=patches.dtype)
    for img, (y, x) in zip(patches, yx):
        a, b = max(y, y0), min(y + p, y1)
        if a < b:
            band[:, a - y0 : b - y0, x : x + p] = img[:, a - y : b - y]
    return band


def check_aligned(yx: np.ndarray, factor: int, source) -> None:
    if (np.asarray(yx) % factor).any():
        raise InputError(
            source,
            f"has patch corners off the autoencoder's {factor}-pixel grid, which canvas latents need",
            f"tile with a stride that is a multiple of {factor}",
        )


class PatchLatents:
    """Per-patch latents {role: (n, C, p, p)} behind the interface training reads."""

    def __init__(self, latents: dict[str, torch.Tensor]) -> None:
        self.latents = latents

    def __len__(self) -> int:
        return int(self.latents["target"].shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.latents["target"].shape[1:])

    def offsets(self, rows: np.ndarray, generator: torch.Generator) -> np.ndarray:
        return np.zeros((len(rows), 2), np.int64)

    def batch(self, rows: np.ndarray, offsets: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(rows)
        return {r: v[idx] for r, v in self.latents.items()}


class LatentCanvases(PatchLatents):
    """Training rows as crops of per-slide latent canvases. `images(rows)` gives patches (B, C, P, P) in
    model range, `coords` (n, 3) their slide and pixel corner, `encoders` {role: (B, 1, h, w) → latents}
    per role with `channel` its image channel. Each slide's canvas spans its patches' bounding box.
    `context(rows, origins)`, if given, gives the context windows (B, len(context_roles), s, s) in [0, 1]
    around patch-sized windows at pixel `origins` (B, 2) of those rows' slides; each role of
    `context_roles` then gets its window as one more channel, on the latent grid."""

    def __init__(
        self,
        images: Callable[[np.ndarray], torch.Tensor],
        coords: np.ndarray,
        encoders: dict[str, Callable],
        channel: dict[str, int],
        factor: int,
        patch: int,
        device: torch.device | str = "cpu",
        source=None,
        context: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        context_roles: tuple[str, ...] = (),
    ) -> None:
        coords = np.asarray(coords)
        self.roles = list(encoders)
        self.factor, self.origin = factor, coords[:, 1:].astype(np.int64)
        self.context, self.context_roles = context, list(context_roles)
        self.p = patch // factor
        self.shift = self.p // 2
        self.n = len(coords)
        self.slide = coords[:, 0]
        self.corner = np.zeros((self.n, 2), np.int64)  # each row's window on its slide's canvas (latent pixels)
        self.canvases: dict[int, torch.Tensor] = {}
        self.tables: dict[int, torch.Tensor] = {}  # summed-area tables of tissue coverage
        self.widths: list[int] = []
        check_aligned(coords[:, 1:], factor, source)
        for s in np.unique(self.slide):
            rows = np.nonzero(self.slide == s)[0]
            origin = coords[rows, 1:].min(0)
            local = coords[rows, 1:] - origin
            h, w = (local.max(0) + patch).tolist()
            image = paste_patches(images(rows), local, 0, h, w)[None]
            with torch.no_grad():
                z = [encode_tiled(image[:, channel[r] : channel[r] + 1].to(device), encoders[r], factor) for r in self.roles]
            self.widths = [int(v.shape[1]) for v in z]
            self.canvases[int(s)] = torch.cat(z, 1)[0]
            self.corner[rows] = local // factor
            covered = coverage(local // factor, self.p, 0, h // factor, w // factor).to(torch.int32)
            self.tables[int(s)] = torch.nn.functional.pad(covered.cumsum(0).cumsum(1), (1, 0, 1, 0))

    def __len__(self) -> int:
        return self.n

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.widths[self.roles.index("target")], self.p, self.p)

    def _on_tissue(self, slides: np.ndarray, yx: np.ndarray) -> np.ndarray:
        ok = np.zeros(len(yx), bool)
        p = self.p
        for s in np.unique(slides):
            m = slides == s
            t = self.tables[int(s)]
            h, w = t.shape[0] - 1, t.shape[1] - 1
            y, x = yx[m, 0], yx[m, 1]
            inside = (y >= 0) & (x >= 0) & (y + p <= h) & (x + p <= w)
            y, x = np.clip(y, 0, h - p), np.clip(x, 0, w - p)
            total = (t[y + p, x + p] - t[y, x + p] - t[y + p, x] + t[y, x]).numpy()
            ok[m] = inside & (total == p * p)
        return ok

    def offsets(self, rows: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """Random offsets in [−p/2, p/2]², set to 0 where the moved crop would leave the tissue."""
        rows = np.asarray(rows)
        off = torch.randint(-self.shift, self.shift + 1, (len(rows), 2), generator=generator).numpy()
        keep = self._on_tissue(self.slide[rows], self.corner[rows] + off)
        return np.where(keep[:, None], off, 0)

    def batch(self, rows: np.ndarray, offsets: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """{role: (B, C, p, p)}: the crops of `rows` moved by `offsets` (B, 2) latent pixels (none: 0)."""
        rows = np.asarray(rows)
        yx = self.corner[rows] + (0 if offsets is None else offsets)
        ar = torch.arange(self.p)
        canvas = next(iter(self.canvases.values()))
        out = torch.zeros((len(rows), canvas.shape[0], self.p, self.p), dtype=canvas.dtype, device=canvas.device)
        for s in np.unique(self.slide[rows]):
            m = np.nonzero(self.slide[rows] == s)[0]
            ys = torch.from_numpy(yx[m, 0])[:, None, None] + ar[None, :, None]
            xs = torch.from_numpy(yx[m, 1])[:, None, None] + ar[None, None, :]
            out[torch.from_numpy(m).to(out.device)] = self.canvases[int(s)][:, ys.to(out.device), xs.to(out.device)].permute(1, 0, 2, 3)
        bounds = np.cumsum([0, *self.widths])
        crops = {r: out[:, bounds[k] : bounds[k + 1]] for k, r in enumerate(self.roles)}
        if self.context is not None:
            moved = self.origin[rows] + (0 if offsets is None else offsets) * self.factor  # the crops' pixel corners
            ctx = to_latent_grid(self.context(rows, moved), self.p, out.device)
            crops |= {r: torch.cat([crops[r], ctx[:, k : k + 1]], 1) for k, r in enumerate(self.context_roles)}
        return crops
