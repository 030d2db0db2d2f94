"""What training reads from a patch store: the slide-level split, deterministic batches, and a torch
`Dataset` for users who bring their own training loop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from wsi_damm.tiling.store import PatchStore, read_rows, to_model_range
from wsi_damm.util.errors import InputError

if TYPE_CHECKING:
    from wsi_damm.training.config import TrainConfig

IN_MEMORY_LIMIT = 4 * 2**30  # decode the whole store into RAM below this many raw bytes


VAL_SPLITS = ("auto", "slides", "region")


@dataclass(frozen=True)
class ValidationSplit:
    train: np.ndarray  # patch indices
    val: np.ndarray
    kind: str  # "slides", "region" or "none"
    description: str  # one line for config readers and loss.png
    cuts: dict = field(default_factory=dict)  # region split: slide id → (axis, first validation pixel)


def split_validation(store: PatchStore, val_fraction: float, val_slides: tuple[str, ...], seed: int, how: str = "auto") -> ValidationSplit:
    """Train / validation patch indices. By slide (a slide's patches are never on both sides) when the
    store holds several; from one slide ("auto" with a single slide, or "region"), the last `val_fraction`
    of each slide along its longer side is held out, and patches that would overlap both sides are left
    out of both — no validation pixel is ever seen in training."""
    if how not in VAL_SPLITS:
        raise InputError("--val-split", f"must be one of {', '.join(VAL_SPLITS)}, got {how!r}")
    ids = [s["slide_id"] for s in store.slides]
    slide_of = store.coords[:, 0]
    if val_fraction <= 0 and not val_slides:
        return _checked(store, np.arange(len(slide_of)), np.zeros(0, np.int64), "none", "no validation (val_fraction = 0)")
    if val_slides or (how == "slides") or (how == "auto" and len(ids) > 1):
        if val_slides:
            unknown = sorted(set(val_slides) - set(ids))
            if unknown:
                raise InputError("--val-slides", f"not in the store: {', '.join(unknown)}; slides are {', '.join(ids)}")
            val = [ids.index(v) for v in val_slides]
        elif len(ids) < 2:
            raise InputError(store.path, "holds one slide: a validation split by slide is impossible", "use --val-split region")
        else:
            order = np.random.default_rng(seed).permutation(len(ids))
            val = sorted(order[: max(1, min(len(ids) - 1, math.ceil(val_fraction * len(ids))))].tolist())
        is_val = np.isin(slide_of, val)
        return _checked(
            store, np.nonzero(~is_val)[0], np.nonzero(is_val)[0], "slides", f"validation slides: {', '.join(ids[v] for v in val)}"
        )
    return _region_split(store, val_fraction)


def split_of(store: PatchStore, train: TrainConfig) -> ValidationSplit:
    """The split a run's training settings ask for: one call, so every model trained from a run's
    settings (DAMM, the regression U-Net) learns from the same patches."""
    return split_validation(store, train.val_fraction, tuple(train.val_slides), train.seed, train.val_split)


def _region_split(store: PatchStore, fraction: float) -> ValidationSplit:
    coords, patch = store.coords, int(store.attrs["patch_size"])
    is_train = np.zeros(len(coords), bool)
    is_val = np.zeros(len(coords), bool)
    cuts, parts = {}, []
    for k, entry in enumerate(store.slides):  # a few slides: one block each
        rows = np.nonzero(coords[:, 0] == k)[0]
        if not len(rows):
            continue
        ys, xs = coords[rows, 1], coords[rows, 2]
        axis, origin = ("x", xs) if np.ptp(xs) >= np.ptp(ys) else ("y", ys)
        values = np.unique(origin)
        before = np.searchsorted(np.sort(origin), values, side="left")  # patches before each candidate cut
        cut = int(values[1:][np.argmin(np.abs(before[1:] - (1 - fraction) * len(origin)))]) if len(values) > 1 else int(values[0])
        is_val[rows[origin >= cut]] = True
        is_train[rows[origin + patch <= cut]] = True
        cuts[entry["slide_id"]] = (axis, cut)
        parts.append(f"{entry['slide_id']} {axis} ≥ {cut} px")
    dropped = int(len(coords) - is_train.sum() - is_val.sum())
    description = f"validation region: {', '.join(parts)} ({is_val.sum()} patches; {dropped} patches on the boundary left out of both)"
    return _checked(store, np.nonzero(is_train)[0], np.nonzero(is_val)[0], "region", description, cuts)


def _checked(
    store: PatchStore, train: np.ndarray, val: np.ndarray, kind: str, description: str, cuts: dict | None = None
) -> ValidationSplit:
    if len(train) == 0:
        raise InputError(store.path, "no training patches left after the validation split")
    return ValidationSplit(train, val, kind, description, cuts or {})


class PatchImages:
    """Patches of chosen indices as float tensors in [-1, 1], (n, C, P, P); held in RAM when small."""

    def __init__(self, store: PatchStore, indices: np.ndarray) -> None:
        self.store, self.indices = store, np.asarray(indices)
        nbytes = len(indices) * int(np.prod(store.images.shape[1:])) * store.images.dtype.itemsize
        self._ram = read_rows(store.images, self.indices) if nbytes <= IN_MEMORY_LIMIT else None

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, rows: np.ndarray) -> torch.Tensor:
        """Rows are positions into `indices`."""
        if self._ram is not None:
            raw = self._ram[rows]
        else:
            raw = read_rows(self.store.images, self.indices[rows])
        return to_model_range(raw)

    def context(self, rows: np.ndarray, span: int) -> np.ndarray:
        """The context windows of the same rows (`PatchStore.context_windows`), in [0, 1]."""
        return self.store.context_windows(self.indices[rows], span)


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A generator that depends only on (seed, step, stream): resume needs no RNG state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 31 + stream)


def batch_rows(n: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Rows of the global batch for `step`: epoch-wise permutations, last partial batch dropped."""
    per_epoch = max(1, n // global_batch)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=step_generator(seed, epoch, 7)).numpy()
    if n < global_batch:  # tiny stores: repeat the permutation to fill a batch
        perm = np.resize(perm, global_batch)
    return perm[pos * global_batch : (pos + 1) * global_batch]


class PatchDataset(torch.utils.data.Dataset):
    """A patch store as a torch Dataset: item i → {role: float tensor (1, P, P) in [-1, 1], "index": i}.

    For your own training loop (`torch.utils.data.DataLoader(PatchDataset("STORE.zarr"), …)`).
    `in_memory=True` decodes the whole store once (use when it fits); otherwise each item
    decodes one chunk, which is one patch.
    """

    def __init__(self, store: PatchStore | str | Path, indices: np.ndarray | None = None, in_memory: bool = False):
        self.store = store if isinstance(store, PatchStore) else PatchStore.open(store)
        self.roles = self.store.roles
        self.indices = np.arange(len(self.store)) if indices is None else np.asarray(indices)
        self._cache = read_rows(self.store.images, self.indices) if in_memory else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        raw = self._cache[i] if self._cache is not None else read_rows(self.store.images, self.indices[i : i + 1])[0]
        x = to_model_range(raw)
        item = {role: x[k : k + 1] for k, role in enumerate(self.roles)}
        item["index"] = int(self.indices[i])
        return item
