"""What every long-running stage shares: output naming with resume, and a dask progress bar."""

from __future__ import annotations

import shutil
from pathlib import Path

import dask
from tqdm.auto import tqdm

from .errors import InputError


def prepare_output(out: Path, partial: Path, resume: bool, overwrite: bool, extra: tuple[Path, ...] = ()) -> None:
    """Refuse to clobber a finished output, and never silently restart (or reuse) a killed run.

    `partial` (and `extra` work files) are what an interrupted run leaves; `--resume` keeps
    them, `--overwrite` removes them.
    """
    if out.exists() and not overwrite:
        raise InputError(out, "already exists", "pass --overwrite to replace it")
    leftovers = [p for p in (partial, *extra) if p.exists()]
    if leftovers and not resume:
        if not overwrite:
            raise InputError(leftovers[0], "an interrupted run left this behind", "pass --resume to continue it or --overwrite to restart")
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)


class TaskProgress(dask.callbacks.Callback):
    """tqdm updates for dask's local schedulers: tasks whose key starts with `prefix` advance
    the bar by their (integer) result."""

    def __init__(self, bar: tqdm, prefix: str) -> None:
        super().__init__()
        self.bar, self.prefix = bar, prefix

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        name = key[0] if isinstance(key, tuple) else key
        if str(name).startswith(self.prefix):
            self.bar.update(int(result))
