"""Give memory freed after a one-off load back to the system.

glibc keeps what a process frees for its next allocations, and a big load
(the embedding model's weights folded to float32, a token encoding read from
its file) frees tens of megabytes in the middle of the heap that an idle
server would carry for good. `malloc_trim` returns those pages; elsewhere
(musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any


@functools.cache
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None).malloc_trim  # glibc's; musl has none
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def trim() -> bool:
    """Return freed heap pages to the system (a few ms); whether anything could be done."""
    function = _malloc_trim()
    if function is None:
        return False
    function(0)
    return True
