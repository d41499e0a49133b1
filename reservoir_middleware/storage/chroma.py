"""The built-in store: one Chroma collection per scope.

A collection per (partition, instance) keeps searches unfiltered and fast at
any size, makes isolation structural and deleting a scope one call. Chroma
names allow only `[a-zA-Z0-9._-]`, so the name is a hash of the scope and the
real names sit in the collection metadata.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit

from chromadb.errors import NotFoundError

from reservoir_middleware._logs import log_failure
from reservoir_middleware._private import NewEntries, secure_data_dir
from reservoir_middleware.hookspecs import hookimpl
from reservoir_middleware.records import MessageRecord, Scope
from reservoir_middleware.storage import _chroma_admin as admin
from reservoir_middleware.storage._child import (
    ChromaServer,
    ChromaServerError,
    release,
    shared_server,
)
from reservoir_middleware.storage._chroma_rows import (
    COLLECTION_PREFIX,
    _metadata,
    _record,
    _records,
    _records_in_order,
    collection_name,
)
from reservoir_middleware.storage._mirror import Loader, shared_mirror
from reservoir_middleware.storage._scrub import erase, remove_segments
from reservoir_middleware.store import (
    PAGE,
    Embedder,
    EmbeddingMismatch,
    Location,
    Page,
    Progress,
    ScopeStats,
    Tail,
    Vectors,
)

PROBE_COLLECTION = "reservoir-probe"  # no scope's (not `rsv-`): one vector, no text
RECENT_CACHE = 256  # messages per scope kept in memory (embedded mode)
CHILD_EMBED_MAX = 64  # texts per write embedded in the child; more (imports): by the engine
FALLBACK_BATCH = 1000  # records per upsert when the client cannot tell its limit


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


def make_client(data_dir: Path, chroma_url: str | None) -> Any:
    """An embedded PersistentClient, or an HttpClient when a server URL is set."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False, allow_reset=False)
    if chroma_url:
        url = urlsplit(chroma_url if "://" in chroma_url else f"http://{chroma_url}")
        return chromadb.HttpClient(
            host=url.hostname or "127.0.0.1",
            port=url.port or (443 if url.scheme == "https" else 8000),
            ssl=url.scheme == "https",
            settings=settings,
        )
    from reservoir_middleware.storage._datadir_lock import lock_data_dir

    secure_data_dir(data_dir)  # 0700, and what an older version left tightened
    lock_data_dir(data_dir)  # one process per directory, else DataDirInUse
    return chromadb.PersistentClient(path=str(data_dir), settings=settings)


def _close_clients(clients: list[Any]) -> None:
    while clients:
        _close_client(clients.pop())


def _close_client(client: Any) -> None:
    """Release an HTTP client's connections (its server is gone or going)."""
    with contextlib.suppress(Exception):
        client.close()
    # chromadb does not close its httpx sessions: the client's and its admin client's
    for owner in (client, getattr(client, "_admin_client", None)):
        session = getattr(getattr(owner, "_server", None), "_session", None)
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()


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
        self._client: Any = None
        # Embedded mode with a child Chroma server (chroma_server.py); None inline.
        self._server: ChromaServer | None = None
        if chroma_url is None and chroma_process == "child":
            self._server = shared_server(data_dir, embed_threads=1 if child_embeddings else None)
            weakref.finalize(self, release, self._server)
        # HTTP clients (of the child or of `chroma_url`), closed when the store is
        # dropped or at exit: chromadb keeps them, and their sockets, alive until then
        self._opened: list[Any] = []
        weakref.finalize(self, _close_clients, self._opened)
        self._collections: dict[str, Any] = {}
        self._max_batch: tuple[Any, int] | None = None  # (client, its batch limit)
        self._lock = threading.Lock()
        # The newest messages of each scope, so the recent window costs no query.
        # Only in embedded mode: there this process is the only writer.
        self._recent: dict[str, deque[MessageRecord]] = {}
        self._writes: dict[str, int] = {}  # per scope, to spot a write racing a cache load
        self._tails: dict[str, Tail] = {}  # next seq, last message and its embedding
        self._mirror = shared_mirror(data_dir)  # whole scopes, for reads by id (embedded)
        # Inline: what Chroma creates for a collection's first write, made 0600/0700 after it
        self._created: NewEntries | None = None
        self._written: set[str] = set()

    # -- collections ---------------------------------------------------------

    @property
    def client(self) -> Any:
        with self._lock:
            if self._server is not None and self._client is not None and not self._server.alive():
                _close_client(self._client)  # the child died: start it again, on a new port
                self._client = None
                self._collections.clear()
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> Any:
        if self._server is None:
            if self.in_process:  # Chroma creates files here with the app's umask
                self._created = NewEntries(self.data_dir)
            client = make_client(self.data_dir, self.chroma_url)
            if self._created is not None:
                self._created.check()  # chroma.sqlite3
            if self.chroma_url is not None:
                self._opened.append(client)
            return client
        from reservoir_middleware.storage._datadir_lock import lock_data_dir

        secure_data_dir(self.data_dir)  # before the child opens it
        lock_data_dir(self.data_dir)  # the child is ours: no other process may open it
        client = make_client(self.data_dir, self._server.start())
        self._opened.append(client)
        return client

    @property
    def server(self) -> ChromaServer | None:
        """The child process this store runs Chroma in, if any."""
        return self._server

    def open(self) -> None:
        """Connect (start the child in embedded mode); raises when unreachable."""
        self.client  # noqa: B018 (connects)

    def unavailable(self, error: BaseException) -> bool:
        """Chroma's own words for "down, busy or full" (`store_down`)."""
        return store_down(error)

    def embed(self, texts: list[str]) -> Vectors | None:
        """In the child process when it embeds (at its lower priority, one thread);
        None for a bulk import, which the engine embeds with all its threads."""
        server = self._server
        if server is None or not server.embed_threads or len(texts) > CHILD_EMBED_MAX:
            return None
        try:
            return server.embed(texts)
        except ChromaServerError as exc:
            log_failure("embedding in the memory's process failed; embedding here", exc)
            return None

    def close(self) -> None:
        """Close the connections to a Chroma server, and stop the child Chroma
        server if this store runs one (both open again on the next use)."""
        with self._lock:
            client, self._client = self._client, None
            self._collections.clear()
        if client is not None and not self.in_process:
            _close_client(client)
            with contextlib.suppress(ValueError):
                self._opened.remove(client)  # closed: not kept until the store is dropped
        if self._server is not None:
            self._server.stop()

    @property
    def in_process(self) -> bool:
        """Chroma runs in this process (it then holds the interpreter while it writes)."""
        return self.chroma_url is None and self._server is None

    @property
    def single_writer(self) -> bool:
        """Embedded mode: this process is the only writer, so caches stay true."""
        return self.chroma_url is None

    def forget(self, scope: Scope) -> None:
        """Drop what is cached about a scope (after it was deleted or went stale)."""
        name = collection_name(scope)
        with self._lock:
            self._collections.pop(name, None)
            self._recent.pop(name, None)
            self._tails.pop(name, None)
            # a recent-window read begun before this must not refill the cache
            self._writes[name] = self._writes.get(name, 0) + 1
        self._mirror.forget(name)

    def collection(self, scope: Scope, *, create: bool = False) -> Any | None:
        name = collection_name(scope)
        cached = self._collections.get(name)
        if cached is not None and (self._server is None or self._server.alive()):
            return cached
        if create:
            col = self.client.get_or_create_collection(
                name,
                metadata={
                    "partition": scope.partition,
                    "instance": scope.instance,
                    "embedding_model": self.embedding_model,
                    "created": time.time(),
                    "hnsw:space": "cosine",
                },
                embedding_function=None,
            )
        else:
            try:
                col = self.client.get_collection(name, embedding_function=None)
            except NotFoundError:
                return None
        stored_model = (col.metadata or {}).get("embedding_model")
        if stored_model and stored_model != self.embedding_model:
            raise EmbeddingMismatch(
                f"memory of scope {scope} was embedded with {stored_model!r} but the configured "
                f"embedding is {self.embedding_model!r}; re-embed it with "
                f"`reservoir replay --embedding {self.embedding_model}` or set "
                f"RSV_EMBEDDING={stored_model}"
            )
        self._collections[name] = col
        return col

    # -- plugin hooks ----------------------------------------------------------

    @hookimpl
    def reservoir_store(
        self, scope: Scope, records: list[MessageRecord], embeddings: list[list[float]]
    ) -> None:
        if records:
            self._store(scope, records, embeddings)

    def _store(
        self, scope: Scope, records: list[MessageRecord], embeddings: list[list[float]]
    ) -> None:
        col = self.collection(scope, create=True)
        assert col is not None
        step = self.max_batch()
        for start in range(0, len(records), step):  # one long transcript may exceed it
            part = records[start : start + step]
            col.upsert(
                ids=[r.id for r in part],
                embeddings=embeddings[start : start + step],
                documents=[r.text for r in part],
                metadatas=[_metadata(r) for r in part],
            )
        name = collection_name(scope)
        if self._created is not None and name not in self._written:
            self._written.add(name)
            self._created.check()  # its vector index files, made with the app's umask
        with self._lock:
            self._writes[name] = self._writes.get(name, 0) + 1
            cached = self._recent.get(name)
            if cached is not None:
                cached.extend(sorted(records, key=lambda r: r.seq))
            if self.single_writer:
                last = max(range(len(records)), key=lambda i: records[i].seq)
                self._tails[name] = (records[last].seq + 1, records[last], embeddings[last])
        if self.single_writer:
            self._mirror.add(name, records, embeddings)

    def probe(self) -> None:
        """Write one fixed vector, no text: fails only when the store refuses writes."""
        col = self.client.get_or_create_collection(PROBE_COLLECTION, embedding_function=None)
        col.upsert(ids=["probe"], embeddings=[[1.0]], metadatas=[{"at": time.time()}])

    def max_batch(self) -> int:
        """Records the store takes in one call (Chroma's limit, asked once per client)."""
        client = self.client
        known = self._max_batch
        if known is None or known[0] is not client:
            try:
                size = int(client.get_max_batch_size())
            except Exception:
                size = -1
            known = self._max_batch = (client, size if size > 0 else FALLBACK_BATCH)
        return known[1]

    @hookimpl
    def reservoir_delete(self, scope: Scope) -> None:
        """Delete the scope's collection; embedded, its text is erased from the disk
        first (`scrub.erase`); if that fails, the collection stays and this raises."""
        self.forget(scope)
        with contextlib.suppress(NotFoundError):
            col = self.client.get_collection(collection_name(scope), embedding_function=None)
            segments = erase(self.data_dir, str(col.id)) if self.chroma_url is None else []
            self.client.delete_collection(collection_name(scope))
            remove_segments(self.data_dir, segments)
        self.forget(scope)

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
        if col is None:
            return []
        result = col.query(
            query_embeddings=[list(embedding)],
            n_results=limit,
            include=["documents", "metadatas", "distances"],
        )
        ids = result["ids"][0]
        return [
            (_record(i, d, m), 1.0 - float(dist))
            for i, d, m, dist in zip(
                ids,
                result["documents"][0],
                result["metadatas"][0],
                result["distances"][0],
                strict=True,
            )
        ]

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
        if col is None:
            return []
        result = col.query(
            query_embeddings=[list(embedding)], n_results=limit, include=["distances"]
        )
        return [
            (i, 1.0 - float(dist))
            for i, dist in zip(result["ids"][0], result["distances"][0], strict=True)
        ]

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
        if col is None:
            return []
        total = col.count()
        result = col.get(where={"seq": {"$gte": total - limit}}, include=["documents", "metadatas"])
        return _records(result)[-limit:]

    def _nearest_in_memory(
        self, scope: Scope, embedding: Sequence[float], limit: int
    ) -> list[tuple[str, float]] | None:
        """From the scope's in-memory index; None until it is loaded."""
        name = collection_name(scope)
        return self._mirror.nearest(name, embedding, limit, self._page_loader(scope))

    def _page_loader(self, scope: Scope) -> Loader:
        def load(offset: int, limit: int) -> tuple[list[MessageRecord], Any]:
            col = self.collection(scope)
            if col is None:
                return [], None
            result = col.get(
                include=["documents", "metadatas", "embeddings"], offset=offset, limit=limit
            )
            return _records_in_order(result), result.get("embeddings")

        return load

    @_retry_if_deleted
    def get(self, scope: Scope, ids: Sequence[str]) -> list[MessageRecord]:
        if not ids:
            return []
        if self.single_writer:
            copied = self._mirror.get(collection_name(scope), ids, self._page_loader(scope))
            if copied is not None:
                return copied
        col = self.collection(scope)
        if col is None:
            return []
        unique = list(dict.fromkeys(ids))
        return _records(col.get(ids=unique, include=["documents", "metadatas"]))

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
            page = self._mirror.documents(name, offset, limit, min_seq, self._page_loader(scope))
            if page is not None:
                return page
        col = self.collection(scope)
        if col is None:
            return []
        where = {"seq": {"$gte": min_seq}} if min_seq is not None else None
        result = col.get(include=["documents"], where=where, offset=offset, limit=limit)
        docs = result.get("documents") or [None] * len(result["ids"])
        return [(i, d or "") for i, d in zip(result["ids"], docs, strict=True)]

    @_retry_if_deleted
    def existing_ids(self, scope: Scope, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        if self.single_writer:
            copied = self._mirror.existing(collection_name(scope), ids, self._page_loader(scope))
            if copied is not None:
                return copied
        col = self.collection(scope)
        if col is None:
            return set()
        return set(col.get(ids=list(dict.fromkeys(ids)), include=[])["ids"])

    @_retry_if_deleted
    def traces_present(self, scope: Scope, trace_ids: Sequence[str]) -> set[str]:
        """Which of these exchanges (trace ids) have messages stored."""
        col = self.collection(scope)
        if col is None or not trace_ids:
            return set()
        wanted = list(dict.fromkeys(trace_ids))
        where = {"trace_id": wanted[0]} if len(wanted) == 1 else {"trace_id": {"$in": wanted}}
        result = col.get(where=where, include=["metadatas"])
        return {str(m.get("trace_id")) for m in result.get("metadatas") or [] if m}

    @_retry_if_deleted
    def keyword(self, scope: Scope, terms: Sequence[str], limit: int) -> list[MessageRecord]:
        col = self.collection(scope)
        terms = [t for t in terms if t]
        if col is None or not terms:
            return []
        clauses: list[dict[str, Any]] = [{"$contains": t} for t in terms]
        where_document = clauses[0] if len(clauses) == 1 else {"$or": clauses}
        result = col.get(
            where_document=where_document, limit=limit, include=["documents", "metadatas"]
        )
        return _records(result)

    def tail(self, scope: Scope) -> Tail:
        """The next sequence number and the last message with its embedding."""
        cached = self._tails.get(collection_name(scope))
        return cached if cached is not None else self._read_tail(scope)

    @_retry_if_deleted
    def _read_tail(self, scope: Scope) -> Tail:
        col = self.collection(scope)
        if col is None:
            return 0, None, None
        total = col.count()
        if total == 0:
            return 0, None, None
        result = col.get(
            where={"seq": {"$gte": total - 1}}, include=["documents", "metadatas", "embeddings"]
        )
        if not result["ids"]:
            return total, None, None
        records = _records(result)
        last = records[-1]
        index = result["ids"].index(last.id)
        embedding = [float(x) for x in result["embeddings"][index]]
        return max(total, last.seq + 1), last, embedding

    def scopes(self, partition: str | None = None) -> list[Scope]:
        out = []
        for col in self.client.list_collections():
            meta = col.metadata or {}
            if not col.name.startswith(COLLECTION_PREFIX) or "partition" not in meta:
                continue
            if partition is None or meta["partition"] == partition:
                out.append(Scope(str(meta["partition"]), str(meta.get("instance", ""))))
        return sorted(out, key=lambda s: (s.partition, s.instance))

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
        swapped in; after an interruption, the next run skips what was copied and
        finishes any swap left half done."""
        client = self.client
        admin.finish_swaps(client)
        done = 0
        for scope in self.scopes():
            done += admin.copy_with_new_vectors(client, scope, embedder, model, progress)
            self.forget(scope)
        return done


def store_down(exc: BaseException) -> bool:
    """The failure is the store's (unreachable, busy, full, failing inside), not
    something wrong with what was written: retried without end, the journal
    keeps the job. An error that tells neither (a 5xx without a known body is a
    bare `Exception`) is judged by a probe write before any job is set aside."""
    import sqlite3

    import httpx
    from chromadb.errors import (
        AuthorizationError,
        ChromaAuthError,
        ChromaError,
        InternalError,
        QuotaError,
        RateLimitError,
        VersionMismatchError,
    )

    store_side = (
        OSError,  # a full disk too
        TimeoutError,
        httpx.TransportError,
        ChromaServerError,
        sqlite3.Error,  # busy, locked, disk I/O
        InternalError,  # what Chroma's Rust core says for SQLite and I/O failures
        VersionMismatchError,
        RateLimitError,
        QuotaError,
        AuthorizationError,
        ChromaAuthError,
    )
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, store_side):
            return True
        if isinstance(error, ChromaError) and error.code() >= 500:
            return True
        if isinstance(error, httpx.HTTPStatusError) and error.response.status_code >= 500:
            return True
        error = error.__cause__ or error.__context__
    return False
