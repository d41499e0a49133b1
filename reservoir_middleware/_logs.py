"""Failure logging that does not flood: each distinct failure once per minute.

A dead Chroma server fails every request the same way; the first occurrence
is logged with its traceback, the repeats are counted and summarised. A
failure names the trace id of the request (or write) it happened in, the one
the client got in `x-reservoir-trace-id`.
"""

from __future__ import annotations

import logging
import threading
import time
from contextvars import ContextVar

logger = logging.getLogger("reservoir")

INTERVAL_SECONDS = 60.0
# Set where a request's trace id is made (and by the writer, per batch); read here.
current_trace: ContextVar[str | None] = ContextVar("reservoir_trace_id", default=None)


class _Throttle:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}

    def failure(self, message: str, error: BaseException, *, level: int = logging.WARNING) -> None:
        key = f"{message}\x00{type(error).__name__}\x00{error}"
        now = time.monotonic()
        with self._lock:
            last, repeats = self._seen.get(key, (0.0, 0))
            if last and now - last < INTERVAL_SECONDS:
                self._seen[key] = (last, repeats + 1)
                return
            self._seen[key] = (now, 0)
            if len(self._seen) > 1000:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < INTERVAL_SECONDS}
        suffix = f" (and {repeats} more times in the last minute)" if repeats else ""
        trace = current_trace.get()
        prefix = f"[trace {trace}] " if trace else ""
        logger.log(level, "%s%s: %r%s", prefix, message, error, suffix, exc_info=error)


log_failure = _Throttle().failure
