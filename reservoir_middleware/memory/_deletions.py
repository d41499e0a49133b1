"""Deletion records: what a delete promises to every process on a data directory.

`<data_dir>/deletions.jsonl` (0600) holds one JSON line per delete,
`{"id", "time", "partition", "instance"}` (`instance` null: the whole
partition; with `"messages": [ids]`, only those messages of the scope:
`Reservoir.forget` and retention), appended and fsynced before the store forgets the scope. An
exchange that began before a delete of its scope is never stored after it:
every write checks these records under the scope's write lock (the lock the
delete holds while the store forgets the scope), a replay drops the journal
entries they cover, and each process purges its own journal file when it
learns of one. No process rewrites a file another live process owns.

Times are wall-clock seconds (the processes of one machine share the clock),
made monotonic within a process. Records are kept as long as a journal file
or an exchange in flight may be older (`KEEP_S`), then compacted away.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reservoir_middleware._private import private_dir, private_open
from reservoir_middleware.records import Scope, chained_id

FILE_NAME = "deletions.jsonl"
KEEP_S = 24 * 3600.0  # the longest an exchange may be in flight before it is journalled
COMPACT_BYTES = 256 * 1024  # the file is compacted when it grows past this
_CREATED = re.compile(r"-t(\d+)-[0-9a-f]+\.jsonl$")  # a journal file's creation time, in ms

_clock_lock = threading.Lock()
_last = 0.0


def now() -> float:
    """Wall-clock time that never goes back within this process: an exchange that
    begins after a delete here always has a later time than the delete."""
    global _last
    with _clock_lock:
        _last = max(time.time(), _last + 1e-6)
        return _last


@dataclass(frozen=True)
class Deletion:
    id: str
    time: float
    partition: str
    instance: str | None  # None: every instance of the partition
    messages: tuple[str, ...] = ()  # only these messages of the scope (none: all of it)


def entry_began(payload: Mapping[str, Any]) -> float:
    """When a journalled exchange began: its `began`, or (written by an older
    version) its earliest message's timestamp; 0 (covered by any delete) if neither."""
    began = payload.get("began")
    if isinstance(began, int | float) and math.isfinite(began):
        return float(began)
    records = payload.get("records")
    candidates = [*(records if isinstance(records, list) else []), payload.get("answer")]
    times = [r.get("timestamp") for r in candidates if isinstance(r, dict)]
    found = [float(t) for t in times if isinstance(t, int | float) and math.isfinite(t)]
    return min(found) if found else 0.0


class Deletions:
    """The deletion records of one data directory, as this process knows them."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / FILE_NAME
        self._lock = threading.Lock()
        self._scopes: dict[tuple[str, str], float] = {}
        self._partitions: dict[str, float] = {}
        self._messages: dict[tuple[str, str], dict[str, float]] = {}  # scope -> id -> time
        self._seen: tuple[int, int] = (-1, 0)  # (inode, bytes read) of the file

    def latest(self, partition: str, instance: str) -> float:
        """The time of the newest delete covering the scope (-1 if none)."""
        return max(
            self._scopes.get((partition, instance), -1.0), self._partitions.get(partition, -1.0)
        )

    def covers(self, partition: str, instance: str, began: float) -> bool:
        """An exchange of the scope that began then was deleted."""
        return began <= self.latest(partition, instance)

    def forgotten(self, partition: str, instance: str, began: float) -> frozenset[str]:
        """The messages of the scope forgotten after an exchange that began then:
        that exchange must not store them again."""
        with self._lock:
            times = self._messages.get((partition, instance), {})
            return frozenset(id_ for id_, at in times.items() if at >= began)

    def covers_entry(self, payload: Mapping[str, Any]) -> bool:
        """A journal entry (or any exchange as `exchange_data` keeps it) was deleted,
        or holds a message forgotten since (its exchange was stored, or it would
        have no id to be forgotten by: the entry goes, with the text)."""
        scope = payload.get("scope")
        if not isinstance(scope, list) or len(scope) != 2:
            return False
        partition, instance, began = str(scope[0]), str(scope[1]), entry_began(payload)
        if self.covers(partition, instance, began):
            return True
        gone = self.forgotten(partition, instance, began)
        return bool(gone) and not gone.isdisjoint(entry_ids(payload))

    def record(
        self, partition: str, instance: str | None, messages: Iterable[str] = ()
    ) -> Deletion:
        """Make a delete (of `messages` only, if given) durable (appended and
        fsynced); raises OSError."""
        deletion = Deletion(uuid.uuid4().hex, now(), partition, instance, tuple(messages))
        payload: dict[str, Any] = {
            "id": deletion.id,
            "time": deletion.time,
            "partition": partition,
            "instance": instance,
        }
        if deletion.messages:
            payload["messages"] = list(deletion.messages)
        line = (json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")
        private_dir(self.path.parent)
        fd = self._locked()
        try:
            os.write(fd, line)
            os.fsync(fd)
            large = os.fstat(fd).st_size > COMPACT_BYTES
        finally:
            os.close(fd)  # (and its lock)
        self._learn([deletion])
        if large:
            self.compact()
        return deletion

    def refresh(self) -> list[Deletion]:
        """Read what other processes recorded since the last call (one `stat`
        when nothing changed); returns the deletes this process learned of."""
        try:
            st = os.stat(self.path)
        except OSError:
            return []
        with self._lock:
            inode, offset = self._seen
            if st.st_ino == inode and st.st_size == offset:
                return []
            try:
                with self.path.open("rb") as stream:
                    inode_now = os.fstat(stream.fileno()).st_ino
                    if inode_now != inode:  # new, or compacted: read it all again
                        offset = 0
                    stream.seek(offset)
                    data = stream.read()
            except OSError:
                return []
            end = data.rfind(b"\n") + 1  # a line being written is read next time
            self._seen = (inode_now, offset + end)
        return self._learn(_parse(data[:end].splitlines()))

    def compact(self, journal_dir: Path | None = None) -> None:
        """Drop records no journal file or exchange in flight can be older than."""
        cutoff = now()
        directory = journal_dir or self.path.parent / "journal"
        with contextlib.suppress(OSError):
            for path in directory.glob("*.jsonl"):
                created = _CREATED.search(path.name)
                cutoff = min(cutoff, int(created.group(1)) / 1000 if created else 0.0)
        cutoff -= KEEP_S
        fd = self._locked()
        try:
            raw = b""
            while chunk := os.read(fd, 1 << 20):
                raw += chunk
            kept = [
                line
                for line, deletion in zip(raw.splitlines(keepends=True), _each(raw), strict=True)
                if deletion is None or deletion.time >= cutoff
            ]
            if len(kept) == len(raw.splitlines()):
                return
            tmp = self.path.with_name(f".{FILE_NAME}.{uuid.uuid4().hex[:8]}.tmp")
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(out, b"".join(kept))
                os.fsync(out)
            finally:
                os.close(out)
            os.replace(tmp, self.path)  # appenders wait for our lock, then see the new file
        finally:
            os.close(fd)

    def _locked(self) -> int:
        """The file, opened and locked; the one at the path (not one compacted away)."""
        while True:
            fd = private_open(self.path, os.O_RDWR | os.O_APPEND)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except OSError:
                pass
            os.close(fd)

    def _learn(self, deletions: Iterable[Deletion]) -> list[Deletion]:
        learned = []
        with self._lock:
            for deletion in deletions:
                if deletion.messages:
                    if deletion.instance is not None:
                        times = self._messages.setdefault(
                            (deletion.partition, deletion.instance), {}
                        )
                        fresh = [i for i in deletion.messages if times.get(i, -1.0) < deletion.time]
                        times.update((i, deletion.time) for i in fresh)
                        if fresh:
                            learned.append(deletion)
                    continue
                if deletion.instance is None:
                    table: dict[Any, float] = self._partitions
                    key: Any = deletion.partition
                else:
                    table, key = self._scopes, (deletion.partition, deletion.instance)
                if deletion.time > table.get(key, -1.0):
                    table[key] = deletion.time
                    learned.append(deletion)
        return learned


def entry_ids(payload: Mapping[str, Any]) -> set[str]:
    """The ids of the messages a journalled exchange holds (its answer's too, once set)."""
    records = [r for r in payload.get("records") or () if isinstance(r, dict)]
    ids = {str(r["id"]) for r in records if r.get("id")}
    answer, scope = payload.get("answer"), payload.get("scope")
    if isinstance(answer, dict) and records and isinstance(scope, list) and len(scope) == 2:
        with contextlib.suppress(TypeError, ValueError):  # its id is made when it is written
            text, calls, prev = answer.get("text") or "", answer.get("tool_calls"), records[-1]
            at = Scope(str(scope[0]), str(scope[1]))
            ids.add(chained_id(at, "assistant", str(text), calls, str(prev.get("id") or "")))
    return ids


def _each(raw: bytes) -> list[Deletion | None]:
    return [next(iter(_parse([line])), None) for line in raw.splitlines()]


def _parse(lines: Iterable[bytes]) -> list[Deletion]:
    found = []
    for line in lines:
        try:
            payload = json.loads(line.decode("utf-8", "surrogatepass"))
            instance = payload.get("instance")
            messages = payload.get("messages") or ()
            found.append(
                Deletion(
                    str(payload["id"]),
                    float(payload["time"]),
                    str(payload["partition"]),
                    None if instance is None else str(instance),
                    tuple(str(m) for m in messages),
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # not a record: ignored (a torn line is completed or not at all)
    return found
