"""The Chroma side of maintenance (`storage.maintenance`): paging a scope,
stats, and re-embedding every scope with another model (a replay).

Off the request path: these read the collections directly, not through the
store's caches, and run in a worker thread or a command-line process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chromadb.errors import NotFoundError

from reservoir_middleware.records import Scope, embedding_text
from reservoir_middleware.storage._chroma_passages import drop, unmarked
from reservoir_middleware.storage._chroma_rows import COLLECTION_PREFIX, _record, collection_name
from reservoir_middleware.store import PAGE, Embedder, Location, Page, Progress, ScopeStats

REPLAY_PREFIX = "rsvtmp-"  # not COLLECTION_PREFIX: an unfinished replay is not a scope


def disk_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue
    return total


def describe(data_dir: Path, chroma_url: str | None) -> Location:
    if chroma_url is not None:
        return Location(f"Chroma server {chroma_url}", None)
    return Location(f"embedded Chroma in {data_dir}", disk_bytes(data_dir))


def scope_stats(client: Any, scopes: list[Scope]) -> list[ScopeStats]:
    rows = []
    for scope in scopes:
        col = client.get_collection(collection_name(scope), embedding_function=None)
        model = (col.metadata or {}).get("embedding_model")
        rows.append(ScopeStats(scope, int(col.count()), model))
    return rows


def pages(client: Any, scope: Scope, *, embeddings: bool, size: int) -> Iterator[Page]:
    """Every record of a scope, oldest first, a page at a time (none if it is gone)."""
    try:
        col = client.get_collection(collection_name(scope), embedding_function=None)
    except NotFoundError:
        return
    include = ["documents", "metadatas", "embeddings"] if embeddings else ["documents", "metadatas"]
    rows: Page = []
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


def finish_swaps(client: Any) -> None:
    """Swap in the side collections a replay copied whole but did not rename."""
    names = {c.name for c in client.list_collections()}
    for name in names:
        if name.startswith(REPLAY_PREFIX):
            source = COLLECTION_PREFIX + name[len(REPLAY_PREFIX) :]
            if source not in names:
                client.get_collection(name, embedding_function=None).modify(name=source)


def copy_with_new_vectors(
    client: Any, scope: Scope, embedder: Embedder, model: str, progress: Progress | None
) -> int:
    """Copy a scope into its side collection with new vectors, then swap it in."""
    source_name = collection_name(scope)
    source = client.get_collection(source_name, embedding_function=None)
    if (source.metadata or {}).get("embedding_model") == model:
        return 0
    side_name = REPLAY_PREFIX + source_name[len(COLLECTION_PREFIX) :]
    # its passages are made anew once it is swapped in (`_chroma_passages.backfill`)
    metadata = {**unmarked(source.metadata or {}), "embedding_model": model}
    metadata["hnsw:space"] = "cosine"
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
        vectors = embedder([embedding_text(_record(i, d, m)) for i, d, m in rows])
        side.add(
            ids=[r[0] for r in rows],
            documents=[r[1] for r in rows],
            metadatas=[r[2] for r in rows],
            embeddings=[[float(x) for x in v] for v in vectors],
        )
        done += len(rows)
        if progress is not None:
            progress(len(rows))
    drop(client, scope)  # of the old model
    client.delete_collection(source_name)
    side.modify(name=source_name)
    return done
