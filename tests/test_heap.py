"""release_free_memory gives the pages that freed heap blocks hold back to the system (glibc); while a model
trains, freed memory is reused instead of mapped afresh, and no number changes."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_damm.models.regression import RegressionUNet
from wsi_damm.util.heap import release_free_memory, reusing_freed_memory


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


GLIBC = platform.system() == "Linux" and platform.libc_ver()[0].startswith("glibc")


def _training_faults(model: torch.nn.Module, steps: int) -> int:
    """Minor page faults of `steps` training steps of the regression U-Net at batch 16, 128² px: several of
    its activations are over 32 MB, the most glibc serves from its heaps by default."""
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x, y = torch.randn(16, 2, 128, 128), torch.randn(16, 1, 128, 128)
    before, warmup = 0, 4
    for step in range(steps + warmup):
        if step == warmup:  # after the first steps, which grow the heap (where its free blocks lie varies from run to run)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        opt.zero_grad(set_to_none=True)
        (model(x) - y).abs().mean().backward()
        opt.step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _reuse_figures() -> dict:
    """Faults of training steps inside and outside `reusing_freed_memory`, and RSS before and after leaving it."""
    torch.manual_seed(0)
    model = RegressionUNet(2)
    with reusing_freed_memory() as applied:
        reused = _training_faults(model, 3)
        held = _rss_mb()
    after = _rss_mb()
    mapped = _training_faults(model, 3)  # outside: the large blocks are mapped and faulted in afresh every step
    return {"applied": applied, "reused": reused, "held": held, "after": after, "mapped": mapped}


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_training_reuses_freed_memory_and_gives_it_back_afterwards():
    # in a fresh interpreter: a test worker's heap, fragmented by earlier tests, decides how many pages a step faults in
    code = "import json; from tests.test_heap import _reuse_figures; print(json.dumps(_reuse_figures()))"
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    f = json.loads(res.stdout.splitlines()[-1])
    assert f["applied"]
    assert f["mapped"] > 3 * 20000, f  # > 80 MB of 4-KiB pages a step, over three steps
    assert f["reused"] < f["mapped"] / 10, f  # an order of magnitude fewer
    assert f["held"] - f["after"] > 100, f  # what was kept for reuse went back at the end


def test_where_memory_comes_from_changes_no_number():
    def trained() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = RegressionUNet(2)
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        x = torch.randn(4, 2, 64, 64)
        for _ in range(3):
            opt.zero_grad()
            model(x).abs().mean().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    plain = trained()
    with reusing_freed_memory():
        reusing = trained()
    assert all(torch.equal(a, b) for a, b in zip(plain, reusing))
