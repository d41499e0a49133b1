"""An append-only file of exchanges answered but not yet in the store.

The middleware writes memory after the answer, in the background and in
batches. Before the last byte of an answer reaches the client, the exchange
is appended here (one `write`, no fsync: the kernel keeps it if the process
is killed); once the store has it, a `done` line follows. A process that
dies leaves its file behind, unlocked: the next process to start replays
what has no `done` line. Each process holds an exclusive `flock` on its own
file, so workers sharing a directory never replay each other's live files;
and only the holder of a file's lock ever rewrites it (a delete: `purge`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("reservoir")

ROTATE_BYTES = 4 * 1024 * 1024


@dataclass
class JournalEntry:
    """One exchange in one journal file."""

    id: str
    data: dict[str, Any]
    file: _JournalFile | None = None


class _JournalFile:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.outstanding = 0
        self.truncated = 0  # times emptied: a purge reading it meanwhile starts again

    def append(self, line: bytes) -> None:
        os.write(self.fd, line)
        self.size += len(line)

    def close(self, *, remove: bool) -> None:
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Journal:
    """This process's journal in `directory`, and the orphans of dead ones."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()  # short: `append` and `done` take it on the event loop
        self._current: _JournalFile | None = None
        self._owned: set[_JournalFile] = set()  # every file this process holds locked
        self._purging = threading.Lock()  # one purge at a time

    def append(self, data: dict[str, Any]) -> JournalEntry:
        """Record an exchange; raises OSError if the directory is not writable."""
        entry = JournalEntry(uuid.uuid4().hex, data)
        line = _line({"entry": entry.id, **data})
        with self._lock:
            current = self._open()
            current.append(line)
            current.outstanding += 1
            entry.file = current
        return entry

    def done(self, entry: JournalEntry) -> None:
        """The store has the entry: mark it, and drop files with nothing left."""
        file = entry.file
        if file is None:
            return
        entry.file = None
        with self._lock:
            file.outstanding -= 1
            if file is not self._current:
                if file.outstanding <= 0:
                    self._owned.discard(file)
                    file.close(remove=True)
                return
            if file.outstanding <= 0 and file.size > 64 * 1024:
                os.ftruncate(file.fd, 0)  # nothing left to replay: start afresh
                file.size = 0
                file.truncated += 1
            else:
                file.append(_line({"done": entry.id}))

    def _open(self) -> _JournalFile:
        current = self._current
        if current is not None and current.size < ROTATE_BYTES:
            return current
        if current is not None and current.outstanding <= 0:
            self._owned.discard(current)
            current.close(remove=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        # its creation time in the name: deletion records older than every file may go
        created = int(time.time() * 1000)
        name = f"{socket.gethostname()}-{os.getpid()}-t{created}-{uuid.uuid4().hex[:8]}.jsonl"
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._current = _JournalFile(path, fd)
        self._owned.add(self._current)
        return self._current

    def purge(self, drop: Callable[[dict[str, Any]], bool]) -> int:
        """Remove the selected entries from the files this process holds (its own,
        and orphans it replays). Each is rewritten into a new file, locked before
        it takes the old one's name; `append` and `done` wait only for that swap,
        never for the reading and writing. Files of other live processes are
        theirs to purge; orphans nobody holds: `purge_orphans`."""
        removed = 0
        with self._purging:
            with self._lock:
                files = sorted(self._owned, key=lambda f: str(f.path))
            for file in files:
                removed += self._purge_own(file, drop)
        return removed

    def _purge_own(self, file: _JournalFile, drop: Callable[[dict[str, Any]], bool]) -> int:
        with self._lock:
            if file not in self._owned:
                return 0
            size, truncated = file.size, file.truncated
        try:
            with file.path.open("rb") as stream:
                raw = stream.read(size)
        except OSError:
            return 0
        kept, dropped = _filter(raw, drop, set())
        if not dropped:
            return 0
        tmp = self.directory / f".{file.path.name}.{uuid.uuid4().hex[:8]}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours before it has the name
            os.write(fd, kept)
            os.fsync(fd)
            with self._lock:  # the swap: what was appended meanwhile follows, filtered
                if file not in self._owned:
                    raise OSError("closed meanwhile")
                if file.truncated != truncated:  # emptied meanwhile: what it holds now
                    os.ftruncate(fd, 0)
                    size = 0
                if file.size > size:
                    with file.path.open("rb") as stream:
                        stream.seek(size)
                        os.write(fd, _filter(stream.read(file.size - size), drop, dropped)[0])
                os.replace(tmp, file.path)
                fd, file.fd = file.fd, fd
                file.size = os.fstat(file.fd).st_size
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return 0
        finally:
            os.close(fd)  # the old file's (or, on failure, the new one's)
        return len(dropped)

    def purge_orphans(self, drop: Callable[[dict[str, Any]], bool]) -> int:
        """Remove the selected entries from files no live process holds."""
        removed = 0
        for path, fd in self._unheld():
            try:
                removed += purge_file(path, drop)
            finally:
                os.close(fd)
        return removed

    def _unheld(self) -> Iterator[tuple[Path, int]]:
        """The files of processes that are gone, each locked by this process while
        the caller uses it (a file renamed over meanwhile is skipped).

        Only regular files of this user that no one else may read or write are
        taken (any other one was not written by a journal of ours): the others
        are renamed aside (`<name>.rejected`) and logged, never replayed.
        """
        if not self.directory.is_dir():
            return
        with self._lock:
            own = {file.path for file in self._owned}
        for path in sorted(self.directory.glob("*.jsonl")):
            if path in own:
                continue
            flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
            try:
                fd = os.open(path, flags)
            except FileNotFoundError:  # replayed by another process meanwhile
                continue
            except OSError as exc:  # a symlink (ELOOP), another user's file (EACCES), ...
                _reject(path, f"cannot be opened as a file of ours: {exc.strerror}")
                continue
            problem = _untrusted(os.fstat(fd))
            if problem:
                os.close(fd)
                _reject(path, problem)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    raise OSError("replaced by its owner")
            except OSError:  # a live process owns it
                os.close(fd)
                continue
            yield path, fd

    def orphans(self) -> Iterator[tuple[Path, list[JournalEntry]]]:
        """Files of processes that are gone, each with its entries not marked done.

        A file is yielded locked by this process, which owns it from then on
        (`purge` covers it); its entries carry it, so `done` removes the file
        once all of them are stored.
        """
        for path, fd in self._unheld():
            file = _JournalFile(path, fd)
            entries = _read_entries(path, fd)
            if not entries:
                file.close(remove=True)
                continue
            file.outstanding = len(entries)
            for entry in entries:
                entry.file = file
            with self._lock:
                self._owned.add(file)
            yield path, entries


def _line(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n").encode(
        "utf-8", "surrogatepass"
    )


def _untrusted(info: os.stat_result) -> str | None:
    """Why a journal file cannot be ours (its `stat`), or None."""
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_uid != os.geteuid():
        return f"is owned by uid {info.st_uid}, not by this user ({os.geteuid()})"
    if info.st_mode & 0o077:
        return f"has mode {stat.S_IMODE(info.st_mode):04o}, not 0600"
    return None


def _reject(path: Path, problem: str) -> None:
    """Move a journal file that is not replayed out of the way, and say so."""
    aside = path.with_name(f"{path.name}.rejected")
    if os.path.lexists(aside):
        aside = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.rejected")
    try:
        os.rename(path, aside)  # a symlink itself, not what it points to
    except OSError as exc:
        logger.error("memory journal %s %s; not replayed (cannot move it: %s)", path, problem, exc)
        return
    logger.error("memory journal %s %s; not replayed, moved to %s", path, problem, aside.name)


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _read_entries(path: Path, fd: int) -> list[JournalEntry]:
    """Entries without a `done` line, in order; a torn last line is skipped.
    Read from `fd`, the file checked and locked, not again by its name."""
    entries: dict[str, JournalEntry] = {}
    try:
        raw = _read_all(fd)
    except OSError as exc:
        logger.error("cannot read memory journal %s: %s", path, exc)
        return []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            payload = json.loads(line.decode("utf-8", "surrogatepass"))
        except ValueError:
            logger.warning("memory journal %s:%d is not JSON; skipped", path, number)
            continue
        if not isinstance(payload, dict):
            continue
        if "done" in payload:
            entries.pop(str(payload["done"]), None)
        elif "entry" in payload:
            entry_id = str(payload.pop("entry"))
            entries[entry_id] = JournalEntry(entry_id, payload)
    return list(entries.values())


def _filter(
    raw: bytes, drop: Callable[[dict[str, Any]], bool], dropped: set[str]
) -> tuple[bytes, set[str]]:
    """The lines of `raw` without the entries `drop` selects and their `done`
    lines; adds the ids of those entries to `dropped` and returns it."""
    kept: list[bytes] = []
    for line in raw.splitlines(keepends=True):
        try:
            payload = json.loads(line.decode("utf-8", "surrogatepass"))
        except ValueError:
            kept.append(line)
            continue
        if isinstance(payload, dict) and "entry" in payload and drop(payload):
            dropped.add(str(payload["entry"]))
            continue
        if isinstance(payload, dict) and str(payload.get("done")) in dropped:
            continue
        kept.append(line)
    return b"".join(kept), dropped


def purge_file(path: Path, drop: Callable[[dict[str, Any]], bool]) -> int:
    """Rewrite a journal file (that the caller holds locked) without the entries
    `drop` selects (and their `done` lines): a new file, fsynced and renamed
    over the old one, so none of the dropped bytes stay in it. Returns how
    many entries were dropped."""
    try:
        raw = path.read_bytes()
    except OSError:
        return 0
    kept, dropped = _filter(raw, drop, set())
    if not dropped:
        return 0
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # still nobody's to adopt once renamed
        os.write(fd, kept)
        os.fsync(fd)
        os.replace(tmp, path)
    finally:
        os.close(fd)
    return len(dropped)
