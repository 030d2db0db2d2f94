"""What training reads from a patch store: the slide-level split, deterministic batches, and a torch
`Dataset` for users who bring their own training loop."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .store import PatchStore, read_rows, to_model_range

IN_MEMORY_LIMIT = 4 * 2**30  # decode the whole store into RAM below this many raw bytes


def split_by_slide(store: PatchStore, val_fraction: float, val_slides: tuple[str, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation patch indices; a slide's patches are never on both sides."""
    ids = [s["slide_id"] for s in store.slides]
    slide_of = store.coords[:, 0]
    if val_slides:
        unknown = sorted(set(val_slides) - set(ids))
        if unknown:
            raise InputError("--val-slides", f"not in the store: {', '.join(unknown)}; slides are {', '.join(ids)}")
        val = [ids.index(v) for v in val_slides]
    elif len(ids) < 2 or val_fraction <= 0:
        if val_fraction > 0:
            warnings.warn("the store holds one slide: no slide-level validation split is possible", stacklevel=2)
        val = []
    else:
        order = np.random.default_rng(seed).permutation(len(ids))
        val = sorted(order[: max(1, min(len(ids) - 1, math.ceil(val_fraction * len(ids))))].tolist())
    is_val = np.isin(slide_of, val)
    train_idx, val_idx = np.nonzero(~is_val)[0], np.nonzero(is_val)[0]
    if len(train_idx) == 0:
        raise InputError(store.path, "no training patches left after the validation split")
    return train_idx, val_idx


class PatchImages:
    """Patches of chosen indices as float tensors in [-1, 1], (n, C, P, P); held in RAM when small."""

    def __init__(self, store: PatchStore, indices: np.ndarray) -> None:
        self.store, self.indices = store, np.asarray(indices)
        nbytes = len(indices) * int(np.prod(store.images.shape[1:])) * store.images.dtype.itemsize
        self._ram = np.asarray(store.images[:])[self.indices] if nbytes <= IN_MEMORY_LIMIT else None

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, rows: np.ndarray) -> torch.Tensor:
        """Rows are positions into `indices`."""
        if self._ram is not None:
            raw = self._ram[rows]
        else:
            raw = read_rows(self.store.images, self.indices[rows])
        return to_model_range(raw)


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
        self._cache = np.asarray(self.store.images[:])[self.indices] if in_memory else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        raw = self._cache[i] if self._cache is not None else np.asarray(self.store.images[int(self.indices[i])])
        x = to_model_range(raw)
        item = {role: x[k : k + 1] for k, role in enumerate(self.roles)}
        item["index"] = int(self.indices[i])
        return item
