"""What memory asks of a store: the read side retrieval plugins use (`MemoryStore`)
and the whole boundary the engine is typed against (`Storage`).

Methods are synchronous and may block: callers run them in worker threads.
The built-in implementation is `storage.chroma.ChromaStore`; `storage.inmemory.
InMemoryStore` is a second one, for tests and for trying plugins without Chroma.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from reservoir_middleware.records import MessageRecord, Scope

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

# The next sequence number of a scope, its last message and that message's embedding.
Tail = tuple[int, MessageRecord | None, list[float] | None]
# A page of records with their embeddings (None when not asked for).
Page = list[tuple[MessageRecord, list[float] | None]]
# What an embedding function returns: a vector per text (floats or a numpy array;
# Chroma types its functions as giving float32 or int32 arrays).
Vectors = Sequence["Sequence[float] | NDArray[np.number[Any]]"]
Embedder = Callable[[list[str]], Vectors]
# Per record of a write, the vectors of its passages (what of a long message the
# embedding model does not read: `memory._passages`); empty for most.
Passages = list[list[list[float]]]
# Told how many more messages are done (a progress bar).
Progress = Callable[[int], None]
PAGE = 256  # records per page of `Storage.pages`, unless asked otherwise


@dataclass(frozen=True)
class ScopeStats:
    """One scope as the store has it (`reservoir stats`)."""

    scope: Scope
    messages: int
    # what its vectors were made with, as stored (a replay changes it); None: unknown
    embedding_model: str | None


@dataclass(frozen=True)
class Location:
    """Where a store keeps memory, for people: `reservoir stats` shows it."""

    description: str  # e.g. "embedded Chroma in /var/lib/reservoir"
    disk_bytes: int | None  # what it takes on this machine's disk; None: not here


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
        """Like `query`, but only the ids with their cosine similarity (cheaper).

        Both score a message by the best of its own vector and its passages'
        (`Storage.reservoir_store`), and give each message once."""
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
        """Messages that contain at least one of `terms` as a case-sensitive
        substring (Chroma's `$contains`), at most `limit`, unranked."""
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

    def reservoir_store(
        self,
        scope: Scope,
        records: list[MessageRecord],
        embeddings: list[list[float]],
        passages: Passages | None = None,
    ) -> None:
        """The `reservoir_store` hook: write new messages of one scope, numbered
        and linked by the engine, one embedding each, and the vectors of each
        one's passages (an id stored already is replaced, passages included).
        Passages are never messages: not counted, listed, paged nor read by id;
        they only lift their message in `query` and `nearest`. Raising fails
        the write: it is kept and tried again."""
        ...

    def reservoir_delete(self, scope: Scope) -> None:
        """The `reservoir_delete` hook: forget a scope for good; raising fails the delete."""
        ...

    def remove_messages(self, scope: Scope, ids: Sequence[str]) -> list[MessageRecord]:
        """Forget these messages of a scope for good (a retention sweep, `Reservoir.
        forget`): their text, vectors and passages, with no trace left where the
        store keeps its data (as `reservoir_delete` leaves none); the others stay
        as they are (links to a removed id are left: reads by id leave it out).
        Returns the records it held, as they were, in the order asked; a scope
        left empty is deleted. Raising may leave some removed: call it again."""
        ...

    def expired(self, scope: Scope, before: float) -> list[str]:
        """The ids of the scope's messages whose `timestamp` is older than `before`
        (seconds since 1970): what retention removes."""
        ...

    def tail(self, scope: Scope) -> Tail:
        """The next sequence number, the last message and its embedding."""
        ...

    def traces_present(self, scope: Scope, trace_ids: Sequence[str]) -> set[str]:
        """Which of these trace ids some stored message carries (a retried write)."""
        ...

    def forget(self, scope: Scope) -> None:
        """Drop what is cached of a scope (deleted, or found stale)."""
        ...

    def unavailable(self, error: BaseException) -> bool:
        """The failure is the store's (unreachable, busy, full), not the written
        data's: the write is retried without end and the journal keeps it, where
        a job that fails with the store up is set aside after a few tries."""
        ...

    def embed(self, texts: list[str]) -> Vectors | None:
        """Embeddings of texts to write, when the store computes them more cheaply
        than the engine would (in its own process); None: the engine embeds."""
        ...

    # -- maintenance (off the request path: the CLI and the admin endpoints) -------

    def pages(self, scope: Scope, *, embeddings: bool = False, size: int = PAGE) -> Iterator[Page]:
        """Every record of a scope, oldest first (by seq), a page at a time: an
        export or a copy does not hold a whole scope in memory twice."""
        ...

    def describe(self) -> Location:
        """Where the memory lives and what it takes on disk."""
        ...

    def scope_stats(self) -> list[ScopeStats]:
        """Every scope with its message count and the embedding model it was stored
        with (which may differ from the configured one: then reads of it fail)."""
        ...

    def reembed(self, embedder: Embedder, model: str, progress: Progress | None = None) -> int:
        """Give every scope not embedded with `model` new vectors from `embedder`
        (the text of `records.embedding_text`), and passages as `embedder` cuts
        them (`memory._passages.passages_of`); returns how many messages got them.

        Resumable: an interruption leaves every scope readable with one model or
        the other, and the next run finishes the work without redoing what was done.
        """
        ...
