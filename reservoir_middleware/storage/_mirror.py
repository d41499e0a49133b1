"""Every record of a scope in this process's memory, for reads by id without Chroma.

Reading 40 messages by id from embedded Chroma costs about 3 ms (SQLite,
holding the interpreter part of the time); a request reads its fused hits
and their answers that way, twice. In embedded mode this process is the only
writer (the data directory is locked), so a copy kept current by our own
writes stays true: the first read of a scope loads it in a background
thread (about 25 s per 100k messages on two cores, with the vector index
below) while reads go to Chroma, then ids are dictionary lookups. Records
are packed as tuples with shared strings, about 0.6 KB each; beyond
`max_records` in all scopes the least recently read scopes are dropped and
loaded again when read.

Their embeddings go into an in-memory HNSW index (hnswlib, the library Chroma
itself builds on; about 1.7 KB per message), so the dense search of a
request is answered here in a fraction of a millisecond and never waits for
Chroma, which may be busy writing. A long message's passages (`memory.
_passages`) are more points of the same index, labelled with their message:
a search asks for a few more points and keeps each message's best.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from reservoir_middleware import _gcfreeze as gcfreeze
from reservoir_middleware._logs import log_failure
from reservoir_middleware.memory import _passages
from reservoir_middleware.records import MessageRecord

FIELDS = tuple(f.name for f in fields(MessageRecord))
_SHARED = frozenset(
    {"partition", "instance", "role", "model", "embedding_model", "finish_reason", "source"}
)
_LINKS = ("prev_id", "before_id", "after_id", "synapse_prev")
_LINK_INDEXES = tuple(FIELDS.index(name) for name in _LINKS)
_SHARED_INDEXES = tuple(FIELDS.index(name) for name in _SHARED)
_ID = FIELDS.index("id")
_TEXT = FIELDS.index("text")
_SEQ = FIELDS.index("seq")
LOAD_WAIT_S = 300.0
PAGE = 5_000
MAX_RECORDS = 500_000

HNSW_M = 16  # Chroma's defaults, for the same recall
HNSW_EF_CONSTRUCTION = 100
HNSW_EF_SEARCH = 100
LOAD_THREADS = 2  # building the index of a big scope at start-up: about 15 s per 100k

Packed = tuple[object, ...]
Vectors = Sequence[Sequence[float]] | np.ndarray
# (offset, limit) -> a page of records, with their embeddings in the same order
Loader = Callable[[int, int], tuple[list[MessageRecord], Vectors | None]]
# (offset, limit) -> a page of passages: the ids of their messages, and their vectors
PassageLoader = Callable[[int, int], tuple[list[str], Vectors | None]]
# what a write adds besides its records: the passages' messages and vectors, flat
Written = tuple[list[str], Vectors]


class _VectorIndex:
    """The embeddings of one scope in an HNSW graph; message ids map to labels.

    hnswlib releases the interpreter while it adds and searches; adding (which
    may update a point or grow the graph) and searching take turns, as in
    Chroma's own use of it. Searching takes 0.1 ms, adding a batch a few.
    """

    def __init__(self) -> None:
        self._index: Any = None
        self.ids: list[str] = []  # by label: the message (a passage's: its message)
        self.labels: dict[str, int] = {}
        self.passages: dict[str, list[int]] = {}  # a message's passages' labels
        self.passage_labels: set[int] = set()
        self.passage_count = 0
        self._lock = threading.Lock()

    def add(self, ids: Sequence[str], vectors: Vectors, threads: int = 1) -> None:
        matrix = np.asarray(vectors, dtype=np.float32)
        if not len(ids) or matrix.ndim != 2 or matrix.shape[0] != len(ids):
            return
        with self._lock:
            labels = []
            for id_ in ids:
                label = self.labels.get(id_)
                if label is None:  # a known id is updated in place
                    label = self.labels[id_] = len(self.ids)
                    self.ids.append(id_)
                labels.append(label)
            self._insert(matrix, labels, threads)

    def drop_passages(self, owners: Iterable[str]) -> None:
        """Forget the passages of these messages (they are written again)."""
        with self._lock:
            if not self.passage_count or self._index is None:
                return
            for owner in owners:
                for label in self.passages.pop(owner, ()):
                    self._index.mark_deleted(label)
                    self.passage_labels.discard(label)
                    self.passage_count -= 1

    def add_passages(self, owners: Sequence[str], vectors: Vectors, threads: int = 1) -> None:
        """Passages of the messages `owners` (one per row), besides those they have."""
        matrix = np.asarray(vectors, dtype=np.float32)
        if not len(owners) or matrix.ndim != 2 or matrix.shape[0] != len(owners):
            return
        with self._lock:
            labels = []
            for owner in owners:
                label = len(self.ids)
                self.ids.append(owner)
                self.passages.setdefault(owner, []).append(label)
                labels.append(label)
            self.passage_labels.update(labels)
            self.passage_count += len(labels)
            self._insert(matrix, labels, threads)

    def _insert(self, matrix: np.ndarray, labels: list[int], threads: int) -> None:
        """Under the lock: points at these labels (the graph made or grown first)."""
        if self._index is None:
            import hnswlib

            index = hnswlib.Index(space="cosine", dim=int(matrix.shape[1]))
            index.init_index(
                max_elements=max(1024, len(self.ids)),
                ef_construction=HNSW_EF_CONSTRUCTION,
                M=HNSW_M,
            )
            index.set_ef(HNSW_EF_SEARCH)
            self._index = index
        elif len(self.ids) > self._index.get_max_elements():
            self._index.resize_index(max(len(self.ids), self._index.get_max_elements() * 2))
        self._index.add_items(matrix, np.asarray(labels, dtype=np.int64), num_threads=threads)

    def nearest(self, vector: Sequence[float], limit: int) -> list[tuple[str, float]]:
        """The `limit` nearest messages, each once with its best point's similarity:
        with passages, more points are asked for (twice as many again while a
        message's passages crowd others out)."""
        with self._lock:
            index = self._index
            count = 0 if index is None else int(index.get_current_count())
            if count == 0 or limit <= 0:
                return []
            query = np.asarray(vector, dtype=np.float32)
            want = min(limit + min(self.passage_count, 2 * limit), count)
            discount = _passages.PASSAGE_DISCOUNT
            while True:
                found = self._knn(index, query, want)
                best: dict[str, float] = {}
                for label, dist in found:
                    similarity = 1.0 - dist - (discount if label in self.passage_labels else 0.0)
                    owner = self.ids[label]
                    if similarity > best.get(owner, -2.0):
                        best[owner] = similarity
                if len(best) >= limit or len(found) < want or want >= count:
                    break
                want = min(want * 2, count)
        return sorted(best.items(), key=lambda item: -item[1])[:limit]

    @staticmethod
    def _knn(index: Any, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(label, distance) of the k nearest points, nearest first."""
        while True:
            try:
                labels, distances = index.knn_query(query, k=k)
                break
            except RuntimeError:  # hnswlib reached fewer than k points: ask for fewer
                if k <= 1:
                    return []
                k //= 2
        return [(int(a), float(b)) for a, b in zip(labels[0], distances[0], strict=True)]


class _ScopeCopy:
    def __init__(self) -> None:
        self.rows: dict[str, Packed] = {}
        self.vectors = _VectorIndex()
        # written while loading: message ids and vectors, and passages
        self.pending: list[tuple[list[str], Vectors, Written | None]] = []
        self.ready = False
        self.settled = threading.Event()  # loaded, or failed


class RecordMirror:
    """Packed copies of whole scopes, keyed by collection name; thread-safe."""

    def __init__(self, max_records: int = MAX_RECORDS) -> None:
        self.max_records = max_records
        self._lock = threading.Lock()
        self._scopes: OrderedDict[str, _ScopeCopy] = OrderedDict()

    def get(
        self, name: str, ids: Iterable[str], load: Loader, passages: PassageLoader | None = None
    ) -> list[MessageRecord] | None:
        """The records with these ids, by seq; None when the scope is not loaded yet
        (a load starts in the background: `load` reads the records, `passages`
        the passages)."""
        copy = self._ready(name, load, passages)
        if copy is None:
            return None
        rows = copy.rows
        found = [_unpack(rows[i]) for i in dict.fromkeys(ids) if i in rows]
        return sorted(found, key=lambda r: r.seq)

    def nearest(
        self,
        name: str,
        vector: Sequence[float],
        limit: int,
        load: Loader,
        passages: PassageLoader | None = None,
    ) -> list[tuple[str, float]] | None:
        """The ids of the `limit` most similar messages with their cosine
        similarity (a message's best, its passages' included); None when the
        scope is not loaded yet."""
        copy = self._ready(name, load, passages)
        if copy is None:
            return None
        return copy.vectors.nearest(vector, limit)

    def existing(
        self, name: str, ids: Iterable[str], load: Loader, passages: PassageLoader | None = None
    ) -> set[str] | None:
        copy = self._ready(name, load, passages)
        if copy is None:
            return None
        return {i for i in ids if i in copy.rows}

    def documents(
        self,
        name: str,
        offset: int,
        limit: int,
        min_seq: int | None,
        load: Loader,
        passages: PassageLoader | None = None,
    ) -> list[tuple[str, str]] | None:
        """A page of (id, text) in load-then-write order, once the scope is loaded
        (waits for it); None if it cannot be loaded."""
        self._ready(name, load, passages)
        with self._lock:
            copy = self._scopes.get(name)
        if copy is None or not copy.settled.wait(LOAD_WAIT_S) or not copy.ready:
            return None
        with self._lock:
            values: Iterable[Packed] = copy.rows.values()
            if min_seq is not None:
                values = (row for row in values if row[_SEQ] >= min_seq)  # type: ignore[operator]
            rows = list(itertools.islice(values, offset, offset + limit))
        return [(str(row[_ID]), str(row[_TEXT])) for row in rows]

    def add(
        self,
        name: str,
        records: Sequence[MessageRecord],
        vectors: Vectors,
        passages: Written | None = None,
    ) -> None:
        """Records just written, with their embeddings and passages (also while a
        load runs: it keeps them)."""
        with self._lock:
            copy = self._scopes.get(name)
            if copy is None:
                return
            for record in records:
                copy.rows[record.id] = _pack(record, copy.rows)
            if not copy.ready:  # the load adds them at its end: a writer never waits for it
                copy.pending.append(([r.id for r in records], vectors, passages))
                return
        _add_written(copy.vectors, [r.id for r in records], vectors, passages)

    def forget(self, name: str) -> None:
        with self._lock:
            self._scopes.pop(name, None)

    def _ready(self, name: str, load: Loader, passages: PassageLoader | None) -> _ScopeCopy | None:
        with self._lock:
            copy = self._scopes.get(name)
            if copy is not None:
                self._scopes.move_to_end(name)
                return copy if copy.ready else None
            copy = self._scopes[name] = _ScopeCopy()
        threading.Thread(
            target=self._load,
            args=(name, copy, load, passages),
            name="reservoir-mirror",
            daemon=True,
        ).start()
        return None

    def _load(
        self, name: str, copy: _ScopeCopy, load: Loader, passages: PassageLoader | None
    ) -> None:
        try:
            offset = 0
            while True:
                page, vectors = load(offset, PAGE)
                fresh: list[int] = []
                with self._lock:
                    if self._scopes.get(name) is not copy:
                        return  # forgotten meanwhile
                    for i, record in enumerate(page):
                        if record.id not in copy.rows:  # else written since: newer
                            copy.rows[record.id] = _pack(record, copy.rows)
                            fresh.append(i)
                if vectors is not None and fresh:
                    matrix = np.asarray(vectors, dtype=np.float32)[fresh]
                    copy.vectors.add([page[i].id for i in fresh], matrix, threads=LOAD_THREADS)
                if len(page) < PAGE:
                    break
                offset += PAGE
            if passages is not None:
                self._load_passages(copy, passages)
            while True:
                with self._lock:
                    pending, copy.pending = copy.pending, []
                    if not pending:
                        copy.ready = True
                        self._evict(keep=name)
                        break
                for ids, written, extra in pending:
                    _add_written(copy.vectors, ids, written, extra)
            gcfreeze.loaded(len(copy.rows))
        except Exception as exc:
            log_failure("loading a scope into memory failed; reads go to the store", exc)
            with self._lock:
                if self._scopes.get(name) is copy:
                    del self._scopes[name]
        finally:
            copy.settled.set()

    @staticmethod
    def _load_passages(copy: _ScopeCopy, load: PassageLoader) -> None:
        """The stored passages of the loaded messages (those written meanwhile
        are pending: they replace these)."""
        offset = 0
        while True:
            owners, vectors = load(offset, PAGE)
            kept = [i for i, owner in enumerate(owners) if owner in copy.rows]
            if vectors is not None and kept:
                matrix = np.asarray(vectors, dtype=np.float32)[kept]
                owned = [owners[i] for i in kept]
                copy.vectors.add_passages(owned, matrix, threads=LOAD_THREADS)
            if len(owners) < PAGE:
                break
            offset += PAGE

    def _evict(self, keep: str) -> None:
        total = sum(len(c.rows) for c in self._scopes.values())
        for name in list(self._scopes):
            if total <= self.max_records:
                break
            if name != keep:
                total -= len(self._scopes.pop(name).rows)


_SHARED_MIRRORS: dict[str, RecordMirror] = {}
_SHARED_LOCK = threading.Lock()


def shared_mirror(data_dir: Path) -> RecordMirror:
    """One mirror per data directory in a process: every engine on it (the
    gateway's, an admin's) sees the others' writes and deletes."""
    key = str(data_dir.expanduser().resolve())
    with _SHARED_LOCK:
        mirror = _SHARED_MIRRORS.get(key)
        if mirror is None:
            mirror = _SHARED_MIRRORS[key] = RecordMirror()
        return mirror


def _add_written(
    index: _VectorIndex, ids: list[str], vectors: Vectors, passages: Written | None
) -> None:
    """A write's vectors into the index: its messages', and their passages, which
    replace those they had (a message written again may have fewer, or none)."""
    index.add(ids, vectors)
    index.drop_passages(ids)
    if passages is not None:
        index.add_passages(*passages)


def _pack(record: MessageRecord, rows: dict[str, Packed]) -> Packed:
    values = [getattr(record, name) for name in FIELDS]
    for index in _SHARED_INDEXES:
        value = values[index]
        if isinstance(value, str):
            values[index] = sys.intern(value)
    for index in _LINK_INDEXES:  # the linked message's own id string, not a copy
        value = values[index]
        if isinstance(value, str):
            linked = rows.get(value)
            if linked is not None:
                values[index] = linked[_ID]
    return tuple(values)


def _unpack(row: Packed) -> MessageRecord:
    record = MessageRecord(*row)  # type: ignore[arg-type]
    if record.tool_calls is not None:  # callers may change theirs
        record.tool_calls = [dict(call) for call in record.tool_calls]
    return record
