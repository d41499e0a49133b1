"""A scope's passages in Chroma (`memory._passages`): the vectors of what the
embedding model does not read of a long message, in a sibling collection of
the scope's (`_chroma_rows.passages_name`), made at its first long message.

Rows hold no text: an id `<message id>#<n>`, a vector and {"message": id}.
They are written before their messages (a write that fails in between is
retried whole) and replace what the messages had; the scope's delete erases
them first (`ChromaStore.reservoir_delete`). A scope made since passages exist
says so in its metadata (`MARK`); one filled before gets them from a replay
(`reservoir replay`, `Storage.reembed`: `backfill`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from chromadb.errors import NotFoundError

from reservoir_middleware.memory import _passages
from reservoir_middleware.memory._passages import passages_of
from reservoir_middleware.memory.embeddings import as_floats
from reservoir_middleware.records import MessageRecord, Scope, embedding_text
from reservoir_middleware.storage import _chroma_rows as rows
from reservoir_middleware.storage._chroma_rows import _record, collection_name, passages_name
from reservoir_middleware.store import PAGE, Embedder, Passages

if TYPE_CHECKING:
    from reservoir_middleware.storage._chroma_client import ChromaConnection

MARK = "passages"  # metadata of a scope's collection: every long message has its passages
VERSION = 1  # of the cut (`memory._passages`); another makes a replay cut them again


def write(
    conn: ChromaConnection,
    scope: Scope,
    records: list[MessageRecord],
    passages: Passages | None,
    step: int,
) -> tuple[list[str], list[list[float]]]:
    """Replace the passages of these messages; the passages' messages and vectors
    (for the in-memory index)."""
    ids = [r.id for r in records]
    given = passages if passages is not None else [[] for _ in records]
    pcol = conn.passages(scope, create=any(given))
    if pcol is None:
        return [], []
    for start in range(0, len(ids), step):  # what a message written again had
        pcol.delete(where={"message": {"$in": ids[start : start + step]}})
    passage_ids, vectors, metas = rows.passage_rows(ids, given)
    for start in range(0, len(passage_ids), step):
        pcol.upsert(
            ids=passage_ids[start : start + step],
            embeddings=vectors[start : start + step],
            metadatas=metas[start : start + step],
        )
    conn.written(passages_name(scope))
    return [m["message"] for m in metas], vectors


def nearest(
    conn: ChromaConnection, scope: Scope, col: Any, embedding: Sequence[float], limit: int
) -> list[tuple[str, float]]:
    """From Chroma: the nearest messages, each by the best of its vectors."""
    found = rows.nearest(col, embedding, limit)
    pcol = conn.passages(scope)
    if pcol is None:
        return found
    return rows.best_of(
        found, _discounted(rows.nearest_passages(pcol, embedding, limit)), limit=limit
    )


def query(
    conn: ChromaConnection, scope: Scope, col: Any, embedding: Sequence[float], limit: int
) -> list[tuple[MessageRecord, float]]:
    """As `nearest`, with the records (those found by a passage only are read)."""
    found = rows.query(col, embedding, limit)
    pcol = conn.passages(scope)
    if pcol is None:
        return found
    near = _discounted(rows.nearest_passages(pcol, embedding, limit))
    best = rows.best_of([(r.id, sim) for r, sim in found], near, limit=limit)
    records = {r.id: r for r, _ in found}
    missing = [i for i, _ in best if i not in records]
    records.update((r.id, r) for r in (rows.by_ids(col, missing) if missing else []))
    return [(records[i], sim) for i, sim in best if i in records]


def _discounted(hits: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    return [(id_, sim - _passages.PASSAGE_DISCOUNT) for id_, sim in hits]


def unmarked(metadata: dict[str, Any]) -> dict[str, Any]:
    """A scope collection's metadata without the mark (its vectors are remade),
    nor what Chroma refuses to be given again (`hnsw:`)."""
    return {k: v for k, v in metadata.items() if k != MARK and not k.startswith("hnsw:")}


def drop(client: Any, scope: Scope) -> None:
    """Forget the scope's passages (made with another model: a replay remakes them)."""
    with contextlib.suppress(NotFoundError):
        client.delete_collection(passages_name(scope))


def backfill(client: Any, scope: Scope, embedder: Embedder, model: str) -> int:
    """Passages for every long message of a scope not marked as having them
    (filled before passages existed, or re-embedded); returns how many messages
    got some. Redone whole after an interruption: the mark comes last."""
    col = client.get_collection(collection_name(scope), embedding_function=None)
    metadata = dict(col.metadata or {})
    if metadata.get(MARK) == VERSION:
        return 0
    drop(client, scope)
    pcol = None
    done = offset = 0
    while True:
        page = col.get(limit=PAGE, offset=offset, include=["documents", "metadatas"])
        if not page["ids"]:
            break
        offset += len(page["ids"])
        records = [
            _record(i, d, m)
            for i, d, m in zip(page["ids"], page["documents"], page["metadatas"], strict=True)
        ]
        cut = passages_of(embedder, [embedding_text(r) for r in records])
        pieces = [p for passages in cut for p in passages]
        if pieces:
            vectors = iter([as_floats(v) for v in embedder(pieces)])
            given = [[next(vectors) for _ in passages] for passages in cut]
            if pcol is None:
                pcol = client.get_or_create_collection(
                    passages_name(scope),
                    metadata={"embedding_model": model, "hnsw:space": "cosine"},
                    embedding_function=None,
                )
            ids, flat, metas = rows.passage_rows([r.id for r in records], given)
            step = _max_batch(client)
            for start in range(0, len(ids), step):
                end = start + step
                pcol.upsert(
                    ids=ids[start:end], embeddings=flat[start:end], metadatas=metas[start:end]
                )
            done += sum(1 for passages in cut if passages)
    col.modify(metadata={**unmarked(metadata), MARK: VERSION})
    return done


def _max_batch(client: Any) -> int:
    """Rows Chroma takes in one call (as `ChromaConnection.max_batch`)."""
    try:
        size = int(client.get_max_batch_size())
    except Exception:
        size = -1
    return size if size > 0 else 1000
