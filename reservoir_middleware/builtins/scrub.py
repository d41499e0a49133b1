"""Leave no text of a deleted collection on disk (embedded Chroma).

Chroma deletes a collection's rows, but SQLite keeps them in free pages and
the collection's vector-index directory (`<data_dir>/<segment id>/`) may stay
behind. Chroma's own connection (also in the child server) cannot be told to
`secure_delete`, so after the delete the file is vacuumed from a connection
of our own (it works beside Chroma's when no write is open; busy is retried).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
import time
import uuid
from pathlib import Path

logger = logging.getLogger("reservoir")
VACUUM_TRIES = 20
VACUUM_PAUSE_S = 0.1


def segment_ids(data_dir: Path, collection_id: str) -> list[str]:
    """The segments (index directories) of a collection, before it is deleted."""
    path = data_dir / "chroma.sqlite3"
    if not path.is_file():
        return []
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
            rows = db.execute("SELECT id FROM segments WHERE collection = ?", (collection_id,))
            return [str(row[0]) for row in rows]
    except sqlite3.Error as exc:
        logger.warning("cannot list the segments of a deleted collection: %s", exc)
        return []


def scrub(data_dir: Path, segments: list[str]) -> None:
    """Remove the segments' directories and vacuum the database."""
    for segment in segments:
        with contextlib.suppress(ValueError):
            folder = data_dir / str(uuid.UUID(segment))  # never a path of someone else's
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
    vacuum(data_dir / "chroma.sqlite3")


def vacuum(path: Path) -> bool:
    """Rewrite the database without its free pages (deleted text); False if it stayed busy."""
    if not path.is_file():
        return True
    for _ in range(VACUUM_TRIES):
        try:
            with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
                db.execute("PRAGMA secure_delete = ON")
                db.execute("VACUUM")
                with contextlib.suppress(sqlite3.Error):  # WAL mode: fold the log in
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return True
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                logger.error("cannot vacuum %s after a delete: %s", path, exc)
                return False
            time.sleep(VACUUM_PAUSE_S)
    logger.error("cannot vacuum %s after a delete: the database stayed busy", path)
    return False
