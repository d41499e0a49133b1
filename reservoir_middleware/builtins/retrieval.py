"""The built-in retrieval plugins: semantic search and the recent window."""

from __future__ import annotations

import anyio.to_thread

from reservoir_middleware.context import Candidate, RetrievalQuery
from reservoir_middleware.hookspecs import hookimpl
from reservoir_middleware.records import MessageRecord, Scope
from reservoir_middleware.store import MemoryStore


class SemanticRetrieval:
    """Messages of the scope most similar to the last user message.

    Asks for more than `semantic_limit` (`RetrievalQuery.semantic_depth`) so
    that messages already in the request can be removed by the core and the
    section still fills up. Proposes references (ids): the core reads the
    messages that survive fusion.
    """

    name = "semantic"

    @hookimpl
    def reservoir_retrieve(
        self, query: RetrievalQuery, store: MemoryStore
    ) -> list[Candidate] | None:
        # plain (called in a worker thread): every read of the store blocks
        if query.embedding is None or query.semantic_limit <= 0:
            return None
        want = query.semantic_depth
        embedding = query.embedding
        candidates = [
            Candidate(reference(scope, id_), "semantic", similarity, self.name, False)
            for scope in query.search_scopes(store)
            for id_, similarity in store.nearest(scope, embedding, want)
            if similarity >= query.min_similarity
        ]
        candidates.sort(key=lambda c: c.score, reverse=True)
        return candidates


def reference(scope: Scope, id_: str) -> MessageRecord:
    """A stand-in for a stored message, for a `Candidate(..., resolved=False)`."""
    return MessageRecord(
        id=id_, partition=scope.partition, instance=scope.instance, role="", text=""
    )


class RecentRetrieval:
    """The last messages of the scope, oldest first."""

    name = "recent"

    @hookimpl
    async def reservoir_retrieve(
        self, query: RetrievalQuery, store: MemoryStore
    ) -> list[Candidate] | None:
        if query.recent_limit <= 0:
            return None
        stored = await anyio.to_thread.run_sync(store.recent, query.scope, query.recent_limit)
        known = {r.id for r in stored}
        fresh = [r for r in query.pending if r.id not in known]
        window = [*stored, *fresh][-query.recent_limit :]
        return [Candidate(r, "recent", float(i), self.name) for i, r in enumerate(window)]
