"""The patch store and the prediction store (zarr v3): what `tile` and `predict` write.

Layout: `images` (N, C, P, P) one chunk per patch, S patches per shard; `coords` (N, 3)
[slide, y, x]; `tissue` (N,); `shard_done` (n_shards,) — one flag per shard, set after the shard's
pixels are written, so a killed run resumes at the first unfinished shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from wsi_damm.tiling.context import cut_windows, window_side
from wsi_damm.util.errors import InputError

FORMAT = "wsi-damm-patch-store"
FORMAT_VERSION = 1
PRED_FORMAT = "wsi-damm-prediction-store"


def _codec(dtype: np.dtype) -> list:
    """zstd-1: half the raw size at ~1 GB/s; bit-shuffled first for 16-bit data, where it pays. Then a
    crc32c of every patch chunk (4 bytes): a flipped bit on disk is an error, never a wrong map."""
    if np.dtype(dtype).itemsize > 1:
        return [BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.bitshuffle), Crc32cCodec()]
    return [ZstdCodec(level=1), Crc32cCodec()]


def create_patch_store(
    path: str | Path,
    coords: np.ndarray,
    tissue: np.ndarray,
    n_channels: int,
    patch: int,
    dtype: np.dtype,
    shard_patches: int,
    attrs: dict,
) -> zarr.Group:
    """Create every array up front (writers then only fill whole shards) and the metadata."""
    n = len(coords)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    s = max(1, min(shard_patches, n))
    root.create_array(
        "images",
        shape=(n, n_channels, patch, patch),
        dtype=dtype,
        chunks=(1, n_channels, patch, patch),
        shards=(s, n_channels, patch, patch),
        compressors=_codec(dtype),
        fill_value=0,
        dimension_names=("patch", "c", "y", "x"),
    )
    root.create_array("coords", shape=(n, 3), dtype=np.int64, chunks=(max(n, 1), 3), fill_value=0)[:] = coords
    root.create_array("tissue", shape=(n,), dtype=np.float32, chunks=(max(n, 1),), fill_value=0)[:] = tissue
    root.create_array("shard_done", shape=(math.ceil(n / s),), dtype=np.uint8, chunks=(1,), fill_value=0)
    root.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "shard_patches": s, "complete": False, **attrs})
    return root


@dataclass
class PatchStore:
    """Read side of a patch store: metadata plus lazy arrays."""

    path: Path
    root: zarr.Group
    format_name = FORMAT

    @classmethod
    def open(cls, path: str | Path, mode: str = "r", require_complete: bool = True) -> PatchStore:
        path = Path(path)
        if not path.exists():
            raise InputError(path, "no such patch store")
        try:
            root = zarr.open_group(str(path), mode=mode)
            attrs = dict(root.attrs)
        except Exception as exc:
            raise InputError(path, f"not a zarr patch store: {exc}") from exc
        if attrs.get("format") != cls.format_name:
            kind = "prediction store" if cls.format_name == PRED_FORMAT else "patch store"
            raise InputError(path, f"is not a wsi-damm {kind} (format {attrs.get('format')!r})")
        version = int(attrs.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise InputError(
                path,
                f"was written by a newer wsi-damm (store format {version}, this version reads ≤ {FORMAT_VERSION})",
                "upgrade wsi-damm",
            )
        if require_complete and not attrs.get("complete"):
            raise InputError(path, "is incomplete (the run that wrote it was interrupted)", "rerun that command with --resume")
        return cls(path, root)

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)

    @property
    def images(self) -> zarr.Array:
        return self.root["images"]

    @property
    def coords(self) -> np.ndarray:
        return np.asarray(self.root["coords"][:])

    @property
    def roles(self) -> list[str]:
        return list(self.attrs["roles"])

    @property
    def slides(self) -> list[dict]:
        return list(self.attrs["slides"])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def context_roles(self) -> list[str]:
        """Roles of the stored context images (empty for stores tiled before there was context)."""
        return list(self.attrs.get("context", {}).get("roles", [])) if "context" in self.root else []

    def context_windows(self, rows: np.ndarray, span: int, origins: np.ndarray | None = None) -> np.ndarray:
        """(B, C, s, s) float32 in [0, 1]: the context around patches `rows`, a window `span` patches wide,
        centred on each patch, or on a patch-sized window at `origins` (B, 2; tiled-grid pixels, the
        same slide as the row: a canvas crop moved off the tiling grid)."""
        if not self.context_roles:
            raise InputError(self.path, "has no context images (tiled by an older wsi-damm)", "tile the slides again")
        rows = np.asarray(rows)
        every = self.__dict__.get("_coords")
        if every is None:  # read once: training asks for a few rows at a time, over and over
            every = self.__dict__.setdefault("_coords", self.coords)
        coords = every[rows]
        yx = coords[:, 1:] if origins is None else np.asarray(origins)
        side = window_side(int(self.attrs["patch_size"]), span)
        out = np.zeros((len(rows), len(self.context_roles), side, side), np.float32)
        for si in np.unique(coords[:, 0]):
            sel = coords[:, 0] == si
            out[sel] = self.context_at(int(si), yx[sel], span)
        return out

    def context_at(self, slide_index: int, origins: np.ndarray, span: int) -> np.ndarray:
        """(B, C, s, s) float32 in [0, 1]: context windows `span` patches wide around patch-sized windows
        at tiled-grid pixel `origins` (B, 2) of one slide: anywhere, not only at tiled patches."""
        if not self.context_roles:
            raise InputError(self.path, "has no context images (tiled by an older wsi-damm)", "tile the slides again")
        return cut_windows(self._context_image(slide_index), np.asarray(origins), int(self.attrs["patch_size"]), span)

    def _context_image(self, slide_index: int) -> np.ndarray:
        cache = self.__dict__.setdefault("_context_cache", {})
        if slide_index not in cache:
            cache[slide_index] = np.asarray(self.root["context"][str(slide_index)][:], np.float32)
        return cache[slide_index]

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def summary(self) -> dict:
        coords = self.coords
        attrs = self.attrs
        per_slide = np.bincount(coords[:, 0], minlength=len(attrs["slides"])) if len(coords) else []
        return {
            "path": str(self.path),
            "patches": len(self),
            "patches_per_slide": {s["slide_id"]: int(n) for s, n in zip(attrs["slides"], per_slide)},
            "roles": attrs["roles"],
            "patch_size": attrs["patch_size"],
            "stride": attrs["stride"],
            "overlap": attrs["overlap"],
            "level": attrs["level"],
            "mpp": attrs["mpp"],
            "dtype": str(self.images.dtype),
            "shard_patches": attrs["shard_patches"],
            "complete": attrs["complete"],
            "disk_mb": round(self.disk_bytes() / 2**20, 2),
        }


def to_model_range(raw: np.ndarray):
    """Stored integer patches → float32 torch tensor in [-1, 1] (what every model stage sees)."""
    import torch

    top = float(np.iinfo(raw.dtype).max)
    return torch.from_numpy(raw.astype(np.float32)).mul_(2.0 / top).sub_(1.0)


def create_prediction_store(path: str | Path, conditions: PatchStore, attrs: dict, stats: tuple[str, ...] = ("pred",)) -> zarr.Group:
    """Same patches and shards as the conditions store; per-patch NP map and the other per-pixel statistics
    named in `stats` (for several draws per patch: their sd and central interval, `sampling.draws`),
    divergence and gate share."""
    n, _, p, _ = conditions.images.shape
    s = int(conditions.attrs["shard_patches"])
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name in stats:
        root.create_array(
            name,
            shape=(n, 1, p, p),
            dtype=np.float16,
            chunks=(1, 1, p, p),
            shards=(s, 1, p, p),
            compressors=[ZstdCodec(level=1), Crc32cCodec()],
            fill_value=0,
            dimension_names=("patch", "c", "y", "x"),
        )
    for name in ("divergence", "multimodal_fraction"):
        root.create_array(name, shape=(n,), dtype=np.float32, chunks=(s,), fill_value=np.nan)
    root.create_array("coords", shape=(n, 3), dtype=np.int64, chunks=(max(n, 1), 3), fill_value=0)[:] = conditions.coords
    root.create_array("shard_done", shape=(math.ceil(n / s),), dtype=np.uint8, chunks=(1,), fill_value=0)
    root.attrs.update(
        {
            "format": PRED_FORMAT,
            "format_version": FORMAT_VERSION,
            "shard_patches": s,
            "complete": False,
            "patch_size": p,
            "stride": conditions.attrs["stride"],
            "overlap": conditions.attrs["overlap"],
            "mpp": conditions.attrs["mpp"],
            "percentiles": conditions.attrs.get("percentiles"),
            "tissue": conditions.attrs.get("tissue", "auto"),
            "slides": conditions.slides,
            **attrs,
        }
    )
    return root


class PredictionStore(PatchStore):
    """Read side of a prediction store (`pred`, `divergence`, `multimodal_fraction`, `coords`)."""

    format_name = PRED_FORMAT

    @property
    def pred(self) -> zarr.Array:
        return self.root["pred"]

    def __len__(self) -> int:
        return int(self.pred.shape[0])


def _read_checked(array: zarr.Array, a: int, b: int) -> np.ndarray:
    """array[a:b]; a chunk whose stored checksum does not match its bytes names the store, array and patch."""
    try:
        return np.asarray(array[a:b])
    except ValueError as exc:
        if "checksum" not in str(exc):
            raise
        for row in range(a, b):  # which patch: only on the error path
            try:
                array[row]
            except ValueError:
                store = str(array.store_path).removeprefix("file://").removesuffix("/" + array.path)
                shard = row // array.shards[0] if array.shards else row
                raise InputError(
                    store,
                    f"array {array.path!r}, patch {row} (shard {shard}) is corrupted: its crc32c checksum does not match the bytes on disk",
                    "re-create the store (rerun the command with --overwrite)",
                ) from exc
        raise


def read_rows(array: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """array[rows] for sorted or unsorted rows, read as contiguous slices (whole-shard reads).

    zarr's orthogonal (integer-array) selection on sharded arrays is far slower and allocates
    far more than slicing; rows of one band or shard are almost always runs of neighbours.
    """
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows),) + tuple(array.shape[1:]), dtype=array.dtype)
    if len(rows) == 0:
        return out
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    in_order = bool((order[1:] > order[:-1]).all())  # then runs land in slices: a memcpy, not a scatter (3× faster)
    breaks = np.nonzero(np.diff(sorted_rows) != 1)[0] + 1
    pos = 0
    for run in np.split(sorted_rows, breaks):
        block = _read_checked(array, int(run[0]), int(run[-1]) + 1)
        where = slice(pos, pos + len(run)) if in_order else order[pos : pos + len(run)]
        out[where] = block
        pos += len(run)
    return out
