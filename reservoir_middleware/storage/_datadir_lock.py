"""One process per embedded Chroma directory.

Embedded Chroma (a `PersistentClient`) keeps its SQLite database and vector
indexes open in the process and caches them in memory: two processes writing
the same directory corrupt each other's view and, in time, the files. So the
first process that opens a directory takes an exclusive `flock` on
`<data_dir>/reservoir.lock` and keeps it for the rest of its life; any other
process (another `reservoir serve`, a worker, the `reservoir` memory commands)
gets `DataDirInUse`, whose message says who holds the directory and how to
share memory between processes instead: a Chroma server.

Within one process the directory may be opened any number of times (Chroma
itself shares one client per path). The operating system drops the lock when
the process ends, however it ends (even SIGKILL), so a lock is never stale.
(POSIX only: on Windows nothing is locked.)
"""

from __future__ import annotations

import errno
import os
import shlex
import sys
import threading
from pathlib import Path

from reservoir_middleware._private import private_dir, private_open

LOCK_NAME = "reservoir.lock"

_held: dict[Path, tuple[int, int]] = {}  # directory -> (pid that locked it, file descriptor)
_guard = threading.Lock()


class DataDirInUse(RuntimeError):
    """The embedded memory directory is open in another process."""

    def __init__(self, data_dir: Path, holder: str) -> None:
        self.data_dir = data_dir
        self.holder = holder
        super().__init__(
            f"the memory directory {data_dir} is in use by {holder}; embedded Chroma "
            "cannot be shared between processes. Stop that process, or run a Chroma server "
            f"(`chroma run --path {shlex.quote(str(data_dir))} --port 8000`) and set "
            "RSV_CHROMA_URL=http://127.0.0.1:8000 in every process that uses the memory "
            "(gateway workers, the `reservoir` commands) so they share it"
        )


def lock_data_dir(data_dir: Path) -> None:
    """Take the directory for this process, or raise `DataDirInUse`.

    Idempotent within a process. A forked child does not inherit the right to
    the directory: it is another process.
    """
    if sys.platform == "win32":  # no flock there: keeping to one process is up to you
        return
    import fcntl

    directory = data_dir.expanduser().resolve()
    with _guard:
        held = _held.get(directory)
        if held is not None and held[0] == os.getpid():
            return
        private_dir(directory)
        path = directory / LOCK_NAME
        try:
            fd = private_open(path, os.O_RDWR)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                return  # a directory this process cannot write: it cannot corrupt it either
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DataDirInUse(directory, _holder(path)) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{_command_line()}\n".encode("utf-8", "replace"))
        _held[directory] = (os.getpid(), fd)  # kept open: the lock lives as long as the process


def _command_line() -> str:
    argv = list(sys.argv) or [""]
    argv[0] = os.path.basename(argv[0]) or "python"
    if argv[0] in ("-c", "-m"):
        argv[0] = f"python {argv[0]}"
    line = " ".join(argv).replace("\n", " ").replace("\r", " ")
    return line if len(line) <= 160 else line[:157] + "..."


def _holder(path: Path) -> str:
    """`pid 1234 (reservoir serve)`, as far as the lock file tells."""
    try:
        pid, _, command = path.read_text("utf-8", "replace").partition("\n")
    except OSError:
        return "another process"
    pid, command = pid.strip(), command.strip()
    if not pid.isdigit():  # written a moment from now
        return "another process"
    return f"pid {pid} ({command})" if command else f"pid {pid}"
