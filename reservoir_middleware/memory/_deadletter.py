"""Exchanges set aside: writes that keep failing for a reason other than the store.

One exchange the store will never take (content it rejects, a bug) must not
stop its scope: after a few attempts its job is written here, one JSON line
per exchange (mode 0600, beside the journal), and the scope's later
exchanges are stored. The file is for the operator: `reservoir stats`
counts it; each line has the exchange's trace id, scope, records and error.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reservoir_middleware.memory._deletions import entry_ids, now

FILE_NAME = "dead-letter.jsonl"
DELETED_KEPT = 10_000  # deleted scopes remembered, so that a job set aside late is dropped


class DeadLetters:
    """The dead-letter file of one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / FILE_NAME
        self._lock = threading.Lock()
        # (partition, instance or None for all) -> when it was last deleted (`deletions.now`)
        self._deleted: dict[tuple[str, str | None], float] = {}

    def add(
        self, data: dict[str, Any], error: BaseException, attempts: int, since: float = 0.0
    ) -> bool:
        """Append one exchange, unless its scope was deleted after `since` (the
        job's `began`, a `deletions.now()` time): then False. Raises OSError if
        it cannot be written."""
        payload = {
            **data,
            "error": f"{type(error).__name__}: {error}"[:2000],
            "attempts": attempts,
            "set_aside_at": time.time(),
        }
        line = (json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        partition, instance = (data.get("scope") or ["", ""])[:2]
        with self._lock:  # a delete purges under it: a line is dropped either way
            for key in ((partition, instance), (partition, None)):
                if self._deleted.get(key, -1.0) >= since:
                    return False
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return True

    def count(self) -> int:
        """How many exchanges were set aside (0 without a file)."""
        try:
            with self.path.open("rb") as file:
                return sum(1 for line in file if line.strip())
        except OSError:
            return 0

    def purge_messages(self, ids: set[str]) -> None:
        """Drop the exchanges holding any of these (forgotten) messages; the file is rewritten."""
        with self._lock:
            self._rewrite(lambda data: not ids.isdisjoint(entry_ids(data)))

    def purge(self, partition: str, instance: str | None = None) -> None:
        """Drop the lines of a deleted scope (or partition); the file is rewritten.
        An exchange of it set aside later, but queued before, is not written."""
        with self._lock:
            self._deleted.pop((partition, instance), None)
            self._deleted[(partition, instance)] = now()
            while len(self._deleted) > DELETED_KEPT:
                del self._deleted[next(iter(self._deleted))]

            def covered(data: dict[str, Any]) -> bool:
                scope = data.get("scope") or ["", ""]
                return bool(scope[0] == partition and instance in (None, scope[1]))

            self._rewrite(covered)

    def _rewrite(self, drop: Callable[[dict[str, Any]], bool]) -> None:
        """The file without the lines `drop` selects (under the lock)."""
        try:
            lines = self.path.read_bytes().splitlines(keepends=True)
        except OSError:
            return
        kept = []
        for line in lines:
            with contextlib.suppress(ValueError, AttributeError, TypeError, IndexError):
                if drop(json.loads(line)):
                    continue
            kept.append(line)
        if len(kept) == len(lines):
            return
        temporary = self.path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"".join(kept))
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
