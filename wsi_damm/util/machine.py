"""What a measured time depends on, recorded beside it: cores, the widest x86 vector extension (the models run about
2.5× slower without AVX-512), torch and the architecture."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict:
    import torch

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    simd = next((f for f in ("avx512f", "avx2") if f in flags), "other")
    return {"cores": os.cpu_count(), "simd": simd, "torch": torch.__version__, "machine": platform.machine()}
