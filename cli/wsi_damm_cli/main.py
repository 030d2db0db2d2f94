"""`wsi-damm`: the command group with every command registered (one module per command group). Parsing
only; the work is in `wsi_damm`."""

from __future__ import annotations

import sys

from . import maps, prediction, slides, training, workflows  # noqa: F401 (each registers its commands on `cli`)
from .group import cli

__all__ = ["cli"]


def main() -> None:  # pragma: no cover - console entry for `python -m`
    cli(prog_name="wsi-damm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
