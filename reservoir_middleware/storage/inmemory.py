"""`InMemoryStore`: the whole `Storage` protocol in this process's memory.

What httpx's `MockTransport` is to a network: a real implementation, not a
mock, that keeps nothing on disk and starts no process. Tests of the engine
use it (`Reservoir(settings, store=InMemoryStore())`) and so can plugin
authors; the contract tests hold it to what `ChromaStore` does: exact cosine
search, Chroma's `$contains` for keywords (case-sensitive substrings), the
same orders. Thread-safe: the engine calls it from worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from reservoir_middleware.hookspecs import hookimpl
from reservoir_middleware.memory import _passages
from reservoir_middleware.memory._blocks import without_ids
from reservoir_middleware.memory._passages import passages_of
from reservoir_middleware.memory.embeddings import MiniLMEmbedding
from reservoir_middleware.records import MessageRecord, Scope, embedding_text
from reservoir_middleware.store import (
    PAGE,
    Embedder,
    EmbeddingMismatch,
    Location,
    Page,
    Passages,
    Progress,
    ScopeStats,
    Tail,
    Vectors,
)


@dataclass
class _Scope:
    model: str  # what its vectors were made with
    rows: dict[str, tuple[MessageRecord, np.ndarray]] = field(default_factory=dict)
    # a long message's passages' vectors (`memory._passages`), one row each
    passages: dict[str, np.ndarray] = field(default_factory=dict)


def _copy(record: MessageRecord) -> MessageRecord:
    """A record of its own (as a read from Chroma gives): callers may change theirs."""
    return MessageRecord(**record.to_dict())


def _similarities(
    rows: list[tuple[MessageRecord, np.ndarray]], query: Sequence[float]
) -> list[float]:
    if not rows:
        return []
    matrix = np.stack([vector for _, vector in rows]).astype(np.float64)
    vector = np.asarray(query, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(vector)
    dots = matrix @ vector
    sims = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return [float(s) for s in sims]


class InMemoryStore:
    """Memory in dictionaries: one per scope, records in the order they were written."""

    name = "memory-store"

    def __init__(self, embedding_model: str = MiniLMEmbedding.model_name) -> None:
        """`embedding_model`: the engine's (`make_embedding_function` names it; the
        default is that of the default `embedding` setting). Records embedded with
        another are refused with `EmbeddingMismatch`, as Chroma refuses a scope."""
        self.embedding_model = embedding_model
        self._scopes: dict[Scope, _Scope] = {}
        self._lock = threading.Lock()
        self.opened = False  # between `open` and `close` (what a test may look at)

    # -- what the engine may count on ----------------------------------------------

    @property
    def in_process(self) -> bool:
        return True

    @property
    def single_writer(self) -> bool:
        return True

    # -- life cycle --------------------------------------------------------------------

    def open(self) -> None:
        self.opened = True

    def close(self) -> None:
        """Nothing to let go of; the memory stays (as Chroma's stays on disk)."""
        self.opened = False

    def probe(self) -> None:
        """Memory always takes writes."""

    def unavailable(self, error: BaseException) -> bool:
        return isinstance(error, (OSError, TimeoutError))

    def embed(self, texts: list[str]) -> Vectors | None:
        return None  # no process of its own to embed in: the engine embeds

    # -- plugin hooks --------------------------------------------------------------------

    @hookimpl
    def reservoir_store(
        self,
        scope: Scope,
        records: list[MessageRecord],
        embeddings: list[list[float]],
        passages: Passages | None = None,
    ) -> None:
        given = passages if passages is not None else [[] for _ in records]
        if not len(records) == len(embeddings) == len(given):
            raise ValueError(f"{len(records)} records but {len(embeddings)} embeddings")
        for record in records:
            if record.embedding_model not in (None, self.embedding_model):
                raise EmbeddingMismatch(
                    f"a record of scope {scope} was embedded with {record.embedding_model!r} "
                    f"but this store holds {self.embedding_model!r} vectors: make it "
                    f"InMemoryStore(embedding_model={record.embedding_model!r})"
                )
        with self._lock:
            kept = self._readable(scope)
            if kept is None:
                kept = self._scopes[scope] = _Scope(self.embedding_model)
            for record, vector, vectors in zip(records, embeddings, given, strict=True):
                kept.rows[record.id] = (_copy(record), np.asarray(vector, dtype=np.float32))
                kept.passages.pop(record.id, None)  # a message written again: its new ones
                if len(vectors):
                    kept.passages[record.id] = np.asarray(vectors, dtype=np.float32)

    @hookimpl
    def reservoir_delete(self, scope: Scope) -> None:
        with self._lock:
            self._scopes.pop(scope, None)

    def remove_messages(self, scope: Scope, ids: Sequence[str]) -> list[MessageRecord]:
        with self._lock:
            kept = self._scopes.get(scope)
            if kept is None:
                return []
            present = [kept.rows.pop(i)[0] for i in dict.fromkeys(ids) if i in kept.rows]
            for record in present:
                kept.passages.pop(record.id, None)
            gone = {r.id for r in present}
            for key, (record, vector) in list(kept.rows.items()):
                if record.memory and gone:  # the blocks that showed them forget them too
                    shown = without_ids(record.memory, gone)
                    kept.rows[key] = (replace(record, memory=shown), vector)
            if not kept.rows:
                del self._scopes[scope]
            return present

    def expired(self, scope: Scope, before: float) -> list[str]:
        return [r.id for r, _ in self._rows(scope) if r.timestamp < before]

    # -- reads -----------------------------------------------------------------------------

    def _readable(self, scope: Scope) -> _Scope | None:
        """The scope (under the lock), refused when embedded with another model."""
        kept = self._scopes.get(scope)
        if kept is not None and kept.model != self.embedding_model:
            raise EmbeddingMismatch(
                f"memory of scope {scope} was embedded with {kept.model!r} but the "
                f"configured embedding is {self.embedding_model!r}"
            )
        return kept

    def _rows(self, scope: Scope) -> list[tuple[MessageRecord, np.ndarray]]:
        with self._lock:
            kept = self._readable(scope)
            return list(kept.rows.values()) if kept is not None else []

    def query(
        self, scope: Scope, embedding: Sequence[float], limit: int
    ) -> list[tuple[MessageRecord, float]]:
        """Exact: a message scores the best of its own vector and its passages'."""
        if limit <= 0:
            return []
        with self._lock:
            kept = self._readable(scope)
            rows = list(kept.rows.values()) if kept is not None else []
            passages = dict(kept.passages) if kept is not None else {}
        sims = _similarities(rows, embedding)
        for i, (record, _) in enumerate(rows):
            more = passages.get(record.id)
            if more is not None:
                near = _similarities([(record, v) for v in more], embedding)
                sims[i] = max(sims[i], *(s - _passages.PASSAGE_DISCOUNT for s in near))
        best = sorted(range(len(rows)), key=lambda i: -sims[i])[:limit]
        return [(_copy(rows[i][0]), sims[i]) for i in best]

    def nearest(
        self, scope: Scope, embedding: Sequence[float], limit: int
    ) -> list[tuple[str, float]]:
        return [(r.id, sim) for r, sim in self.query(scope, embedding, limit)]

    def recent(self, scope: Scope, limit: int) -> list[MessageRecord]:
        if limit <= 0:
            return []
        records = sorted((r for r, _ in self._rows(scope)), key=lambda r: r.seq)
        return [_copy(r) for r in records[-limit:]]

    def get(self, scope: Scope, ids: Sequence[str]) -> list[MessageRecord]:
        with self._lock:
            kept = self._readable(scope)
            rows = kept.rows if kept is not None else {}
            found = [rows[i][0] for i in dict.fromkeys(ids) if i in rows]
        return [_copy(r) for r in sorted(found, key=lambda r: r.seq)]

    def documents(
        self, scope: Scope, offset: int, limit: int, min_seq: int | None = None
    ) -> list[tuple[str, str]]:
        if limit <= 0:
            return []
        records = [r for r, _ in self._rows(scope) if min_seq is None or r.seq >= min_seq]
        return [(r.id, r.text) for r in records[offset : offset + limit]]

    def existing_ids(self, scope: Scope, ids: Sequence[str]) -> set[str]:
        with self._lock:
            kept = self._readable(scope)
            return {i for i in ids if kept is not None and i in kept.rows}

    def traces_present(self, scope: Scope, trace_ids: Sequence[str]) -> set[str]:
        wanted = set(trace_ids)
        return {r.trace_id for r, _ in self._rows(scope) if r.trace_id in wanted}

    def keyword(self, scope: Scope, terms: Sequence[str], limit: int) -> list[MessageRecord]:
        """Chroma's `$contains`: a case-sensitive substring of the text, any term."""
        terms = [t for t in terms if t]
        if not terms or limit <= 0:
            return []
        found = [r for r, _ in self._rows(scope) if any(t in r.text for t in terms)][:limit]
        return [_copy(r) for r in sorted(found, key=lambda r: r.seq)]

    def scopes(self, partition: str | None = None) -> list[Scope]:
        with self._lock:
            found = [s for s in self._scopes if partition is None or s.partition == partition]
        return sorted(found, key=lambda s: (s.partition, s.instance))

    def count(self, scope: Scope) -> int:
        return len(self._rows(scope))

    # -- the write path -------------------------------------------------------------------

    def tail(self, scope: Scope) -> Tail:
        rows = self._rows(scope)
        if not rows:
            return 0, None, None
        last, vector = max(rows, key=lambda row: row[0].seq)
        return max(len(rows), last.seq + 1), _copy(last), [float(x) for x in vector]

    def forget(self, scope: Scope) -> None:
        """Nothing is cached: the dictionaries are the memory."""

    # -- maintenance ---------------------------------------------------------------------

    def pages(self, scope: Scope, *, embeddings: bool = False, size: int = PAGE) -> Iterator[Page]:
        """Whatever model the scope was embedded with (an export after a replay)."""
        with self._lock:
            kept = self._scopes.get(scope)
            rows = list(kept.rows.values()) if kept is not None else []
        rows.sort(key=lambda row: (row[0].seq, row[0].timestamp))
        for start in range(0, len(rows), size):
            yield [
                (_copy(r), [float(x) for x in v] if embeddings else None)
                for r, v in rows[start : start + size]
            ]

    def describe(self) -> Location:
        return Location("in this process's memory (InMemoryStore)", None)

    def scope_stats(self) -> list[ScopeStats]:
        with self._lock:
            kept = sorted(self._scopes.items(), key=lambda i: (i[0].partition, i[0].instance))
            return [ScopeStats(scope, len(s.rows), s.model) for scope, s in kept]

    def reembed(self, embedder: Embedder, model: str, progress: Progress | None = None) -> int:
        """Scope by scope, swapped in whole: an interruption leaves each scope
        with one model or the other, and the next run skips the done ones."""
        done = 0
        for scope in self.scopes():
            with self._lock:
                kept = self._scopes.get(scope)
                if kept is None or kept.model == model:
                    continue
                rows = list(kept.rows.values())
            fresh = _Scope(model)
            for start in range(0, len(rows), PAGE):
                part = [_copy(r) for r, _ in rows[start : start + PAGE]]
                texts = [embedding_text(r) for r in part]
                cut = passages_of(embedder, texts)
                pieces = [p for passages in cut for p in passages]
                vectors = list(embedder(texts + pieces)) if texts else []
                more = iter(vectors[len(texts) :])
                for record, vector, passages in zip(part, vectors, cut, strict=False):
                    record.embedding_model = model
                    fresh.rows[record.id] = (record, np.asarray(vector, dtype=np.float32))
                    if passages:
                        own = [next(more) for _ in passages]
                        fresh.passages[record.id] = np.asarray(own, dtype=np.float32)
                if progress is not None:
                    progress(len(part))
            with self._lock:
                if self._scopes.get(scope) is kept:  # not deleted meanwhile
                    self._scopes[scope] = fresh
            done += len(fresh.rows)
        return done
