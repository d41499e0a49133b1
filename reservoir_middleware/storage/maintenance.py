"""Work on stored memory that is not on the request path: stats, replay, links.

Used by the `reservoir` command; each takes the store (any `Storage`) and what
else it needs, never the engine: what must go through the write path (an
import) is the engine's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio.to_thread

from reservoir_middleware.memory.embeddings import make_embedding_function
from reservoir_middleware.records import MessageRecord
from reservoir_middleware.settings import ReservoirSettings
from reservoir_middleware.store import MemoryStore, Progress, Storage


async def linked(store: MemoryStore, records: Sequence[MessageRecord]) -> list[MessageRecord]:
    """The synapse neighbours of `records` (consecutive messages similar enough to link)."""
    out: list[MessageRecord] = []
    for record in records:
        ids = [i for i in (record.before_id, record.after_id) if i]
        around = await anyio.to_thread.run_sync(store.get, record.scope, ids)
        out += [r for r in around if (r.id == record.synapse_prev) or (r.synapse_prev == record.id)]
    return out


def stats(store: Storage, *, dead_letters: int) -> dict[str, Any]:
    """What `reservoir stats` shows (blocking; use a thread); `dead_letters`: how
    many exchanges the store refused are set aside."""
    rows = [
        {
            "partition": row.scope.partition,
            "instance": row.scope.instance,
            "messages": row.messages,
            "embedding_model": row.embedding_model,
        }
        for row in store.scope_stats()
    ]
    where = store.describe()
    return {
        "storage": where.description,
        "disk_bytes": where.disk_bytes,
        "embedding_model": store.embedding_model,
        "messages": sum(r["messages"] for r in rows),
        "dead_letters": dead_letters,
        "scopes": rows,
    }


async def replay(
    store: Storage, settings: ReservoirSettings, spec: str, progress: Progress | None = None
) -> int:
    """Re-embed every scope with the embedding `spec` names (reached as `settings`
    say); resumable (`Storage.reembed`). Returns how many messages were re-embedded."""
    embedder, model = make_embedding_function(
        spec,
        url=settings.embedding_url,
        api_key=settings.embedding_api_key,
        threads=settings.embedding_threads,
    )
    return await anyio.to_thread.run_sync(store.reembed, embedder, model, progress)
