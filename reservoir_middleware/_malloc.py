"""Give memory freed after a one-off load or a big batch back to the system.

glibc keeps what a process frees for its next allocations: a big load (the
embedding model's weights folded to float32, a token encoding read from its
file) or a batch of long texts through the model leaves tens to hundreds of
megabytes freed inside the heap that an idle server would carry for good.
`trim` returns those pages (`malloc_trim`). `return_large_blocks` makes every
block of 1 MiB or more its own mapping, given back as soon as it is freed:
glibc otherwise raises that threshold to the largest block freed so far, and
then keeps such blocks in its arenas (a batch of 8 long texts through the
model peaks 340 MB above idle instead of 150 and keeps 320 MB afterwards).
Elsewhere (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any

M_MMAP_THRESHOLD = -3  # mallopt parameters (malloc.h)
M_PERTURB = -6
FREED_BYTE = 0x5A  # what freed heap memory is overwritten with
LARGE_BLOCK = 1 << 20


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]  # glibc's; musl has neither
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


def trim() -> bool:
    """Return freed heap pages to the system (a few ms); whether anything could be done."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def return_large_blocks() -> bool:
    """From now on, blocks of 1 MiB and more go back to the system when freed
    (for the whole process: call it only in a process of ours)."""
    libc = _libc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK))


def wipe_freed_memory() -> bool:
    """From now on, heap memory is overwritten when freed (glibc's `M_PERTURB`).

    A C library that allocates without clearing and then writes its whole
    buffer to disk (hnswlib's unused link slots in `data_level0.bin`) would
    otherwise carry bytes of whatever the process freed before, such as a
    message just forgotten, into a file. For the Chroma child: every text it
    holds passes through its heap. Costs a memset per free."""
    libc = _libc()
    return libc is not None and bool(libc.mallopt(M_PERTURB, FREED_BYTE))
