"""How the NP (target) channel is normalised, so that maps of different slides can be compared.

`slide` (the default, the paper's rule): each slide's own 0.5–99.8th percentiles over tissue map to
[0, 1]. Maps then show where NP went *within* a slide, but a tumour that took up twice as much looks
the same as one that took up half. `fixed`: one raw intensity range for every slide (`--np-range
LO,HI`, e.g. the camera counts of an unloaded and a saturated region). `reference`: the range is
measured once, on a reference slide (the same percentiles over its tissue), and then held fixed.
With `fixed` and `reference` a map value v stands for the measured intensity low + v·(high − low):
the inverse transform is written into the map, and maps can be written in measured units.
Values above `high` clip at 1, so the range must cover the brightest slide compared."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from wsi_damm.util.errors import InputError

NP_NORMS = ("slide", "fixed", "reference")
MEASURED_UNIT = "measured NP intensity (the slide's stored values)"


@dataclass(frozen=True)
class NpScale:
    mode: str = "slide"
    low: float | None = None  # raw NP intensity that maps to 0 (fixed, reference)
    high: float | None = None  # … to 1
    reference: str | None = None  # the slide the range was measured on (reference)

    def validate(self) -> NpScale:
        if self.mode not in NP_NORMS:
            raise InputError("--np-norm", f"must be {', '.join(NP_NORMS)}, got {self.mode!r}")
        if self.mode == "slide":
            if self.low is not None or self.high is not None:
                raise InputError("--np-range", "only applies with --np-norm fixed")
            return self
        if self.low is None or self.high is None or not np.isfinite([self.low, self.high]).all() or not self.high > self.low:
            raise InputError("--np-range", f"needs two finite numbers LO,HI with LO < HI, got {self.low}, {self.high}")
        if self.mode == "reference" and not self.reference:
            raise InputError("--np-reference", "name the reference slide")
        return self

    @property
    def comparable(self) -> bool:
        """Do map values mean the same intensity on every slide?"""
        return self.mode != "slide"

    @property
    def range(self) -> tuple[float, float] | None:
        return (float(self.low), float(self.high)) if self.comparable else None

    def to_measured(self, values: np.ndarray) -> np.ndarray:
        if not self.comparable:
            raise InputError(
                "--units",
                "the map's NP was normalised per slide, so its values have no common unit",
                "tile the training slides with --np-norm fixed or reference",
            )
        return values * (self.high - self.low) + self.low

    def inverse_transform(self) -> dict | None:
        """Written into a map's attributes: measured = scale · value + offset."""
        if not self.comparable:
            return None
        return {"scale": float(self.high - self.low), "offset": float(self.low), "unit": MEASURED_UNIT}

    def attrs(self) -> dict:
        return asdict(self)

    @classmethod
    def from_attrs(cls, data: dict | None) -> NpScale:
        return cls(**data) if data else cls()


def parse_range(text: str | tuple | list | None) -> tuple[float, float] | None:
    """`--np-range LO,HI` (or a pair) → floats."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        low, high = (float(p) for p in parts)
    except (TypeError, ValueError) as exc:
        raise InputError("--np-range", f"expected LO,HI (two numbers), got {text!r}") from exc
    return low, high


def np_scale(
    mode: str = "slide", np_range=None, reference_range: tuple[float, float] | None = None, reference: str | None = None
) -> NpScale:
    """The NpScale the tile options ask for; `reference_range` is the reference slide's measured range."""
    if mode == "reference":
        if reference_range is None:
            raise InputError("--np-reference", "--np-norm reference needs the reference slide (--np-reference SLIDE)")
        return NpScale("reference", *reference_range, reference=reference).validate()
    rng = parse_range(np_range)
    if mode == "fixed" and rng is None:
        raise InputError("--np-range", "--np-norm fixed needs the range: --np-range LO,HI (raw intensities)")
    return NpScale(mode, *(rng or (None, None))).validate()
