"""What memory asks of a store: the read side retrieval plugins use (`MemoryStore`)
and the whole boundary the engine is typed against (`Storage`).

Methods are synchronous and may block: callers run them in worker threads.
The built-in implementation is `storage.chroma.ChromaStore`; `storage.inmemory.
InMemoryStore` is a second one, for tests and for trying plugins without Chroma.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from reservoir_middleware.records import MessageRecord, Scope

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

# The next sequence number of a scope, its last message and that message's embedding.
Tail = tuple[int, MessageRecord | None, list[float] | None]
# A page of records with their embeddings (None when not asked for).
Page = list[tuple[MessageRecord, list[float] | None]]
# What an embedding function returns: a vector per text (floats or a numpy array).
Vectors = Sequence["Sequence[float] | NDArray[np.floating[Any]]"]
Embedder = Callable[[list[str]], Vectors]


class EmbeddingMismatch(RuntimeError):
    """A scope was embedded with another model than the one configured."""


@runtime_checkable
class MemoryStore(Protocol):
    embedding_model: str

    def query(
        self, scope: Scope, embedding: Sequence[float], limit: int
    ) -> list[tuple[MessageRecord, float]]:
        """Nearest messages of a scope with their cosine similarity, best first."""
        ...

    def recent(self, scope: Scope, limit: int) -> list[MessageRecord]:
        """The last `limit` messages of a scope, oldest first."""
        ...

    def get(self, scope: Scope, ids: Sequence[str]) -> list[MessageRecord]:
        """The messages with these ids (missing ones are left out)."""
        ...

    def nearest(
        self, scope: Scope, embedding: Sequence[float], limit: int
    ) -> list[tuple[str, float]]:
        """Like `query`, but only the ids with their cosine similarity (cheaper)."""
        ...

    def documents(
        self, scope: Scope, offset: int, limit: int, min_seq: int | None = None
    ) -> list[tuple[str, str]]:
        """A page of the scope's (id, text) pairs: every message once over all
        offsets, in a stable order (for indexes kept beside the store); with
        `min_seq`, only the messages numbered from there on."""
        ...

    def existing_ids(self, scope: Scope, ids: Sequence[str]) -> set[str]: ...

    def keyword(self, scope: Scope, terms: Sequence[str], limit: int) -> list[MessageRecord]:
        """Messages that contain at least one of `terms` (unranked)."""
        ...

    def scopes(self, partition: str | None = None) -> list[Scope]: ...

    def count(self, scope: Scope) -> int: ...


@runtime_checkable
class Storage(MemoryStore, Protocol):
    """Everything the engine asks of its store, read and write.

    The store is also a plugin: it implements `reservoir_store` and
    `reservoir_delete`, and a failure of the plugin called `name` fails the
    write (other store plugins only log theirs).
    """

    name: str

    # -- what the engine may count on -------------------------------------------

    @property
    def in_process(self) -> bool:
        """Writes run in this process and hold the interpreter while they do: the
        write lane then waits for a quiet moment between requests."""
        ...

    @property
    def single_writer(self) -> bool:
        """Only this process writes to the store: no lock across processes needed."""
        ...

    # -- life cycle ---------------------------------------------------------------

    def open(self) -> None:
        """Connect now (start what the store runs in); raises when it is unreachable."""
        ...

    def close(self) -> None:
        """Let go of connections and child processes; the next use opens them again."""
        ...

    def probe(self) -> None:
        """A write of nothing of anyone's; raises only when the store refuses writes."""
        ...

    # -- the write path -------------------------------------------------------------

    def tail(self, scope: Scope) -> Tail:
        """The next sequence number, the last message and its embedding."""
        ...

    def traces_present(self, scope: Scope, trace_ids: Sequence[str]) -> set[str]:
        """Which of these trace ids some stored message carries (a retried write)."""
        ...

    def forget(self, scope: Scope) -> None:
        """Drop what is cached of a scope (deleted, or found stale)."""
        ...

    def embed(self, texts: list[str]) -> Vectors | None:
        """Embeddings of texts to write, when the store computes them more cheaply
        than the engine would (in its own process); None: the engine embeds."""
        ...
