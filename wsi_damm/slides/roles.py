"""Channel roles: which channel of which file is CD31 (vessels), DAPI (nuclei), NP (target)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .base import DEFAULT_MAX_BYTES, Level, Slide
from .open import open_file

ROLES = ("vessels", "nuclei", "target")
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
class SlideSpec:
    """Picklable recipe for a role-ordered slide; workers reopen files from it."""

    slide_id: str
    channels: tuple[tuple[str, ChannelRef], ...]  # (role, ref) in ROLES order
    planes: tuple[tuple[str, int], ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES

    @property
    def roles(self) -> list[str]:
        return [r for r, _ in self.channels]

    @property
    def paths(self) -> list[str]:
        return list(dict.fromkeys(ref.path for _, ref in self.channels))

    def open(self) -> "RoleSlide":
        return RoleSlide(self)

    def describe(self) -> dict:
        return {role: {"path": ref.path, "channel": ref.name, "index": ref.index} for role, ref in self.channels}


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
) -> list[SlideSpec]:
    specs = []
    for p in paths:
        path = str(p)
        with open_file(path, planes=planes, max_bytes=max_bytes) as slide:
            names = slide.channel_names
        indices = {role: select_channel(path, names, sel) for role, sel in channel_map.items()}
        if not channel_map:
            indices = auto_roles(path, names)
        mapping = {r: ChannelRef(path, i, names[i]) for r, i in indices.items()}
        _check_roles(path, mapping, ", ".join(names), required)
        specs.append(_spec(slide_id_from_path(path), mapping, planes, max_bytes))
    _check_unique_ids(specs)
    return specs


def specs_from_manifest(
    manifest: str | Path,
    required: tuple[str, ...] = ("vessels",),
    planes: dict[str, int] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
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
            with open_file(path, planes=planes, max_bytes=max_bytes) as slide:
                names = slide.channel_names
            if sel:
                index = select_channel(path, names, sel)
            elif len(names) == 1:
                index = 0
            else:
                auto = auto_roles(path, names)
                if role not in auto:
                    raise InputError(
                        where, f"{path} has {len(names)} channels ({', '.join(names)}); say which is {role}",
                        f"write {file_part}#<name|index>",
                    )
                index = auto[role]
            mapping[role] = ChannelRef(path, index, names[index])
        _check_roles(where, mapping, "see the manifest row", required)
        slide_id = (row.get("slide_id") or "").strip() or f"row{line}"
        specs.append(_spec(slide_id, mapping, planes, max_bytes))
    _check_unique_ids(specs, manifest)
    return specs


def _spec(slide_id: str, mapping: dict[str, ChannelRef], planes, max_bytes: int) -> SlideSpec:
    channels = tuple((r, mapping[r]) for r in ROLES if r in mapping)
    return SlideSpec(slide_id, channels, tuple(sorted((planes or {}).items())), max_bytes)


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
                self._files[p] = open_file(p, planes=planes, max_bytes=spec.max_bytes)
            self._setup()
        except Exception:
            self.close()
            raise

    def _setup(self) -> None:
        spec = self.spec
        first = self._files[spec.paths[0]]
        hw0 = first.levels[0].shape[1:]
        for p, s in self._files.items():
            if s.levels[0].shape[1:] != hw0:
                raise InputError(
                    p, f"size {s.levels[0].shape[1:]} differs from {spec.paths[0]} {hw0}",
                    "per-channel files of one slide must have the same height and width",
                )
        n = len(spec.channels)
        self.levels = []
        for lev in first.levels:
            if all(any(o.shape[1:] == lev.shape[1:] for o in s.levels) for s in self._files.values()):
                self.levels.append(Level((n,) + lev.shape[1:], lev.downsample))
        self.channel_names = [r for r, _ in spec.channels]
        self.mpp = next((s.mpp for s in self._files.values() if s.mpp), None)
        self.dtype = np.result_type(*[s.dtype for s in self._files.values()])
        self._level_index = {
            p: [next(i for i, o in enumerate(s.levels) if o.shape[1:] == lev.shape[1:]) for lev in self.levels]
            for p, s in self._files.items()
        }

    def _read(self, level: int, y: int, x: int, h: int, w: int, channels: tuple[int, ...]) -> np.ndarray:
        out = np.empty((len(channels), h, w), dtype=self.dtype)
        for p, s in self._files.items():
            wanted = [(k, self.spec.channels[ch][1].index) for k, ch in enumerate(channels) if self.spec.channels[ch][1].path == p]
            if not wanted:
                continue
            file_channels = tuple(dict.fromkeys(i for _, i in wanted))  # decode each source channel once
            block = s.read_region(self._level_index[p][level], y, x, h, w, file_channels)
            for k, i in wanted:
                out[k] = block[file_channels.index(i)]
        return out

    def close(self) -> None:
        for s in self._files.values():
            s.close()
