"""The built-in store: one Chroma collection per scope.

A collection per (partition, instance) keeps searches unfiltered and fast at
any size, makes isolation structural and deleting a scope one call. Chroma
names allow only `[a-zA-Z0-9._-]`, so the name is a hash of the scope and the
real names sit in the collection metadata.

The connection (client, child server, collection handles) is
`storage._chroma_client`; how records are kept and asked for,
`storage._chroma_rows`; this class adds what the single writer keeps in memory.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from chromadb.errors import NotFoundError

from reservoir_middleware.hookspecs import hookimpl
from reservoir_middleware.records import MessageRecord, Scope
from reservoir_middleware.storage import _chroma_admin as admin
from reservoir_middleware.storage import _chroma_forget as forgetting
from reservoir_middleware.storage import _chroma_passages as longer  # long messages' passages
from reservoir_middleware.storage import _chroma_rows as rows
from reservoir_middleware.storage._child import ChromaServer
from reservoir_middleware.storage._chroma_client import (
    ChromaConnection,
    _close_client,
    make_client,
    store_down,
)
from reservoir_middleware.storage._chroma_rows import COLLECTION_PREFIX, _metadata, collection_name
from reservoir_middleware.storage._mirror import Loader, PassageLoader, shared_mirror
from reservoir_middleware.storage._scrub import erase, remove_segments
from reservoir_middleware.store import (
    PAGE,
    Embedder,
    Location,
    Page,
    Passages,
    Progress,
    ScopeStats,
    Tail,
    Vectors,
)

__all__ = [
    "COLLECTION_PREFIX",
    "RECENT_CACHE",
    "ChromaStore",
    "_close_client",
    "collection_name",
    "make_client",
    "store_down",
]

RECENT_CACHE = 256  # messages per scope kept in memory (embedded mode)


P = ParamSpec("P")
T = TypeVar("T")


def _retry_if_deleted(
    method: Callable[Concatenate[ChromaStore, Scope, P], T],
) -> Callable[Concatenate[ChromaStore, Scope, P], T]:
    """A collection deleted elsewhere (the CLI, another worker) leaves a stale
    handle here: forget it and try once more with a fresh one."""

    def wrapper(self: ChromaStore, scope: Scope, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(self, scope, *args, **kwargs)
        except NotFoundError:
            self.forget(scope)
            return method(self, scope, *args, **kwargs)

    return wrapper


class ChromaStore:
    """Chroma-backed memory: the whole `Storage` protocol (the `reservoir_store`/
    `reservoir_delete` plugin, the read API the retrieval plugins use, maintenance)."""

    name = "chroma-store"

    def __init__(
        self,
        data_dir: Path,
        chroma_url: str | None,
        embedding_model: str,
        *,
        chroma_process: str = "inline",
        child_embeddings: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.chroma_url = chroma_url
        self.embedding_model = embedding_model
        self._chroma = ChromaConnection(
            data_dir,
            chroma_url,
            embedding_model,
            chroma_process=chroma_process,
            child_embeddings=child_embeddings,
        )
        # One lock for the client, the collection handles and the caches below
        self._lock = self._chroma.lock
        # The newest messages of each scope, so the recent window costs no query.
        # Only in embedded mode: there this process is the only writer.
        self._recent: dict[str, deque[MessageRecord]] = {}
        self._writes: dict[str, int] = {}  # per scope, to spot a write racing a cache load
        self._tails: dict[str, Tail] = {}  # next seq, last message and its embedding
        self._mirror = shared_mirror(data_dir)  # whole scopes, for reads by id (embedded)

    # -- the connection (`storage._chroma_client`) --------------------------------

    @property
    def client(self) -> Any:
        return self._chroma.client

    @property
    def server(self) -> ChromaServer | None:
        """The child process this store runs Chroma in, if any."""
        return self._chroma.server

    def open(self) -> None:
        """Connect (start the child in embedded mode); raises when unreachable."""
        self.client  # noqa: B018 (connects)

    def unavailable(self, error: BaseException) -> bool:
        """Chroma's own words for "down, busy or full" (`store_down`)."""
        return store_down(error)

    def embed(self, texts: list[str]) -> Vectors | None:
        return self._chroma.embed(texts)

    def close(self) -> None:
        self._chroma.close()

    @property
    def in_process(self) -> bool:
        return self._chroma.in_process

    @property
    def single_writer(self) -> bool:
        return self._chroma.single_writer

    def collection(self, scope: Scope, *, create: bool = False) -> Any | None:
        return self._chroma.collection(scope, create=create)

    def probe(self) -> None:
        self._chroma.probe()

    def max_batch(self) -> int:
        return self._chroma.max_batch()

    def forget(self, scope: Scope) -> None:
        """Drop what is cached about a scope (after it was deleted or went stale)."""
        name = collection_name(scope)
        with self._lock:
            self._chroma.collections.pop(name, None)
            self._chroma.collections.pop(rows.passages_name(scope), None)
            self._chroma.no_passages.pop(rows.passages_name(scope), None)
            self._recent.pop(name, None)
            self._tails.pop(name, None)
            # a recent-window read begun before this must not refill the cache
            self._writes[name] = self._writes.get(name, 0) + 1
        self._mirror.forget(name)

    # -- plugin hooks ----------------------------------------------------------

    @hookimpl
    def reservoir_store(
        self,
        scope: Scope,
        records: list[MessageRecord],
        embeddings: list[list[float]],
        passages: Passages | None = None,
    ) -> None:
        if records:
            self._store(scope, records, embeddings, passages)

    def _store(
        self,
        scope: Scope,
        records: list[MessageRecord],
        embeddings: list[list[float]],
        passages: Passages | None,
    ) -> None:
        col = self.collection(scope, create=True)
        assert col is not None
        step = self.max_batch()
        # passages first: a write that fails after them is retried whole
        written = longer.write(self._chroma, scope, records, passages, step)
        for start in range(0, len(records), step):  # one long transcript may exceed it
            part = records[start : start + step]
            col.upsert(
                ids=[r.id for r in part],
                embeddings=embeddings[start : start + step],
                documents=[r.text for r in part],
                metadatas=[_metadata(r) for r in part],
            )
        name = collection_name(scope)
        self._chroma.written(name)  # its vector index files, made with the app's umask
        with self._lock:
            self._writes[name] = self._writes.get(name, 0) + 1
            cached = self._recent.get(name)
            if cached is not None:
                cached.extend(sorted(records, key=lambda r: r.seq))
            if self.single_writer:
                last = max(range(len(records)), key=lambda i: records[i].seq)
                self._tails[name] = (records[last].seq + 1, records[last], embeddings[last])
        if self.single_writer:
            self._mirror.add(name, records, embeddings, written)

    @hookimpl
    def reservoir_delete(self, scope: Scope) -> None:
        """Delete the scope's collections, its passages' first; embedded, each is
        erased from the disk first (`scrub.erase`); if that fails, the collection
        stays and this raises."""
        self.forget(scope)
        for name in (rows.passages_name(scope), collection_name(scope)):
            with contextlib.suppress(NotFoundError):
                col = self.client.get_collection(name, embedding_function=None)
                segments = erase(self.data_dir, str(col.id)) if self.chroma_url is None else []
                self.client.delete_collection(name)
                remove_segments(self.data_dir, segments)
        self.forget(scope)

    def remove_messages(self, scope: Scope, ids: Sequence[str]) -> list[MessageRecord]:
        """The scope rebuilt without them, their bytes erased (`_chroma_forget`)."""
        self.forget(scope)
        data_dir = self.data_dir if self.chroma_url is None else None
        try:
            return forgetting.rebuild_without(self.client, data_dir, scope, ids, self.max_batch())
        finally:
            self.forget(scope)

    @_retry_if_deleted
    def expired(self, scope: Scope, before: float) -> list[str]:
        col = self.collection(scope)
        return [] if col is None else rows.expired(col, before)

    # -- reads -----------------------------------------------------------------

    @_retry_if_deleted
    def query(
        self, scope: Scope, embedding: Sequence[float], limit: int
    ) -> list[tuple[MessageRecord, float]]:
        if limit <= 0:
            return []
        if self.single_writer:  # from the in-memory index and copy, once loaded
            if self.collection(scope) is None:  # (it checks the embedding model too)
                return []
            hits = self._nearest_in_memory(scope, embedding, limit)
            if hits is not None:
                records = {r.id: r for r in self.get(scope, [i for i, _ in hits])}
                return [(records[i], sim) for i, sim in hits if i in records]
        col = self.collection(scope)
        return [] if col is None else longer.query(self._chroma, scope, col, embedding, limit)

    @_retry_if_deleted
    def nearest(
        self, scope: Scope, embedding: Sequence[float], limit: int
    ) -> list[tuple[str, float]]:
        """Like `query`, ids only: a third of the cost (no metadata is read);
        from the in-memory index once the scope is loaded (single writer)."""
        if limit <= 0:
            return []
        if self.single_writer:
            hits = self._nearest_in_memory(scope, embedding, limit)
            if hits is not None:
                return hits
        col = self.collection(scope)
        return [] if col is None else longer.nearest(self._chroma, scope, col, embedding, limit)

    def recent(self, scope: Scope, limit: int) -> list[MessageRecord]:
        if limit <= 0:
            return []
        if self.single_writer and limit <= RECENT_CACHE:
            name = collection_name(scope)
            with self._lock:
                cached = self._recent.get(name)
                if cached is not None:
                    return list(cached)[-limit:]
                writes = self._writes.get(name, 0)
            loaded = self._read_recent(scope, RECENT_CACHE)
            with self._lock:
                if self._writes.get(name, 0) == writes:  # no write slipped in meanwhile
                    self._recent.setdefault(name, deque(loaded, maxlen=RECENT_CACHE))
            return loaded[-limit:]
        return self._read_recent(scope, limit)

    @_retry_if_deleted
    def _read_recent(self, scope: Scope, limit: int) -> list[MessageRecord]:
        col = self.collection(scope)
        return [] if col is None else rows.newest(col, limit)

    def _nearest_in_memory(
        self, scope: Scope, embedding: Sequence[float], limit: int
    ) -> list[tuple[str, float]] | None:
        """From the scope's in-memory index; None until it is loaded."""
        name = collection_name(scope)
        load, passages = self._loaders(scope)
        return self._mirror.nearest(name, embedding, limit, load, passages)

    def _loaders(self, scope: Scope) -> tuple[Loader, PassageLoader]:
        """How the mirror reads the scope: its records, then its passages."""

        def load(offset: int, limit: int) -> tuple[list[MessageRecord], Any]:
            col = self.collection(scope)
            return ([], None) if col is None else rows.page(col, offset, limit)

        def passages(offset: int, limit: int) -> tuple[list[str], Any]:
            pcol = self._chroma.passages(scope)
            return ([], None) if pcol is None else rows.passage_page(pcol, offset, limit)

        return load, passages

    @_retry_if_deleted
    def get(self, scope: Scope, ids: Sequence[str]) -> list[MessageRecord]:
        if not ids:
            return []
        if self.single_writer:
            copied = self._mirror.get(collection_name(scope), ids, *self._loaders(scope))
            if copied is not None:
                return copied
        col = self.collection(scope)
        return [] if col is None else rows.by_ids(col, ids)

    @_retry_if_deleted
    def documents(
        self, scope: Scope, offset: int, limit: int, min_seq: int | None = None
    ) -> list[tuple[str, str]]:
        """One page of the scope's (id, text) pairs, in the store's order
        (only those with `seq >= min_seq` if given)."""
        if limit <= 0:
            return []
        if self.single_writer:  # one read of the scope serves the mirror and the caller
            name = collection_name(scope)
            page = self._mirror.documents(name, offset, limit, min_seq, *self._loaders(scope))
            if page is not None:
                return page
        col = self.collection(scope)
        return [] if col is None else rows.documents(col, offset, limit, min_seq)

    @_retry_if_deleted
    def existing_ids(self, scope: Scope, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        if self.single_writer:
            copied = self._mirror.existing(collection_name(scope), ids, *self._loaders(scope))
            if copied is not None:
                return copied
        col = self.collection(scope)
        return set() if col is None else rows.existing(col, ids)

    @_retry_if_deleted
    def traces_present(self, scope: Scope, trace_ids: Sequence[str]) -> set[str]:
        """Which of these exchanges (trace ids) have messages stored."""
        col = self.collection(scope)
        if col is None or not trace_ids:
            return set()
        return rows.traces(col, trace_ids)

    @_retry_if_deleted
    def keyword(self, scope: Scope, terms: Sequence[str], limit: int) -> list[MessageRecord]:
        col = self.collection(scope)
        terms = [t for t in terms if t]
        if col is None or not terms:
            return []
        return rows.keyword(col, terms, limit)

    def tail(self, scope: Scope) -> Tail:
        """The next sequence number and the last message with its embedding."""
        cached = self._tails.get(collection_name(scope))
        return cached if cached is not None else self._read_tail(scope)

    @_retry_if_deleted
    def _read_tail(self, scope: Scope) -> Tail:
        col = self.collection(scope)
        return (0, None, None) if col is None else rows.tail(col)

    def scopes(self, partition: str | None = None) -> list[Scope]:
        return rows.scopes(self.client.list_collections(), partition)

    @_retry_if_deleted
    def count(self, scope: Scope) -> int:
        col = self.collection(scope)
        return 0 if col is None else int(col.count())

    # -- maintenance (`storage._chroma_admin`) -------------------------------------

    def pages(self, scope: Scope, *, embeddings: bool = False, size: int = PAGE) -> Iterator[Page]:
        """Every record of a scope, oldest first, a page at a time (read afresh)."""
        yield from admin.pages(self.client, scope, embeddings=embeddings, size=size)

    def describe(self) -> Location:
        return admin.describe(self.data_dir, self.chroma_url)

    def scope_stats(self) -> list[ScopeStats]:
        """From the collections' metadata: the model each scope was stored with."""
        return admin.scope_stats(self.client, self.scopes())

    def reembed(self, embedder: Embedder, model: str, progress: Progress | None = None) -> int:
        """Each scope is copied into a side collection with the new vectors, then
        swapped in, and its passages made anew; after an interruption, the next
        run skips what was copied and finishes any swap left half done. A scope
        of the same model filled before passages existed gets its passages."""
        client = self.client
        admin.finish_swaps(client)
        done = 0
        for scope in self.scopes():
            copied = admin.copy_with_new_vectors(client, scope, embedder, model, progress)
            backfilled = longer.backfill(client, scope, embedder, model)
            done += copied or backfilled
            self.forget(scope)
        return done
