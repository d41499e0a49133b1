"""The read side of memory that retrieval plugins and the engine rely on.

Methods are synchronous and may block: callers run them in worker threads.
The built-in implementation is `builtins.chroma_store.ChromaStore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .records import MessageRecord, Scope


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
