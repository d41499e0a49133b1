"""Conversations are private: what reservoir keeps on disk is for its owner only.

Every directory it makes is 0700 and every file 0600, whatever the umask: the
data directory (so that nothing inside it is reachable by another user even
before its own mode is set), the lock, the Chroma log, the journal, the
plugins' databases, and what Chroma creates. The Chroma child runs under
umask 077; inline Chroma runs in this process, whose umask is the
application's, so what it creates is tightened after the write that made it.
Directories and files made earlier with looser modes (by an older version)
are tightened when the directory is opened and when the engine closes.

Only group and other bits are ever removed, only on what this user owns, and
symbolic links are never followed.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600
_LOOSE = 0o077  # group and other bits


def private_dir(path: Path) -> Path:
    """Make a directory 0700 (its missing parents as the umask says), or tighten it."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    tighten(path)
    return path


def private_dirs(*paths: Path) -> None:
    """`private_dir` of each, in order (a parent before its children)."""
    for path in paths:
        private_dir(path)


def private_open(path: Path, flags: int) -> int:
    """`os.open` creating the file 0600, and tightening it if it existed looser."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        if st.st_mode & _LOOSE and st.st_uid == os.geteuid():
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~_LOOSE)
    return fd


def private_file(path: Path) -> None:
    """Create an empty file 0600 unless it exists (SQLite then keeps that mode,
    for its journal and WAL files too), or tighten it."""
    os.close(private_open(path, os.O_RDONLY))


def tighten(path: Path) -> None:
    """Remove the group and other bits of one entry of ours; a link is left alone."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & _LOOSE or st.st_uid != os.geteuid():
        return
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~_LOOSE)


def tighten_tree(root: Path) -> None:
    """Tighten a directory and everything under it (links not followed)."""
    if root.is_symlink() or not root.is_dir():
        return
    tighten(root)
    for directory, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            tighten(Path(directory, name))


def secure_data_dir(data_dir: Path) -> None:
    """The data directory made 0700, with whatever it holds already tightened."""
    private_dir(data_dir)
    tighten_tree(data_dir)


class NewEntries:
    """Tightens what appeared at the top of a directory (and under it) since
    the last look: the files a library in this process created with the umask."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._known = self._names()

    def _names(self) -> set[str]:
        try:
            return set(os.listdir(self.root))
        except OSError:
            return set()

    def check(self) -> None:
        names = self._names()
        with self._lock:
            new, self._known = names - self._known, names
        for name in new:
            path = self.root / name
            tighten(path)
            tighten_tree(path)
