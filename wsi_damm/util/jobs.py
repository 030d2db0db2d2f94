"""What every long-running stage shares: where its tasks run (threads, worker processes, a dask
cluster), resource checks before writing, and a dask progress bar."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import dask
from tqdm.auto import tqdm

from wsi_damm.util.errors import InputError


def process_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes for stages whose many small numpy and zarr calls serialise on the GIL in
    threads. Spawned: no threads or locks inherited from a parent that ran torch, and (unlike a
    forkserver) direct children, so each dies with its parent and a killed run leaves nothing
    writing behind a `--resume`."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


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


def free_disk(path: Path) -> int:
    """Free bytes on the file system that will hold `path` (which may not exist yet)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def available_memory() -> int | None:
    """Bytes the kernel can give without swapping (Linux MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_resources(out: Path, disk_bytes: int, workers: int, bytes_per_worker: int, what: str, memory_hint: str) -> None:
    """Refuse before writing anything when the output cannot fit on disk or the workers in memory."""
    free = free_disk(Path(out).parent)
    if disk_bytes > free:
        raise InputError(
            out,
            f"{what} needs up to {_gb(disk_bytes)} (uncompressed) but only {_gb(free)} is free there",
            "free some space or write somewhere else",
        )
    avail = available_memory()
    if avail is not None and workers * bytes_per_worker > avail:
        raise InputError(
            "--workers", f"{workers} workers × {_gb(bytes_per_worker)} for {what} exceed the {_gb(avail)} of memory available", memory_hint
        )


#: `--scheduler` names that run on this machine; anything else is a dask.distributed scheduler address
LOCAL_SCHEDULERS = ("threads", "processes", "sync", "synchronous")
SCHEDULER_HELP = (
    "threads | processes | sync (this machine), or a dask.distributed scheduler address such as "
    "tcp://host:8786 (a cluster sharing this file system; install wsi-damm[cluster])."
)


def is_cluster(scheduler: str) -> bool:
    return scheduler not in LOCAL_SCHEDULERS


@contextmanager
def cluster_client(address: str) -> Iterator:
    """A dask.distributed Client for `address`, closed on exit; clear errors when the extra is missing or
    the scheduler does not answer. Every worker needs wsi-damm installed and the same file system."""
    try:
        from dask.distributed import Client
    except ImportError as exc:
        raise InputError(
            "--scheduler", f"{address!r} is a cluster address but dask.distributed is not installed", "pip install 'wsi-damm[cluster]'"
        ) from exc
    try:
        client = Client(address, timeout="10s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise InputError("--scheduler", f"cannot reach a dask scheduler at {address}: {type(exc).__name__}: {exc}") from exc
    try:
        yield client
    finally:
        client.close()


@contextmanager
def compute_scheduler(scheduler: str) -> Iterator:
    """What `dask.compute(..., scheduler=…)` takes for `--scheduler`: the name of a local scheduler, or a
    connected Client (for lazy reductions such as evaluate's streamed metrics)."""
    if not is_cluster(scheduler):
        yield scheduler
        return
    with cluster_client(scheduler) as client:
        yield client


def run_tasks(tasks: list, scheduler: str, workers: int | None, bar: tqdm, prefix: str) -> None:
    """Run independent delayed tasks whose keys start with `prefix` and whose results are integers that
    advance `bar`: on threads, on our worker processes (`process_pool`), in this process, or on a
    dask.distributed cluster. Tile, stitch and the like all schedule their work here."""
    if not tasks:
        return
    if is_cluster(scheduler):
        from dask.distributed import as_completed

        with cluster_client(scheduler) as client:
            futures = client.compute(tasks)
            for fut in as_completed(futures, loop=client.loop):
                bar.update(int(fut.result()))
        return
    n = workers or os.cpu_count() or 1
    with TaskProgress(bar, prefix):
        if scheduler == "processes" and n > 1 and len(tasks) > 1:
            with process_pool(n) as pool:
                dask.compute(*tasks, scheduler="processes", pool=pool)
        elif scheduler == "threads" and n > 1:
            dask.compute(*tasks, scheduler="threads", num_workers=n)
        else:
            dask.compute(*tasks, scheduler="sync")
