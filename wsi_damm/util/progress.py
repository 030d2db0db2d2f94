"""Progress for long work that stays visible where no terminal is: a tqdm bar on a terminal (or in a
notebook); elsewhere — a SLURM log, `nohup`, a pipe — a plain line through `logging` every
`WSI_DAMM_PROGRESS_SECONDS` (default 30) seconds and at the end: done / total, rate, ETA."""

from __future__ import annotations

import logging
import math
import os
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("wsi_damm.util.progress")


def _every() -> float:
    try:
        return max(0.0, float(os.environ.get("WSI_DAMM_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


class LineProgress(tqdm):
    """tqdm whose display is a log line at most every `_every()` seconds, and one when it closes."""

    def __init__(self, *args, **kwargs):
        self._every, self._last = _every(), -math.inf
        kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115 - tqdm's own drawing goes nowhere; lines go to the log
        kwargs.setdefault("mininterval", min(1.0, self._every))
        super().__init__(*args, **kwargs)

    def line(self) -> str:
        d = self.format_dict
        n, total, rate = d["n"], d["total"], d["rate"] or (d["n"] / d["elapsed"] if d["elapsed"] else None)
        unit = d.get("unit") or "it"
        text = f"{self.desc or 'progress'}: {n:g}" + (f"/{total:g} {unit} ({100 * n / total:.0f} %)" if total else f" {unit}")
        if rate:
            text += f", {rate:.3g} {unit}/s"
            if total and n < total:
                text += f", ETA {tqdm.format_interval((total - n) / rate)}"
        return text + f", elapsed {tqdm.format_interval(d['elapsed'])}"

    def display(self, msg=None, pos=None):
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            log.info(self.line())
        return True

    def close(self):
        if not self.disable and self._last != math.inf:
            log.info(self.line())
            self._last = math.inf
        file = self.fp
        super().close()
        file.close()


def _terminal() -> bool:
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress_bar(*args, disable: bool | None = None, **kwargs) -> tqdm:
    """Drop-in for `tqdm(…)`: `disable=True` shows nothing; otherwise a bar on a terminal and log lines
    elsewhere (where tqdm would show nothing at all)."""
    if disable is True:
        return tqdm(*args, disable=True, **kwargs)
    if _terminal():
        return tqdm(*args, **kwargs)
    return LineProgress(*args, **kwargs)
