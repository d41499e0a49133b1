"""The connection under `ChromaStore`: the Chroma client (embedded, of the child
Chroma server, or of a server at `chroma_url`), restarted with the child when it
died, the collection handles, and which of Chroma's errors mean "the store is
down" (`store_down`).
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from chromadb.errors import NotFoundError

from reservoir_middleware._logs import log_failure
from reservoir_middleware._private import NewEntries, secure_data_dir
from reservoir_middleware.records import Scope
from reservoir_middleware.storage._child import (
    ChromaServer,
    ChromaServerError,
    release,
    shared_server,
)
from reservoir_middleware.storage._chroma_passages import MARK, VERSION
from reservoir_middleware.storage._chroma_rows import collection_name, passages_name
from reservoir_middleware.store import EmbeddingMismatch, Vectors

PROBE_COLLECTION = "reservoir-probe"  # no scope's (not `rsv-`): one vector, no text
CHILD_EMBED_MAX = 64  # texts per write embedded in the child; more (imports): by the engine
FALLBACK_BATCH = 1000  # records per upsert when the client cannot tell its limit
PASSAGES_RECHECK_S = 5.0  # a scope found without passages is asked again after this


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


class ChromaConnection:
    """One store's way to Chroma. `lock` guards the client and `collections`;
    the store guards its per-scope caches with the same lock, so that forgetting
    a scope drops its handle and its caches at once."""

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
        self.server: ChromaServer | None = None
        if chroma_url is None and chroma_process == "child":
            self.server = shared_server(data_dir, embed_threads=1 if child_embeddings else None)
            weakref.finalize(self, release, self.server)
        # HTTP clients (of the child or of `chroma_url`), closed when the store is
        # dropped or at exit: chromadb keeps them, and their sockets, alive until then
        self._opened: list[Any] = []
        weakref.finalize(self, _close_clients, self._opened)
        self.collections: dict[str, Any] = {}
        self.no_passages: dict[str, float] = {}  # scopes found without passages, and when
        self._max_batch: tuple[Any, int] | None = None  # (client, its batch limit)
        self.lock = threading.Lock()
        # Inline: what Chroma creates for a collection's first write, made 0600/0700 after it
        self._created: NewEntries | None = None
        self._written: set[str] = set()

    @property
    def client(self) -> Any:
        with self.lock:
            if self.server is not None and self._client is not None and not self.server.alive():
                _close_client(self._client)  # the child died: start it again, on a new port
                self._client = None
                self.collections.clear()
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> Any:
        if self.server is None:
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
        client = make_client(self.data_dir, self.server.start())
        self._opened.append(client)
        return client

    def close(self) -> None:
        """Close the connections to a Chroma server, and stop the child Chroma
        server if this store runs one (both open again on the next use)."""
        with self.lock:
            client, self._client = self._client, None
            self.collections.clear()
        if client is not None and not self.in_process:
            _close_client(client)
            with contextlib.suppress(ValueError):
                self._opened.remove(client)  # closed: not kept until the store is dropped
        if self.server is not None:
            self.server.stop()

    @property
    def in_process(self) -> bool:
        """Chroma runs in this process (it then holds the interpreter while it writes)."""
        return self.chroma_url is None and self.server is None

    @property
    def single_writer(self) -> bool:
        """Embedded mode: this process is the only writer, so caches stay true."""
        return self.chroma_url is None

    def embed(self, texts: list[str]) -> Vectors | None:
        """In the child process when it embeds (at its lower priority, one thread);
        None for a bulk import, which the engine embeds with all its threads."""
        server = self.server
        if server is None or not server.embed_threads or len(texts) > CHILD_EMBED_MAX:
            return None
        try:
            return server.embed(texts)
        except ChromaServerError as exc:
            log_failure("embedding in the memory's process failed; embedding here", exc)
            return None

    def collection(self, scope: Scope, *, create: bool = False) -> Any | None:
        name = collection_name(scope)
        cached = self.collections.get(name)
        if cached is not None and (self.server is None or self.server.alive()):
            return cached
        if create:
            col = self.client.get_or_create_collection(
                name,
                metadata={
                    "partition": scope.partition,
                    "instance": scope.instance,
                    "embedding_model": self.embedding_model,
                    "created": time.time(),
                    MARK: VERSION,  # its long messages have their passages
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
        self.collections[name] = col
        return col

    def passages(self, scope: Scope, *, create: bool = False) -> Any | None:
        """The collection of the scope's passages (`_chroma_rows.PASSAGES_PREFIX`);
        None when it has none, or only of another embedding model (a replay
        that stopped half way: they are made again)."""
        name = passages_name(scope)
        cached = self.collections.get(name)
        if cached is not None and (self.server is None or self.server.alive()):
            return cached
        missed = self.no_passages.get(name)
        if not create and missed is not None and time.monotonic() - missed < PASSAGES_RECHECK_S:
            return None  # most scopes have none: not asked again on every read and write
        if create:
            metadata = {"embedding_model": self.embedding_model, "hnsw:space": "cosine"}
            col = self.client.get_or_create_collection(
                name, metadata=metadata, embedding_function=None
            )
        else:
            try:
                col = self.client.get_collection(name, embedding_function=None)
            except NotFoundError:
                self.no_passages[name] = time.monotonic()
                return None
        self.no_passages.pop(name, None)
        if (col.metadata or {}).get("embedding_model") != self.embedding_model:
            return None
        self.collections[name] = col
        return col

    def written(self, name: str) -> None:
        """After a write to the collection `name`: inline, its first write made its
        vector index files with the app's umask, so they are tightened then."""
        if self._created is not None and name not in self._written:
            self._written.add(name)
            self._created.check()

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
