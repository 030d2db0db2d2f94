"""Shared fixtures: synthetic slides made once per session, the shared real-file folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"


def run_cli(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run `wsi-damm …` in a subprocess exactly as a user would."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "wsi_damm_cli.main", *args], capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """Two 2048² synthetic slides (the size the tiling acceptance test names)."""
    out = tmp_path_factory.mktemp("synth")
    res = run_cli("synth", str(out), "--slides", "2", "--size", "2048", "--seed", "3", "--quiet")
    assert res.returncode == 0, res.stderr
    return out


def fixture(rel: str) -> Path:
    path = FIXTURES / rel
    if not path.exists():
        pytest.skip(f"shared fixture {rel} not available")
    return path
