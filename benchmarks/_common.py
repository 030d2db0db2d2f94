"""Helpers the benchmark scripts share: each side runs in a fresh subprocess with its own peak RSS."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from wsi_damm.util.machine import machine  # noqa: F401 (the benchmarks' import of it)


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's peak across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TreeMemory:
    """Peak memory of this process plus its worker processes, sampled every `interval` s: the
    sum of PSS (shared pages split between the processes sharing them, so nothing counts twice).
    With `root`, the tree of that process instead (a job started with Popen), without this one:
    a benchmark that wrote a large slide in-process holds memory of its own that is not the job's.

    `peak_mb` is the larger of that sampled peak and this process's own VmHWM (without `root`);
    a spike shorter than `interval` in a worker can be missed.
    """

    def __init__(self, interval: float = 0.05, root: int | None = None) -> None:
        self.interval, self.sampled_mb, self.root = interval, 0.0, root
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.sampled_mb if self.root is not None else max(self.sampled_mb, peak_rss_mb())

    def _run(self) -> None:
        root = self.root if self.root is not None else os.getpid()
        while not self._stop.wait(self.interval):
            self.sampled_mb = max(self.sampled_mb, sum(_pss_kb(p) for p in _tree(root)) / 1024)


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in children.read_text().split()]
            except OSError:
                pass
    return pids


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(script: str, *args: str) -> dict:
    """Run `script --worker args…` and return the JSON object its last line prints."""
    res = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(result: dict, path: Path | None) -> None:
    """Print a benchmark's JSON and, with --json, write the same text to `path`."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


class Steps:
    """A resumable benchmark's steps: `run(name, done, fn)` calls `fn` unless its output `done` exists, and keeps each
    step's wall time in `path` (JSON), across a killed and resumed run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name: str, done: Path, fn: Callable[[], object]) -> None:
        if not done.exists():
            t0 = time.perf_counter()
            fn()
            self.seconds[name] = round(time.perf_counter() - t0, 1)
            self.path.write_text(json.dumps(self.seconds, indent=2))
