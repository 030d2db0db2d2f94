"""Give freed heap memory back to the system between the phases of a long streamed job, and keep it
for reuse while a model trains.

glibc keeps freed memory inside its heaps, and after every large free it raises the size above
which buffers are mapped on their own, so the band-sized buffers of a streamed job (tiling, the
condition canvas, the sampler's sweeps, decoding) come from the heap, fragment it and stay
resident: a `predict` of a large slide ends holding several times what any one band needs.
`malloc_trim(0)` returns every free page of every heap (not only the top) to the system. It does
not change how anything is allocated, so hot loops run as fast as before; it is called where a
phase or a band ends.

Training is the opposite case: every step frees and allocates again the same activations, several
of them larger than the most glibc will serve from its heaps (32 MB), so each step maps fresh pages,
faults them in one by one (zeroed by the kernel) and unmaps them again. `reusing_freed_memory()`
serves everything from the heap and keeps what is freed there while a model trains. Elsewhere than
glibc both do nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

# mallopt(3) parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
# where glibc's own dynamic thresholds settle once large blocks have been freed (64-bit): blocks up
# to 32 MB from the heap, the heap's top trimmed when 64 MB of it is free
SETTLED = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}
KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}  # nothing mapped on its own, the heap's top never trimmed


@lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def _trim():
    libc = _libc()
    return libc.malloc_trim if libc is not None else None


def _set(params: dict[int, int]) -> bool:
    libc = _libc()
    return libc is not None and all(libc.mallopt(k, v) == 1 for k, v in params.items())


@contextmanager
def reusing_freed_memory() -> Iterator[bool]:
    """While the block runs, every allocation comes from the heap and freed memory stays there for the
    next step (`benchmarks/bench_heap.py` measures the training steps with and without). Afterwards the
    heap's free pages go back to the system and glibc's thresholds are set where its own adjustment
    leaves a long process, for streamed work after it in the same process (a demo's `predict`).
    Yields whether the settings took (False elsewhere than glibc). No number changes: only where
    memory comes from."""
    applied = _set(KEEP)
    try:
        yield applied
    finally:
        if applied:
            _set(SETTLED)
            release_free_memory()


def release_free_memory() -> bool:
    """Return the heaps' free pages to the system; True where glibc did (it says whether any were)."""
    trim = _trim()
    return bool(trim(0)) if trim is not None else False
