"""Nothing on any load path can run code: no unpickling outside `weights_only=True`."""

from __future__ import annotations

import re
from pathlib import Path


def test_no_unsafe_deserialisation_in_the_package():
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in list((root / "wsi_damm").rglob("*.py")) + list((root / "cli").rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"pickle\.loads?\(|torch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders, offenders
