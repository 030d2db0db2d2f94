"""Give freed heap memory back to the system between the phases of a long streamed job.

glibc keeps freed memory inside its heaps, and after every large free it raises the size above
which buffers are mapped on their own, so the band-sized buffers of a streamed job (tiling, the
condition canvas, the sampler's sweeps, decoding) come from the heap, fragment it and stay
resident: a `predict` of a large slide ends holding several times what any one band needs.
`malloc_trim(0)` returns every free page of every heap (not only the top) to the system. It does
not change how anything is allocated, so hot loops run as fast as before; it is called where a
phase or a band ends. Elsewhere than glibc it does nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache


@lru_cache(maxsize=1)
def _trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the heaps' free pages to the system; True where glibc did (it says whether any were)."""
    trim = _trim()
    return bool(trim(0)) if trim is not None else False
