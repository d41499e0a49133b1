"""Leave no text of a deleted collection on disk (embedded Chroma).

Chroma deletes a collection's rows from connections that cannot be told to
`secure_delete` (its SQLite is built without it), so the text would stay in
freed space of `chroma.sqlite3`. So before Chroma deletes the collection, a
connection of ours with `secure_delete` on deletes the collection's rows
(documents, metadata, full-text index, queued writes), which zeroes their
bytes, and zeroes the file's free pages (what Chroma freed earlier); then
its vector-index directory is removed. The cost follows the size of the
collection and of the free pages, not of everything stored (no VACUUM).

Our connection runs in a short child process: two SQLite libraries in one
process (Python's and Chroma's) do not see each other's file locks.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from reservoir_middleware._private import PRIVATE_UMASK

ERASE_TIMEOUT_S = 120.0
ERASE_BUSY_S = 60.0  # how long the erase waits for a write lock held by someone else
CHUNK = 16 << 20  # bytes of zeros per row when overwriting free pages


class NotErased(RuntimeError):
    """The text could not be erased from the disk, so the collection was not deleted."""


ERASE = r"""
import sqlite3, sys

path, collection = sys.argv[1], sys.argv[2]
chunk, busy = int(sys.argv[3]), float(sys.argv[4])
db = sqlite3.connect(path, timeout=busy, isolation_level=None)
db.execute("PRAGMA secure_delete = ON")
db.execute("BEGIN IMMEDIATE")
try:
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    rows = db.execute("SELECT id FROM segments WHERE collection = ?", (collection,))
    segments = [row[0] for row in rows]
    # what Chroma freed earlier: overwrite the free pages with zeros
    db.execute("DROP TABLE IF EXISTS rsv_erase")
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    if free:
        usable = db.execute("PRAGMA page_size").fetchone()[0] - 4
        db.execute("CREATE TABLE rsv_erase(b BLOB)")
        left = free * usable
        while left > 0:
            db.execute("INSERT INTO rsv_erase VALUES (zeroblob(?))", (min(left, chunk),))
            left -= chunk
        db.execute("DROP TABLE rsv_erase")
    # the collection's rows, zeroed as they are deleted
    ids = (
        "SELECT id FROM embeddings WHERE segment_id IN "
        "(SELECT id FROM segments WHERE collection = :c)"
    )
    if "embedding_fulltext_search" in tables:
        fts = "embedding_fulltext_search"
        db.execute(f"DELETE FROM {fts} WHERE rowid IN ({ids})", {"c": collection})
    for table in ("embedding_metadata", "embedding_metadata_array"):
        if table in tables:
            db.execute(f"DELETE FROM {table} WHERE id IN ({ids})", {"c": collection})
    db.execute(
        "DELETE FROM embeddings WHERE segment_id IN "
        "(SELECT id FROM segments WHERE collection = :c)",
        {"c": collection},
    )
    if "embeddings_queue" in tables:  # topic: persistent://<tenant>/<database>/<collection>
        db.execute(
            "DELETE FROM embeddings_queue WHERE substr(topic, -length(:c)) = :c",
            {"c": collection},
        )
    db.execute(
        "UPDATE collection_metadata SET str_value = '' WHERE collection_id = :c "
        "AND key IN ('partition', 'instance')",
        {"c": collection},
    )
    db.execute("COMMIT")
except BaseException:
    db.execute("ROLLBACK")
    raise
db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
print("\n".join(segments))
"""


def erase(data_dir: Path, collection_id: str) -> list[str]:
    """Zero the collection's rows and the file's free pages; raises NotErased.
    Returns the collection's segments (their index directories go next)."""
    path = data_dir / "chroma.sqlite3"
    if not path.is_file():
        return []
    args = [collection_id, str(CHUNK), str(ERASE_BUSY_S)]
    return _run(ERASE, path, args, "not deleted: its text cannot be erased from").split()


def _run(script: str, path: Path, args: list[str], failure: str) -> str:
    """A script on the SQLite file in a child process; its output. Raises NotErased."""
    command = [sys.executable, "-I", "-S", "-c", script, str(path), *args]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=ERASE_TIMEOUT_S,
            umask=PRIVATE_UMASK,  # its rollback journal holds the text until the commit
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise NotErased(f"{failure} {path}: {exc}") from exc
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise NotErased(f"{failure} {path}: {reason}")
    return done.stdout


COMPACT = r"""
import sqlite3, sys

db = sqlite3.connect(sys.argv[1], timeout=float(sys.argv[2]), isolation_level=None)
db.execute("PRAGMA secure_delete = ON")
db.execute("VACUUM")
db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
"""


def compact(data_dir: Path) -> None:
    """Rewrite `chroma.sqlite3` with its live rows only (VACUUM), in a child
    process as `erase`; raises NotErased. Removing single messages needs it:
    Chroma's own deletes and upserts (its write queue, emptied once applied)
    leave their bytes in the unused space of pages still in use, which only
    a rewrite of the file clears. Its cost follows the whole file's size."""
    path = data_dir / "chroma.sqlite3"
    if not path.is_file():
        return
    _run(COMPACT, path, [str(ERASE_BUSY_S)], "its text cannot be erased from")


def remove_segments(data_dir: Path, segments: list[str]) -> None:
    """Remove the deleted collection's index directories."""
    for segment in segments:
        with contextlib.suppress(ValueError):
            folder = data_dir / str(uuid.UUID(segment))  # never a path of someone else's
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
