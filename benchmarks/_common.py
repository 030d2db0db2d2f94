"""Helpers the benchmark scripts share: each side runs in a fresh subprocess with its own peak RSS."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's peak across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(script: str, *args: str) -> dict:
    """Run `script --worker args…` and return the JSON object its last line prints."""
    res = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import torch

    return {"cores": os.cpu_count(), "torch": torch.__version__, "machine": platform.machine()}
