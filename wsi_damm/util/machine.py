"""What a measured time depends on, recorded beside it: cores, the widest x86 vector extension (the models run about
2.5× slower without AVX-512), the CPU's model (FFT and BLAS kernels, and so their last bits, differ between CPUs),
torch and the architecture."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict:
    import torch

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    flags = set(info.split())
    simd = next((f for f in ("avx512f", "avx2") if f in flags), "other")
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.processor())
    return {"cores": os.cpu_count(), "simd": simd, "cpu": model or "unknown", "torch": torch.__version__, "machine": platform.machine()}
