"""Channel roles: which channel of which file is CD31 (vessels), DAPI (nuclei), NP (target)."""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from wsi_damm.slides.base import DEFAULT_MAX_BYTES, Level, Slide
from wsi_damm.slides.open import open_file
from wsi_damm.util.errors import InputError

ROLES = ("vessels", "nuclei", "target")
INPUT_ROLES = ("vessels", "nuclei")  # what prediction reads; the tissue mask comes from these alone
AUTO_NAMES = {
    "vessels": ("cd31", "pecam1", "pecam-1", "pecam"),
    "nuclei": ("dapi", "hoechst", "hoechst33342"),
    "target": ("np", "qd", "qdot", "qdots", "quantum dots", "nanoparticle", "nanoparticles"),
}


@dataclass(frozen=True)
class ChannelRef:
    path: str
    index: int
    name: str


@dataclass(frozen=True)
class Transform:
    """Where a channel's pixels sit relative to the reference (vessels) channel, in level-0 pixels:
    reference pixel p shows channel pixel R(θ)(p − c) + c + (dy, dx), c the slide centre."""

    dy: float = 0.0
    dx: float = 0.0
    degrees: float = 0.0
    score: float | None = None  # normalised cross-correlation after alignment (registration quality)
    score_before: float | None = None

    @property
    def identity(self) -> bool:
        return self.dy == 0 and self.dx == 0 and self.degrees == 0


@dataclass(frozen=True)
class SlideSpec:
    """Picklable recipe for a role-ordered slide; workers reopen files from it."""

    slide_id: str
    channels: tuple[tuple[str, ChannelRef], ...]  # (role, ref) in ROLES order
    planes: tuple[tuple[str, int], ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES
    transforms: tuple[tuple[str, Transform], ...] = ()  # (role, transform) of registered channels
    size_tolerance: float = 0.0  # per-channel files may differ in size by this fraction (then registered)
    mpp: float | None = None  # declared pixel size (µm) of files that carry none, e.g. JPEG / PNG (`--mpp`)

    @property
    def roles(self) -> list[str]:
        return [r for r, _ in self.channels]

    @property
    def paths(self) -> list[str]:
        return list(dict.fromkeys(ref.path for _, ref in self.channels))

    @property
    def mask_channels(self) -> list[int]:
        """Channels the tissue mask is drawn from: the inputs (CD31, DAPI), never the measured target, so
        a slide gets the same mask — and the same patches — whether or not its NP channel is given.
        A slide with no input role (a target-only truth file) falls back to all its channels."""
        inputs = [i for i, r in enumerate(self.roles) if r in INPUT_ROLES]
        return inputs or list(range(len(self.channels)))

    def open(self) -> RoleSlide:
        return RoleSlide(self)

    def without(self, role: str) -> SlideSpec:
        """The same slide with one role ignored (e.g. `--no-nuclei`: uni-modal prediction)."""
        return replace(self, channels=tuple((r, ref) for r, ref in self.channels if r != role))

    def describe(self) -> dict:
        """Per role: the file (absolute, so a later command finds it from any working directory), channel and
        registration."""
        moved = dict(self.transforms)
        return {
            role: {
                "path": os.path.abspath(ref.path),
                "channel": ref.name,
                "index": ref.index,
                **({"registration": asdict(moved[role])} if role in moved else {}),
            }
            for role, ref in self.channels
        }

    def transform(self, role: str) -> Transform | None:
        t = dict(self.transforms).get(role)
        return None if t is None or t.identity else t


def parse_channel_map(text: str | None) -> dict[str, str]:
    """'vessels=CD31,nuclei=DAPI' -> {'vessels': 'CD31', 'nuclei': 'DAPI'}."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise InputError("--channels", f"entry {item!r} is not role=channel", "e.g. vessels=CD31,nuclei=DAPI,target=NP")
        role, sel = (p.strip() for p in item.split("=", 1))
        role = role.lower()
        if role not in ROLES:
            raise InputError("--channels", f"unknown role {role!r}", f"roles are {', '.join(ROLES)}")
        if role in out:
            raise InputError("--channels", f"role {role!r} given twice")
        out[role] = sel
    return out


def select_channel(path: str, names: list[str], selector: str) -> int:
    """Channel index by name (case-insensitive), by index, or by colour R/G/B."""
    sel = selector.strip()
    lowered = [n.lower() for n in names]
    if sel.lower() in lowered:
        return lowered.index(sel.lower())
    if sel.lstrip("-").isdigit():
        i = int(sel)
        if 0 <= i < len(names):
            return i
        raise InputError(path, f"channel index {i} out of range; it has {len(names)} channels: {', '.join(names)}")
    raise InputError(path, f"has no channel {sel!r}; its channels are: {', '.join(names)}")


def auto_roles(path: str, names: list[str]) -> dict[str, int]:
    """Roles found from well-known stain names; ambiguity is an error, absence is not."""
    found: dict[str, int] = {}
    for role, keys in AUTO_NAMES.items():
        hits = [i for i, n in enumerate(names) if n.lower().strip() in keys]
        if not hits:
            hits = [i for i, n in enumerate(names) if any(k in n.lower().replace("-", " ").split() for k in keys)]
        if len(hits) > 1:
            raise InputError(
                path,
                f"role {role!r} is ambiguous: channels {', '.join(names[i] for i in hits)} all match",
                f"say which with --channels {role}=<name|index>",
            )
        if hits:
            found[role] = hits[0]
    return found


def _check_roles(source: str, mapping: dict[str, ChannelRef], names_hint: str, required: tuple[str, ...]) -> None:
    missing = [r for r in required if r not in mapping]
    if missing:
        raise InputError(
            source,
            f"missing role(s) {', '.join(missing)}; channels available: {names_hint}",
            "map them with --channels vessels=<name|index|R/G/B>,nuclei=...,target=...",
        )
    seen: dict[tuple[str, int], str] = {}
    for role, ref in mapping.items():
        key = (ref.path, ref.index)
        if key in seen:
            raise InputError(source, f"roles {seen[key]!r} and {role!r} both point to channel {ref.name!r}")
        seen[key] = role


def slide_id_from_path(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".qptiff", ".tiff", ".tif", ".svs", ".ndpi", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def specs_from_paths(
    paths: list[str | Path],
    channel_map: dict[str, str],
    required: tuple[str, ...] = ("vessels",),
    planes: dict[str, int] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    mpp: float | None = None,
) -> list[SlideSpec]:
    specs = []
    for p in paths:
        path = str(p)
        with open_file(path, planes=planes, max_bytes=max_bytes, mpp=mpp) as slide:
            names = slide.channel_names
        indices = {role: select_channel(path, names, sel) for role, sel in channel_map.items()}
        if not channel_map:
            indices = auto_roles(path, names)
        mapping = {r: ChannelRef(path, i, names[i]) for r, i in indices.items()}
        _check_roles(path, mapping, ", ".join(names), required)
        specs.append(_spec(slide_id_from_path(path), mapping, planes, max_bytes, mpp))
    _check_unique_ids(specs)
    return specs


def specs_from_manifest(
    manifest: str | Path,
    required: tuple[str, ...] = ("vessels",),
    planes: dict[str, int] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    mpp: float | None = None,
) -> list[SlideSpec]:
    """CSV `slide_id,vessels,nuclei,target`; cells `path` or `path#channel`, relative to the CSV."""
    manifest = Path(manifest)
    try:
        rows = list(csv.DictReader(manifest.open(newline="")))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(manifest, f"cannot read manifest: {exc}") from exc
    if not rows or "slide_id" not in (rows[0].keys()):
        raise InputError(manifest, "manifest needs a header 'slide_id,vessels,nuclei,target' and at least one row")
    unknown = [c for c in rows[0].keys() if c not in ("slide_id",) + ROLES]
    if unknown:
        raise InputError(manifest, f"unknown column(s) {', '.join(unknown)}; expected slide_id,{','.join(ROLES)}")
    specs = []
    for line, row in enumerate(rows, start=2):
        where = f"{manifest}:{line}"
        mapping: dict[str, ChannelRef] = {}
        for role in ROLES:
            cell = (row.get(role) or "").strip()
            if not cell:
                continue
            file_part, _, sel = cell.partition("#")
            path = Path(file_part)
            path = str(path if path.is_absolute() else manifest.parent / path)
            with open_file(path, planes=planes, max_bytes=max_bytes, mpp=mpp) as slide:
                names = slide.channel_names
            if sel:
                index = select_channel(path, names, sel)
            elif len(names) == 1:
                index = 0
            else:
                auto = auto_roles(path, names)
                if role not in auto:
                    raise InputError(
                        where,
                        f"{path} has {len(names)} channels ({', '.join(names)}); say which is {role}",
                        f"write {file_part}#<name|index>",
                    )
                index = auto[role]
            mapping[role] = ChannelRef(path, index, names[index])
        _check_roles(where, mapping, "see the manifest row", required)
        slide_id = (row.get("slide_id") or "").strip() or f"row{line}"
        specs.append(_spec(slide_id, mapping, planes, max_bytes, mpp))
    _check_unique_ids(specs, manifest)
    return specs


def _spec(slide_id: str, mapping: dict[str, ChannelRef], planes, max_bytes: int, mpp: float | None = None) -> SlideSpec:
    channels = tuple((r, mapping[r]) for r in ROLES if r in mapping)
    return SlideSpec(slide_id, channels, tuple(sorted((planes or {}).items())), max_bytes, mpp=mpp)


def _check_unique_ids(specs: list[SlideSpec], source: str | Path | None = None) -> None:
    ids = [s.slide_id for s in specs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(source, f"slide ids are not unique: {', '.join(dup)}", "rename the files or use a manifest")


class RoleSlide(Slide):
    """Channels in role order, possibly gathered from several files of one section."""

    def __init__(self, spec: SlideSpec) -> None:
        self.spec = spec
        self.path = spec.paths[0] if len(spec.paths) == 1 else " + ".join(spec.paths)
        planes = dict(spec.planes)
        self._files: dict[str, Slide] = {}
        try:
            for p in spec.paths:
                self._files[p] = open_file(p, planes=planes, max_bytes=spec.max_bytes, mpp=spec.mpp)
            self._setup()
        except Exception:
            self.close()
            raise

    def _setup(self) -> None:
        spec = self.spec
        first = self._files[spec.paths[0]]
        hw0 = first.levels[0].shape[1:]
        for p, s in self._files.items():
            hw = s.levels[0].shape[1:]
            off = max(abs(a - b) / b for a, b in zip(hw, hw0))
            if off > spec.size_tolerance:
                raise InputError(
                    p,
                    f"size {hw} differs from {spec.paths[0]} {hw0}",
                    "per-channel files of one slide must have the same height and width, or allow a difference with "
                    "--size-tolerance (they are then aligned by --register)",
                )
        n = len(spec.channels)
        # levels of the first file that every file has at (nearly) the same downsample
        self.levels, self._level_index = [], {p: [] for p in self._files}
        for lev in first.levels:
            match = {
                p: next(
                    (
                        i
                        for i, o in enumerate(s.levels)
                        if abs(o.downsample / lev.downsample - 1) < 0.02
                        and max(abs(a - b) for a, b in zip(o.shape[1:], lev.shape[1:])) <= spec.size_tolerance * max(lev.shape[1:]) + 1
                    ),
                    None,
                )
                for p, s in self._files.items()
            }
            if all(i is not None for i in match.values()):
                self.levels.append(Level((n,) + lev.shape[1:], lev.downsample))
                for p, i in match.items():
                    self._level_index[p].append(i)
        self.channel_names = [r for r, _ in spec.channels]
        self.mpp = next((s.mpp for s in self._files.values() if s.mpp), None)
        self.dtype = np.result_type(*[s.dtype for s in self._files.values()])

    def _read(self, level: int, y: int, x: int, h: int, w: int, channels: tuple[int, ...]) -> np.ndarray:
        out = np.empty((len(channels), h, w), dtype=self.dtype)
        for p, s in self._files.items():
            wanted = [(k, ch) for k, ch in enumerate(channels) if self.spec.channels[ch][1].path == p]
            direct = [(k, self.spec.channels[ch][1].index) for k, ch in wanted if self.spec.transform(self.spec.channels[ch][0]) is None]
            if direct:
                file_channels = tuple(dict.fromkeys(i for _, i in direct))  # decode each source channel once
                block = _read_padded(s, self._level_index[p][level], y, x, h, w, file_channels)
                for k, i in direct:
                    out[k] = block[file_channels.index(i)]
            for k, ch in wanted:
                role, ref = self.spec.channels[ch]
                t = self.spec.transform(role)
                if t is not None:
                    out[k] = _read_transformed(
                        s,
                        self._level_index[p][level],
                        y,
                        x,
                        h,
                        w,
                        ref.index,
                        t,
                        self.levels[level].downsample,
                        self.levels[0].shape[1:],
                        self.dtype,
                    )
        return out

    def read_as_scanned(self, level: int, channel: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """One channel (its index in role order) as its file holds it, whatever transform the spec gives it, on a
        region that may reach past the file's edges (zeros there): what registration resamples itself."""
        path, index = self.spec.channels[channel][1].path, self.spec.channels[channel][1].index
        return _read_padded(self._files[path], self._level_index[path][level], y, x, h, w, (index,))[0]

    def close(self) -> None:
        for s in self._files.values():
            s.close()


def _read_padded(s: Slide, level: int, y: int, x: int, h: int, w: int, channels: tuple[int, ...]) -> np.ndarray:
    """A region that may reach past the file's edges (files a few pixels smaller, moved channels): zeros there."""
    _, height, width = s.levels[level].shape
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, height), min(x + w, width)
    if (y0, x0, y1, x1) == (y, x, y + h, x + w):
        return s.read_region(level, y, x, h, w, channels)
    out = np.zeros((len(channels), h, w), s.dtype)
    if y1 > y0 and x1 > x0:
        out[:, y0 - y : y1 - y, x0 - x : x1 - x] = s.read_region(level, y0, x0, y1 - y0, x1 - x0, channels)
    return out


def _read_transformed(
    s: Slide, level: int, y: int, x: int, h: int, w: int, index: int, t: Transform, downsample: float, shape0: tuple[int, int], dtype
) -> np.ndarray:
    """Lazily resample one channel into the reference frame: only the window's source pixels are read."""
    from scipy import ndimage

    cy, cx = (shape0[0] / downsample - 1) / 2, (shape0[1] / downsample - 1) / 2  # slide centre at this level
    ty, tx = t.dy / downsample, t.dx / downsample
    a = np.deg2rad(t.degrees)
    if t.degrees == 0 and float(ty).is_integer() and float(tx).is_integer():  # whole-pixel shift: exact, no resampling
        return _read_padded(s, level, y + int(ty), x + int(tx), h, w, (index,))[0]
    yy, xx = np.meshgrid(np.arange(y, y + h, dtype=np.float64) - cy, np.arange(x, x + w, dtype=np.float64) - cx, indexing="ij")
    sy = np.cos(a) * yy - np.sin(a) * xx + cy + ty
    sx = np.sin(a) * yy + np.cos(a) * xx + cx + tx
    margin = 4
    y0, x0 = int(np.floor(sy.min())) - margin, int(np.floor(sx.min())) - margin
    y1, x1 = int(np.ceil(sy.max())) + margin + 1, int(np.ceil(sx.max())) + margin + 1
    src = _read_padded(s, level, y0, x0, y1 - y0, x1 - x0, (index,))[0].astype(np.float32)
    out = ndimage.map_coordinates(src, [sy - y0, sx - x0], order=3, mode="constant", cval=0.0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(dtype)
    return out.astype(dtype)
