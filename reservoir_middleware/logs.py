"""Failure logging that does not flood: each distinct failure once per minute.

A dead Chroma server fails every request the same way; the first occurrence
is logged with its traceback, the repeats are counted and summarised.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger("reservoir")

INTERVAL_SECONDS = 60.0


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
        logger.log(level, "%s: %r%s", message, error, suffix, exc_info=error)


log_failure = _Throttle().failure
