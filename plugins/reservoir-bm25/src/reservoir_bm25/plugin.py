"""A persistent BM25 index per scope (SQLite FTS5), proposing lexical candidates.

One SQLite database per (partition, instance) under `<data_dir>/bm25/`, named
by a hash of the scope like the Chroma collections. It holds a contentless
FTS5 index (the porter-stemmed terms, not the texts) and the message ids.

- `reservoir_store` adds every new message of a scope (after the Chroma
  store has written it). A scope whose first batch starts at `seq` 0 gets a
  complete index from the start; a batch for a scope that has no index yet
  but older messages creates an index marked incomplete.
- `reservoir_retrieve` ranks the scope's messages with FTS5's `bm25()` and
  proposes the best for the "semantic" section, where the core fuses them
  with the dense candidates by reciprocal rank. An index that is missing or
  incomplete is rebuilt from the store first; the first time a process
  searches a scope (and, with a Chroma server, at most every `refresh_s`
  seconds after that) its size is compared with the store's count, and a
  difference means a rebuild. A scope of more than `blocking_rebuild`
  messages is rebuilt in a background thread instead, the old index (if
  any) answering meanwhile.
- `reservoir_delete` removes the scope's database file.

All of it runs in worker threads (the hooks are plain functions), one
operation per scope at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from reservoir_middleware import MessageRecord, Scope, hookimpl
from reservoir_middleware._private import private_dir, private_file, tighten_tree
from reservoir_middleware.context import Candidate, RetrievalQuery
from reservoir_middleware.memory.keywords import STOP_WORDS as CORE_STOP_WORDS
from reservoir_middleware.store import MemoryStore

SCHEMA = 1
TOKENIZE = "porter unicode61 remove_diacritics 2"
PAGE = 2000  # messages read from the store at a time during a rebuild
BLOCKING_REBUILD = 20_000  # messages: a larger scope is rebuilt in the background
MAX_QUERY_TERMS = 64
DEFAULT_REFRESH_S = 5.0

logger = logging.getLogger("reservoir.bm25")

# FTS5's unicode61 tokenizer splits on everything that is not a letter or a digit.
WORD = re.compile(r"[^\W_]+", re.UNICODE)
STOP_WORDS = CORE_STOP_WORDS  # the same list as the core's lexical search


def query_terms(text: str) -> list[str]:
    """The words of a query worth matching: lower-cased, no stop words, no
    single letters (single digits stay), each once, at most `MAX_QUERY_TERMS`."""
    seen: dict[str, None] = {}
    for raw in WORD.findall(text):
        word = raw.lower()
        if word in STOP_WORDS or (len(word) < 2 and not word.isdigit()):
            continue
        seen.setdefault(word, None)
        if len(seen) >= MAX_QUERY_TERMS:
            break
    return list(seen)


def match_expression(terms: Sequence[str]) -> str:
    """An FTS5 query matching any of the terms, each quoted (no operators)."""
    return " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)


def index_file_name(scope: Scope) -> str:
    digest = hashlib.sha256(scope.key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{digest[:48]}.sqlite3"


def _default_data_dir() -> Path:
    from reservoir_middleware import ReservoirSettings

    return Path(ReservoirSettings().data_dir)


class Bm25Retrieval:
    """The `bm25` plugin: lexical candidates from a persistent SQLite FTS5 index.

    `data_dir` is the reservoir data directory (default: `RSV_DATA_DIR` and
    the config file, as `ReservoirSettings` reads them, resolved on first
    use); the index lives in `<data_dir>/bm25/` unless `index_dir` (or
    `RSV_BM25_DIR`) says otherwise. `refresh_s` (`RSV_BM25_REFRESH_S`,
    default 5) is how often, with a Chroma server, a scope's index size is
    compared with the store's count. A scope of up to `blocking_rebuild`
    messages is (re)built on the request that needs it; a larger one in a
    background thread, the old index (if any) serving meanwhile.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        index_dir: str | os.PathLike[str] | None = None,
        refresh_s: float | None = None,
        blocking_rebuild: int = BLOCKING_REBUILD,
        name: str = "bm25",
    ) -> None:
        self.name = name
        self._data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        explicit = index_dir if index_dir is not None else os.environ.get("RSV_BM25_DIR") or None
        self._index_dir = Path(explicit).expanduser() if explicit is not None else None
        if refresh_s is None:
            refresh_s = float(os.environ.get("RSV_BM25_REFRESH_S") or DEFAULT_REFRESH_S)
        self.refresh_s = refresh_s
        self.blocking_rebuild = blocking_rebuild
        self.rebuilds = 0  # how many indexes were (re)built from the store
        self._lock = threading.Lock()  # guards the dicts below
        self._tightened = False
        self._scope_locks: dict[str, threading.RLock] = {}
        self._checked: dict[str, float] = {}  # scope key -> when its size was last compared
        # scope key -> messages stored while its index is being rebuilt
        self._building: dict[str, list[tuple[str, str]]] = {}

    # -- where -------------------------------------------------------------------

    @property
    def index_dir(self) -> Path:
        with self._lock:
            if self._index_dir is None:
                data_dir = self._data_dir if self._data_dir is not None else _default_data_dir()
                self._index_dir = data_dir / "bm25"
            if not self._tightened:  # indexes an older version left readable by others
                self._tightened = True
                tighten_tree(self._index_dir)
            return self._index_dir

    def path(self, scope: Scope) -> Path:
        """The index database of a scope (it may not exist)."""
        return self.index_dir / index_file_name(scope)

    def _scope_lock(self, scope: Scope) -> threading.RLock:
        with self._lock:
            lock = self._scope_locks.get(scope.key)
            if lock is None:
                lock = self._scope_locks[scope.key] = threading.RLock()
            return lock

    # -- hooks -------------------------------------------------------------------

    @hookimpl(trylast=True)  # after the Chroma store's: what is indexed is stored
    def reservoir_store(
        self, scope: Scope, records: list[MessageRecord], embeddings: list[list[float]]
    ) -> None:
        if not records:
            return
        docs = [(r.id, r.text) for r in records]
        with self._scope_lock(scope):
            with self._lock:
                buffer = self._building.get(scope.key)
                if buffer is not None:  # a rebuild is reading the store: it adds these too
                    buffer.extend(docs)
            path = self.path(scope)
            if path.exists():
                with _open(path) as db, db:
                    _insert(db, docs)
                return
            if buffer is not None:
                return  # the rebuild creates the index
            # A new index: complete only if this batch starts the scope.
            complete = min(r.seq for r in records) == 0
            with _open(path, create=True) as db, db:
                _init(db, scope, complete=complete)
                _insert(db, docs)

    @hookimpl
    def reservoir_retrieve(
        self, query: RetrievalQuery, store: MemoryStore
    ) -> list[Candidate] | None:
        terms = query_terms(query.text)
        if query.semantic_limit <= 0 or not terms:
            return None
        want = query.semantic_depth
        scopes = [query.scope]
        if query.semantic_scope == "partition":
            scopes = store.scopes(query.scope.partition) or scopes
        ranked: list[tuple[float, Scope, str]] = []
        for scope in scopes:
            ranked.extend((score, scope, id_) for id_, score in self.top(scope, terms, want, store))
        ranked.sort(key=lambda hit: hit[0], reverse=True)
        ranked = ranked[:want]
        records: dict[str, MessageRecord] = {}
        for scope in dict.fromkeys(scope for _, scope, _ in ranked):
            ids = [id_ for _, s, id_ in ranked if s == scope]
            records.update((r.id, r) for r in store.get(scope, ids))
        return [
            Candidate(records[id_], "semantic", score, self.name)
            for score, _, id_ in ranked
            if id_ in records  # indexed but not (or no longer) stored: left out
        ]

    @hookimpl
    def reservoir_delete(self, scope: Scope) -> None:
        with self._scope_lock(scope):
            with self._lock:
                self._checked.pop(scope.key, None)
                self._building.pop(scope.key, None)  # a rebuild under way is discarded
            path = self.path(scope)
            for leftover in (path, path.with_name(path.name + "-journal")):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    # -- the index ---------------------------------------------------------------------

    def top(
        self, scope: Scope, terms: Sequence[str], limit: int, store: MemoryStore
    ) -> list[tuple[str, float]]:
        """The best `limit` (id, score) of a scope for the terms, best first.

        A missing, incomplete or stale index is rebuilt from `store` first
        (in the background for a large scope: meanwhile a stale index serves,
        and a missing one gives nothing)."""
        with self._scope_lock(scope):
            path = self.path(scope)
            usable, stored = self._status(scope, path, store)
            if stored is not None:  # to be rebuilt
                if stored == 0:
                    return []
                if stored <= self.blocking_rebuild:
                    self._rebuild_now(scope, store)
                    usable = path.exists()
                else:
                    self._rebuild_in_background(scope, store)
            if not usable:
                return []
            with _open(path) as db:
                rows = db.execute(
                    "SELECT docs.id, -bm25(fts) FROM fts JOIN docs ON docs.rowid = fts.rowid"
                    " WHERE fts MATCH ? ORDER BY bm25(fts) LIMIT ?",
                    (match_expression(terms), limit),
                ).fetchall()
        return [(str(id_), float(score)) for id_, score in rows]

    def _status(self, scope: Scope, path: Path, store: MemoryStore) -> tuple[bool, int | None]:
        """(whether the index can answer, the store's count if it is to be rebuilt).

        Missing or incomplete: not usable, to be rebuilt. Complete: usable; the
        first search of a scope in this process (with several writers, a Chroma
        server: again every `refresh_s`) compares its size with the store's
        count, and a difference means a rebuild. Never two rebuilds at once."""
        with self._lock:
            building = scope.key in self._building
        complete, size = False, -1
        if path.exists():
            with _open(path) as db:
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
                complete = meta.get("schema") == str(SCHEMA) and meta.get("complete") == "1"
                if complete and (building or not self._check_due(scope, store)):
                    return True, None
                size = int(db.execute("SELECT count(*) FROM docs").fetchone()[0])
        if building:
            return complete, None
        stored = store.count(scope)
        if complete and size == stored:
            return True, None
        return complete, stored

    def _check_due(self, scope: Scope, store: MemoryStore) -> bool:
        now = time.monotonic()
        single_writer = bool(getattr(store, "single_writer", False))
        with self._lock:
            last = self._checked.get(scope.key)
            if last is not None and (single_writer or now - last < self.refresh_s):
                return False
            self._checked[scope.key] = now
            return True

    def _claim(self, scope: Scope) -> list[tuple[str, str]] | None:
        """Start a rebuild: the buffer that collects what is stored meanwhile
        (None if one is under way already)."""
        with self._lock:
            if scope.key in self._building:
                return None
            buffer: list[tuple[str, str]] = []
            self._building[scope.key] = buffer
            return buffer

    def _rebuild(self, scope: Scope, store: MemoryStore, buffer: list[tuple[str, str]]) -> None:
        """Index every message of the scope into a new file, then swap it in with
        the messages stored meanwhile (`buffer`, filled by `reservoir_store`).
        The store is read without the scope's lock (unless the caller holds it);
        the swap holds it. A delete meanwhile discards the new file."""
        key = scope.key
        path = self.path(scope)
        private_dir(path.parent)
        fresh = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with contextlib.suppress(FileNotFoundError):
                fresh.unlink()
            with _open(fresh, create=True) as db:
                with db:
                    _init(db, scope, complete=False)
                for page in _pages(store, scope):
                    with db:
                        _insert(db, page)
                with self._scope_lock(scope):
                    with self._lock:
                        current = self._building.get(key) is buffer
                        if current:
                            del self._building[key]
                    if not current:
                        return  # the scope was deleted meanwhile
                    with db:
                        _insert(db, buffer)
                        db.execute("UPDATE meta SET value = '1' WHERE key = 'complete'")
                    db.close()
                    os.replace(fresh, path)
                    with self._lock:
                        self._checked[key] = time.monotonic()
                        self.rebuilds += 1
        finally:
            with self._lock:
                if self._building.get(key) is buffer:  # failed: let a later search retry
                    del self._building[key]
            with contextlib.suppress(FileNotFoundError):
                fresh.unlink()

    def _rebuild_now(self, scope: Scope, store: MemoryStore) -> None:
        buffer = self._claim(scope)
        if buffer is not None:
            self._rebuild(scope, store, buffer)

    def _rebuild_in_background(self, scope: Scope, store: MemoryStore) -> None:
        buffer = self._claim(scope)
        if buffer is None:
            return

        def build() -> None:
            try:
                self._rebuild(scope, store, buffer)
            except Exception:
                logger.exception("the BM25 index of %s could not be rebuilt", scope)

        threading.Thread(target=build, name="reservoir-bm25-rebuild", daemon=True).start()


def _pages(store: MemoryStore, scope: Scope) -> Iterator[list[tuple[str, str]]]:
    offset = 0
    while True:
        page = store.documents(scope, offset, PAGE)
        if page:
            yield page
        offset += len(page)
        if len(page) < PAGE:
            return


@contextlib.contextmanager
def _open(path: Path, *, create: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection to an index database, closed afterwards (`with db:` commits)."""
    if create:  # conversations are private: the directory 0700, the files 0600
        private_dir(path.parent)
        private_file(path)  # SQLite gives its journal files the same mode
    uri = f"{path.absolute().as_uri()}?mode={'rwc' if create else 'rw'}"
    db = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
    try:
        db.execute("PRAGMA synchronous = NORMAL")
        yield db
    finally:
        db.close()


def _init(db: sqlite3.Connection, scope: Scope, *, complete: bool) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute(
        "CREATE TABLE IF NOT EXISTS docs (rowid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE)"
    )
    db.execute(
        "CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5"
        f"(text, content='', tokenize='{TOKENIZE}')"
    )
    db.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
        [
            ("schema", str(SCHEMA)),
            ("partition", scope.partition),
            ("instance", scope.instance),
            ("complete", "1" if complete else "0"),
        ],
    )


def _insert(db: sqlite3.Connection, docs: Iterable[tuple[str, str]]) -> None:
    """Index messages not indexed yet (by id)."""
    for id_, text in docs:
        cursor = db.execute("INSERT OR IGNORE INTO docs (id) VALUES (?)", (id_,))
        if cursor.rowcount == 1:
            db.execute("INSERT INTO fts (rowid, text) VALUES (?, ?)", (cursor.lastrowid, text))
