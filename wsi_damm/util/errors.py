"""Errors a user can act on; the CLI turns them into one line and exit code 2."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input: names the offending file (or option) and what to do about it."""

    def __init__(self, source: str | Path | None, problem: str, hint: str = "") -> None:
        self.source = str(source) if source is not None else None
        self.problem = problem
        self.hint = hint
        super().__init__(self.one_line())

    def __reduce__(self):  # survive pickling across dask process workers
        return (type(self), (self.source, self.problem, self.hint))

    def one_line(self) -> str:
        text = f"{self.source}: {self.problem}" if self.source else self.problem
        text = " ".join(text.split())
        if self.hint:
            text += f" ({' '.join(self.hint.split())})"
        return text
