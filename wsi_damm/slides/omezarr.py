"""OME-Zarr images (NGFF 0.4 on Zarr v2, 0.5 on Zarr v3) as slides: what bioformats2raw, QuPath,
ome-zarr-py and napari write, and the format Bio-Formats converts every vendor format to.

Read lazily, level by level, straight from the zarr arrays: channel names from `omero`, the pixel
size from the scale transform of the first dataset (in µm, whatever unit the axes declare), and
other axes (t, z) held at one plane chosen with `--plane T=k` as for TIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from wsi_damm.slides.base import DEFAULT_MAX_BYTES, MAX_CHANNELS, Level, Slide, check_declared_size
from wsi_damm.util.errors import InputError

#: NGFF space units (UDUNITS names) → micrometres
UNIT_UM = {
    "micrometer": 1.0,
    "micron": 1.0,
    "µm": 1.0,
    "um": 1.0,
    "nanometer": 1e-3,
    "nm": 1e-3,
    "millimeter": 1e3,
    "mm": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
    "angstrom": 1e-4,
}


def is_ome_zarr(path: str | Path) -> bool:
    """A directory that is a zarr group (v2 `.zgroup`/`.zattrs` or v3 `zarr.json`)."""
    p = Path(path)
    return p.is_dir() and any((p / name).is_file() for name in ("zarr.json", ".zgroup", ".zattrs"))


def is_ome_image(path: str | Path) -> bool:
    """An OME-Zarr image or bioformats2raw store (not one of our patch or prediction stores)."""
    if not is_ome_zarr(path):
        return False
    try:
        attrs = _ome_attrs(zarr.open_group(str(path), mode="r"))
    except Exception:
        return False
    return "multiscales" in attrs or "bioformats2raw.layout" in attrs


def _ome_attrs(group: zarr.Group) -> dict:
    attrs = dict(group.attrs)
    return attrs.get("ome", attrs)  # 0.5 nests everything under "ome"; 0.4 keeps it at the top


def _image_group(path: str, root: zarr.Group, series: int) -> zarr.Group:
    """The group holding `multiscales`: the root itself, or (bioformats2raw layout) series `series` below it."""
    if "multiscales" in _ome_attrs(root):
        if series:
            raise InputError(path, f"holds one image, so there is no series {series}")
        return root
    attrs = _ome_attrs(root)
    if "bioformats2raw.layout" in attrs or "0" in root:
        names = sorted((k for k in root.group_keys() if k.isdigit()), key=int)
        if not names:
            raise InputError(path, "is a bioformats2raw store without image series")
        if str(series) not in names:
            raise InputError(path, f"has series 0..{len(names) - 1}, not {series}", "choose one with --plane S=<index>")
        image = root[str(series)]
        if "multiscales" in _ome_attrs(image):
            return image
    raise InputError(
        path,
        "is a zarr group but not an OME-Zarr image (no 'multiscales' metadata)",
        "write it with bioformats2raw or ome-zarr-py, or pass the image group inside it",
    )


def _axes(path: str, multiscale: dict, ndim: int) -> list[dict]:
    axes = multiscale.get("axes")
    if axes is None:  # NGFF 0.1 / 0.2: always t, c, z, y, x
        axes = ["t", "c", "z", "y", "x"][-ndim:]
    axes = [a if isinstance(a, dict) else {"name": a, "type": "channel" if a == "c" else "space" if a in "zyx" else "time"} for a in axes]
    if len(axes) != ndim:
        raise InputError(path, f"declares {len(axes)} axes but its arrays have {ndim} dimensions")
    names = [a["name"].lower() for a in axes]
    if "y" not in names or "x" not in names:
        raise InputError(path, f"image axes {names} have no y and x")
    return axes


def _scale(path: str, multiscale: dict, dataset: dict, n: int) -> list[float]:
    """The dataset's scale combined with the multiscale-level scale (both optional)."""
    scale = [1.0] * n
    for transforms in (dataset.get("coordinateTransformations", []), multiscale.get("coordinateTransformations", [])):
        for t in transforms:
            if t.get("type") == "scale" and "scale" in t:
                if len(t["scale"]) != n:
                    raise InputError(path, f"scale {t['scale']} does not have one value per axis ({n})")
                scale = [a * float(b) for a, b in zip(scale, t["scale"])]
    return scale


class OmeZarrSlide(Slide):
    def __init__(self, path: str | Path, planes: dict[str, int] | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = str(path)
        planes = {k.upper(): v for k, v in (planes or {}).items()}
        try:
            root = zarr.open_group(self.path, mode="r")
        except Exception as exc:
            raise InputError(self.path, f"not a readable zarr group: {type(exc).__name__}: {exc}") from exc
        image = _image_group(self.path, root, planes.pop("S", 0))
        meta = _ome_attrs(image)
        multiscale = meta["multiscales"][0]
        datasets = multiscale.get("datasets") or []
        if not datasets:
            raise InputError(self.path, "declares a multiscale image without datasets")
        try:
            arrays = [image[d["path"]] for d in datasets]
        except KeyError as exc:
            raise InputError(self.path, f"lists dataset {exc} which is missing from the store") from exc
        ndim = arrays[0].ndim
        axes = _axes(self.path, multiscale, ndim)
        names = [a["name"].lower() for a in axes]
        shape = tuple(int(s) for s in arrays[0].shape)
        check_declared_size(self.path, shape, arrays[0].dtype, max_bytes)
        channel = [i for i, a in enumerate(axes) if a.get("type") == "channel" or a["name"].lower() == "c"]
        self._channel_axis = channel[0] if channel else None
        n_channels = shape[self._channel_axis] if channel else 1
        if n_channels > MAX_CHANNELS:
            raise InputError(self.path, f"declares {n_channels} channels, more than {MAX_CHANNELS} (corrupt metadata?)")
        self._fixed: dict[int, int] = {}
        for i, (name, n) in enumerate(zip(names, shape)):
            if name in ("y", "x") or i == self._channel_axis:
                continue
            if n > 1 and name.upper() not in planes:
                raise InputError(
                    self.path,
                    f"has a {name} axis of size {n} (axes {names}, shape {shape})",
                    f"choose one plane with --plane {name.upper()}=<0..{n - 1}>",
                )
            k = planes.get(name.upper(), 0)
            if not 0 <= k < n:
                raise InputError(self.path, f"plane {name.upper()}={k} outside 0..{n - 1}")
            self._fixed[i] = k
        self._y, self._x = names.index("y"), names.index("x")
        self._arrays = []
        self.levels = []
        width0 = shape[self._x]
        for arr in arrays:
            if arr.ndim != ndim:
                break
            h, w = int(arr.shape[self._y]), int(arr.shape[self._x])
            self._arrays.append(arr)
            self.levels.append(Level((n_channels, h, w), width0 / w))
        self.dtype = np.dtype(arrays[0].dtype).newbyteorder("=")
        omero = meta.get("omero") or dict(image.attrs).get("omero") or {}
        labels = [str(c.get("label") or "") for c in omero.get("channels", [])]
        self.channel_names = labels if len(labels) == n_channels and all(labels) else [f"C{i}" for i in range(n_channels)]
        unit = axes[self._x].get("unit")
        per_unit = UNIT_UM.get(str(unit).lower()) if unit else None
        x_scale = _scale(self.path, multiscale, datasets[0], ndim)[self._x]
        self.mpp = x_scale * per_unit if per_unit else None  # a scale without a length unit says nothing about µm

    def _read(self, level: int, y: int, x: int, h: int, w: int, channels: tuple[int, ...]) -> np.ndarray:
        arr = self._arrays[level]
        index: list = [slice(None)] * arr.ndim
        for i, k in self._fixed.items():
            index[i] = k
        index[self._y], index[self._x] = slice(y, y + h), slice(x, x + w)
        if self._channel_axis is None:
            return np.asarray(arr[tuple(index)])[None]
        lo, hi = min(channels), max(channels) + 1  # one contiguous read, then pick: channels are few and adjacent
        index[self._channel_axis] = slice(lo, hi)
        block = np.asarray(arr[tuple(index)])  # axes kept: channel, y, x in stored order
        kept = [i for i in range(arr.ndim) if i not in self._fixed]
        block = np.moveaxis(block, [kept.index(self._channel_axis), kept.index(self._y), kept.index(self._x)], [0, 1, 2])
        return block[[c - lo for c in channels]]

    def close(self) -> None:
        self._arrays = []
