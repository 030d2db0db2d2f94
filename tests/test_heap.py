"""release_free_memory gives the pages that freed heap blocks hold back to the system (glibc)."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest

from wsi_damm.heap import release_free_memory


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0].startswith("glibc"), reason="glibc's malloc_trim")
def test_freed_heap_blocks_are_given_back():
    # 64 KiB blocks come from the heap, not from their own mappings; the last one stays alive, so the
    # heap's top is pinned and glibc's automatic trim (top only) cannot return what lies below it
    blocks = [np.ones(8192) for _ in range(3000)]  # ≈ 190 MB
    keep = blocks[-1]
    del blocks
    before = _rss_mb()
    assert release_free_memory() is True
    after = _rss_mb()
    assert before - after > 120, (before, after)
    assert keep.sum() == 8192
