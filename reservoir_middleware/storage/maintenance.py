"""Work on stored memory that is not on the request path: import, stats, replay, links.

Used by the `reservoir` command and the admin endpoints; runs on the same
engine and settings as the middleware.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread

from reservoir_middleware.engine import Reservoir, embedding_text
from reservoir_middleware.memory.embeddings import make_embedding_function
from reservoir_middleware.records import MessageRecord, Scope
from reservoir_middleware.storage.chroma import (
    COLLECTION_PREFIX,
    ChromaStore,
    _record,
    collection_name,
)

REPLAY_PREFIX = "rsvtmp-"  # not COLLECTION_PREFIX: an unfinished replay is not a scope
PAGE = 256

Progress = Callable[[int], None]


async def linked(reservoir: Reservoir, records: Sequence[MessageRecord]) -> list[MessageRecord]:
    """The synapse neighbours of `records` (consecutive messages similar enough to link)."""
    out: list[MessageRecord] = []
    for record in records:
        ids = [i for i in (record.before_id, record.after_id) if i]
        around = await anyio.to_thread.run_sync(reservoir.store.get, record.scope, ids)
        out += [r for r in around if (r.id == record.synapse_prev) or (r.synapse_prev == record.id)]
    return out


def disk_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue
    return total


def stats(reservoir: Reservoir) -> dict[str, Any]:
    store = reservoir.store
    rows = []
    for scope in store.scopes():
        col = _chroma(reservoir).client.get_collection(
            collection_name(scope), embedding_function=None
        )
        rows.append(
            {
                "partition": scope.partition,
                "instance": scope.instance,
                "messages": int(col.count()),
                "embedding_model": (col.metadata or {}).get("embedding_model"),
            }
        )
    settings = reservoir.settings
    embedded = settings.chroma_url is None
    return {
        "storage": f"Chroma server {settings.chroma_url}"
        if not embedded
        else f"embedded Chroma in {settings.data_dir}",
        "disk_bytes": disk_bytes(settings.data_dir) if embedded else None,
        "embedding_model": reservoir.embedding_model,
        "messages": sum(r["messages"] for r in rows),
        "dead_letters": reservoir.dead_letters.count(),
        "scopes": rows,
    }


async def replay(reservoir: Reservoir, spec: str, progress: Progress | None = None) -> int:
    """Re-embed every scope with another embedding model; resumable.

    Each scope is copied into a side collection with the new vectors, then
    swapped in; after an interruption, the next run skips what was copied and
    finishes any swap left half done.
    """
    settings = reservoir.settings
    embedder, model = make_embedding_function(
        spec,
        url=settings.embedding_url,
        api_key=settings.embedding_api_key,
        threads=settings.embedding_threads,
    )
    client = _chroma(reservoir).client
    await anyio.to_thread.run_sync(_finish_swaps, client)
    done = 0
    for scope in await anyio.to_thread.run_sync(reservoir.store.scopes):
        done += await _replay_scope(reservoir, scope, embedder, model, progress)
    return done


def _finish_swaps(client: Any) -> None:
    names = {c.name for c in client.list_collections()}
    for name in names:
        if name.startswith(REPLAY_PREFIX):
            source = COLLECTION_PREFIX + name[len(REPLAY_PREFIX) :]
            if source not in names:
                client.get_collection(name, embedding_function=None).modify(name=source)


async def _replay_scope(
    reservoir: Reservoir, scope: Scope, embedder: Any, model: str, progress: Progress | None
) -> int:
    done = await anyio.to_thread.run_sync(
        _copy_with_new_vectors, _chroma(reservoir).client, scope, embedder, model, progress
    )
    reservoir.store.forget(scope)
    return done


def _copy_with_new_vectors(
    client: Any, scope: Scope, embedder: Any, model: str, progress: Progress | None
) -> int:
    """Copy a scope into its side collection with new vectors, then swap it in."""
    source_name = collection_name(scope)
    source = client.get_collection(source_name, embedding_function=None)
    if (source.metadata or {}).get("embedding_model") == model:
        return 0
    side_name = REPLAY_PREFIX + source_name[len(COLLECTION_PREFIX) :]
    metadata = {**(source.metadata or {}), "embedding_model": model}
    side = client.get_or_create_collection(side_name, metadata=metadata, embedding_function=None)
    copied = set(side.get(include=[])["ids"])
    done = offset = 0
    while True:
        page = source.get(limit=PAGE, offset=offset, include=["documents", "metadatas"])
        if not page["ids"]:
            break
        offset += len(page["ids"])
        rows = [
            (i, d or "", {**(m or {}), "embedding_model": model})
            for i, d, m in zip(page["ids"], page["documents"], page["metadatas"], strict=True)
            if i not in copied
        ]
        if not rows:
            continue
        vectors = embedder([_text_of(i, d, m) for i, d, m in rows])
        side.add(
            ids=[r[0] for r in rows],
            documents=[r[1] for r in rows],
            metadatas=[r[2] for r in rows],
            embeddings=[[float(x) for x in v] for v in vectors],
        )
        done += len(rows)
        if progress is not None:
            progress(len(rows))
    client.delete_collection(source_name)
    side.modify(name=source_name)
    return done


def _text_of(id_: str, document: str, metadata: dict[str, Any]) -> str:
    return embedding_text(_record(id_, document, metadata))


def pages(
    reservoir: Reservoir, scope: Scope, *, embeddings: bool = False, size: int = PAGE
) -> Iterator[list[tuple[MessageRecord, list[float] | None]]]:
    """Every record of a scope, oldest first, a page at a time (blocking; use a thread)."""
    col = _chroma(reservoir).client.get_collection(collection_name(scope), embedding_function=None)
    include = ["documents", "metadatas", "embeddings"] if embeddings else ["documents", "metadatas"]
    rows: list[tuple[MessageRecord, list[float] | None]] = []
    offset = 0
    while True:
        page = col.get(limit=size, offset=offset, include=include)
        if not page["ids"]:
            break
        offset += len(page["ids"])
        vectors = page.get("embeddings") if embeddings else None
        for index, (id_, doc, meta) in enumerate(
            zip(page["ids"], page["documents"], page["metadatas"], strict=True)
        ):
            vector = [float(x) for x in vectors[index]] if vectors is not None else None
            rows.append((_record(id_, doc, meta), vector))
    rows.sort(key=lambda row: (row[0].seq, row[0].timestamp))
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _chroma(reservoir: Reservoir) -> ChromaStore:
    store = reservoir.store
    if not isinstance(store, ChromaStore):
        raise TypeError(f"this works on Chroma only, not on {type(store).__name__}")
    return store
