"""Counter-based Gaussian noise keyed per patch: noise(key, step) is the same whatever the batch.

A patch's sampling noise must not depend on batch size, order or worker, and
drawing it must not loop over samples. splitmix64 over (key, step, element index) gives
independent uniforms, Box–Muller turns them into normals; all in vectorised int64 torch ops.
"""

from __future__ import annotations

import hashlib
import math

import torch

_MASK = (1 << 64) - 1


def _signed(v: int) -> int:
    v &= _MASK
    return v - (1 << 64) if v >= 1 << 63 else v


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def patch_key(seed: int, slide_id: str, y: int, x: int) -> int:
    """Stable 63-bit key of a patch (independent of Python's hash randomisation)."""
    digest = hashlib.blake2b(f"{seed}|{slide_id}|{y}|{x}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def keyed_normal(keys: torch.Tensor, step: int, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, *shape) standard normals; row b depends only on (keys[b], step)."""
    n = math.prod(shape)
    idx = torch.arange(2 * n, dtype=torch.int64)
    base = _splitmix64(keys.to(torch.int64)[:, None] ^ _splitmix64(torch.tensor(step, dtype=torch.int64) * 2 + 1))
    bits = _splitmix64(base + idx[None] * _GOLDEN)
    u = (_shr(bits, 11).double() + 0.5) * 2.0**-53  # (0, 1)
    u1, u2 = u[:, :n], u[:, n:]
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    return z.float().reshape((len(keys),) + tuple(shape)).to(device)


def draw_keys(keys: torch.Tensor, draw: int) -> torch.Tensor:
    """Keys of the `draw`-th independent sample of each patch (`--samples K`); draw 0 is `keys`
    itself, so one draw reproduces a single-sample prediction exactly."""
    if draw == 0:
        return keys
    mixed = _splitmix64(keys.to(torch.int64) ^ _splitmix64(torch.tensor(draw, dtype=torch.int64) * 2))
    return _shr(mixed, 1)  # non-negative 63-bit, like patch_key


def canvas_key(seed: int, slide_id: str) -> int:
    """Stable 63-bit key of a slide's latent canvas (one per seed and slide)."""
    digest = hashlib.blake2b(f"{seed}|{slide_id}|canvas".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


_POS_BITS = 21  # latent rows and columns below 2²¹ (an 8-million-pixel slide side at 4× downsampling)


def canvas_normal(
    key: int, draws: int, step: int, channels: int, y0: int, y1: int, x0: int, x1: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(draws, channels, y1 − y0, x1 − x0) standard normals of the canvas region [y0, y1) × [x0, x1):
    element (k, c, y, x) depends only on (key, draw k, step, c, y, x), so any crop of the canvas —
    in any batch, order, rank or resumed run — reads the same numbers there."""
    keys = draw_keys(torch.tensor([key], dtype=torch.int64), 0)
    keys = torch.cat([draw_keys(keys, k) for k in range(draws)])
    c = torch.arange(channels, dtype=torch.int64)[:, None, None]
    y = torch.arange(y0, y1, dtype=torch.int64)[None, :, None]
    x = torch.arange(x0, x1, dtype=torch.int64)[None, None, :]
    counter = ((c << (2 * _POS_BITS)) | (y << _POS_BITS) | x).reshape(-1)  # unique per (c, y, x)
    base = _splitmix64(keys[:, None] ^ _splitmix64(torch.tensor(step, dtype=torch.int64) * 2 + 1))
    u1 = _uniform(_splitmix64(base + (2 * counter)[None] * _GOLDEN))
    u2 = _uniform(_splitmix64(base + (2 * counter + 1)[None] * _GOLDEN))
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    return z.float().reshape(draws, channels, y1 - y0, x1 - x0).to(device)


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    return (_shr(bits, 11).double() + 0.5) * 2.0**-53  # (0, 1)
