"""Writing outputs so that a kill never leaves a torn or half-finished one under its final name.

Files are written to a temporary name beside them and renamed (one atomic `os.replace`); stores
and maps (folders) are built under `NAME.partial` and renamed into place by `publish` when whole.
`prepare_output` decides, before any work, what to do with a finished output or the leftovers
of a killed run. JSON and CSV writers live here too, so every file a stage writes goes one way.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from wsi_damm.util.errors import InputError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which is then renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_safe(value):
    """JSON has no ∞ or NaN: they are written as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    """Indented JSON, non-finite floats as strings, written atomically."""
    text = json.dumps(_json_safe(data), indent=2)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _from_json_safe(value):
    if isinstance(value, str) and value in NON_FINITE:
        return NON_FINITE[value]
    if isinstance(value, dict):
        return {k: _from_json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json_safe(v) for v in value]
    return value


NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def read_json(path: Path) -> dict:
    """What `write_json` wrote, with "inf", "-inf" and "nan" read back as floats (a string field with one of those
    values is read as that float too: use it for files of numbers)."""
    return _from_json_safe(json.loads(Path(path).read_text(encoding="utf-8")))


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Rows as CSV with a header of `fields` (keys not in `fields` are left out), written atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    atomic_write(Path(path), write)


def partial_path(out: Path) -> Path:
    """Where a folder output is built until it is whole."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def prepare_output(out: Path, resume: bool, overwrite: bool, extra: tuple[Path, ...] = ()) -> Path:
    """Refuse to clobber a finished output, and never silently restart (or reuse) a killed run.

    Returns the `.partial` path the output is built under. It (and `extra` work files) is what an
    interrupted run leaves: `--resume` keeps them, `--overwrite` removes them.
    """
    out = Path(out)
    partial = partial_path(out)
    if out.exists() and not overwrite:
        raise InputError(out, "already exists", "pass --overwrite to replace it")
    leftovers = [p for p in (partial, *extra) if p.exists()]
    if leftovers and not resume:
        if not overwrite:
            raise InputError(leftovers[0], "an interrupted run left this behind", "pass --resume to continue it or --overwrite to restart")
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)
    return partial


def publish(partial: Path, out: Path) -> Path:
    """Move a finished folder output from its `.partial` name into place (replacing an older one)."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    Path(partial).rename(out)
    return out
