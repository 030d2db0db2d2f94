"""How long a resumable job has run, over every leg: a killed and resumed study reports the time
all its legs spent, not only the last one's."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from wsi_damm.util.files import write_json


class RunningTime:
    """Earlier legs are read from `path`; this leg's seconds are written there at every `tick()`, so a
    kill loses at most the time since the last tick (work that a resume does again, and counts again)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.perf_counter) -> None:
        self.path, self._clock = Path(path), clock
        earlier = json.loads(self.path.read_text(encoding="utf-8"))["legs"] if self.path.exists() else []
        self.legs = [*earlier, {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": 0.0}]
        self._t0 = clock()

    @property
    def seconds(self) -> float:
        return round(sum(leg["seconds"] for leg in self.legs), 1)

    def tick(self) -> float:
        """Record this leg's time so far; returns the total over every leg."""
        self.legs[-1]["seconds"] = round(self._clock() - self._t0, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"seconds": self.seconds, "legs": self.legs})
        return self.seconds
