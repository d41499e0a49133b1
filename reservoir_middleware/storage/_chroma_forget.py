"""Forgetting single messages of a scope in Chroma without a trace on disk.

Chroma deleting a row leaves its text in the free pages of `chroma.sqlite3`
(and its write-ahead log) and its vector in the scope's HNSW files. So the
scope is rebuilt without those messages: the other rows (text, metadata and
embedding as stored) and their passages are copied into side collections,
the old collections are erased and deleted as a scope delete does
(`_scrub.erase`, then their index directories go), and the side collections
are renamed into place; last, `chroma.sqlite3` is rewritten with its live
rows only (`_scrub.compact`, a VACUUM): Chroma's own deletes, of its write
queue for one, leave bytes in pages still in use. The cost follows the
scope's size, then the file's.

An interruption leaves either the old collections (the side ones, partial,
are dropped by the next rebuild of the scope) or the side ones alone (the
next rebuild, or `finish`, renames them into place). Meanwhile, between the
delete and the rename, the scope reads as empty.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chromadb.errors import NotFoundError

from reservoir_middleware.memory._blocks import without_ids
from reservoir_middleware.records import MessageRecord, Scope
from reservoir_middleware.storage import _chroma_rows as rows
from reservoir_middleware.storage._chroma_rows import (
    COLLECTION_PREFIX,
    collection_name,
    passages_name,
)
from reservoir_middleware.storage._scrub import compact, erase, remove_segments
from reservoir_middleware.store import PAGE

SIDE_PREFIX = "rsvfgt-"  # not COLLECTION_PREFIX: a rebuild under way is no scope
SIDE_PASSAGES_PREFIX = "rsvfgp-"


def _names(scope: Scope) -> tuple[str, str, str, str]:
    name = collection_name(scope)
    suffix = name[len(COLLECTION_PREFIX) :]
    return name, passages_name(scope), SIDE_PREFIX + suffix, SIDE_PASSAGES_PREFIX + suffix


def _get(client: Any, name: str) -> Any | None:
    try:
        return client.get_collection(name, embedding_function=None)
    except NotFoundError:
        return None


def drop(client: Any, data_dir: Path | None, name: str) -> None:
    """Delete a collection, erased from the disk first when it is ours (embedded)."""
    col = _get(client, name)
    if col is None:
        return
    segments = erase(data_dir, str(col.id)) if data_dir is not None else []
    with contextlib.suppress(NotFoundError):
        client.delete_collection(name)
    if data_dir is not None:
        remove_segments(data_dir, segments)


def finish(client: Any, data_dir: Path | None, scope: Scope) -> None:
    """Complete or undo a rebuild of the scope that was interrupted."""
    name, pname, side, pside = _names(scope)
    if _get(client, side) is not None:
        if _get(client, name) is not None:  # copied in part: the old one still holds all
            drop(client, data_dir, side)
            drop(client, data_dir, pside)
            return
        client.get_collection(side, embedding_function=None).modify(name=name)
    if _get(client, pside) is not None:
        drop(client, data_dir, pname)  # (erased already, unless the crash came first)
        client.get_collection(pside, embedding_function=None).modify(name=pname)


def _metadata(col: Any) -> dict[str, Any]:
    kept = {k: v for k, v in (col.metadata or {}).items() if not k.startswith("hnsw:")}
    return {**kept, "hnsw:space": "cosine"}


def _copy(
    source: Any, target: Any, skip: Any, step: int, *, documents: bool, gone: set[str]
) -> None:
    """Every row of `source` that `skip(id, metadata)` refuses, as stored, but
    for the memory blocks that showed one of `gone`."""
    include = ["metadatas", "embeddings", *(["documents"] if documents else [])]
    offset = 0
    while True:
        page = source.get(limit=PAGE, offset=offset, include=include)
        if not page["ids"]:
            break
        offset += len(page["ids"])
        metas = [dict(m or {}) for m in page["metadatas"]]
        keep = [i for i, id_ in enumerate(page["ids"]) if not skip(id_, metas[i])]
        for meta in metas:  # the blocks that showed them forget them too
            if meta.get("memory"):
                shown = without_ids(meta["memory"], gone)
                if shown is None:
                    del meta["memory"]
                else:
                    meta["memory"] = shown
        for start in range(0, len(keep), step):
            part = keep[start : start + step]
            target.add(
                ids=[page["ids"][i] for i in part],
                embeddings=[[float(x) for x in page["embeddings"][i]] for i in part],
                metadatas=[metas[i] for i in part],
                **({"documents": [page["documents"][i] for i in part]} if documents else {}),
            )


def rebuild_without(
    client: Any, data_dir: Path | None, scope: Scope, ids: Sequence[str], step: int
) -> list[MessageRecord]:
    """Rebuild the scope without the messages `ids` (and their passages);
    returns those it held, as they were. `data_dir`: embedded Chroma's (erase the old
    collections' bytes), None for a Chroma server. A scope left empty is
    deleted whole."""
    finish(client, data_dir, scope)
    name, pname, side, pside = _names(scope)
    source = _get(client, name)
    if source is None or not ids:
        return []
    asked = list(dict.fromkeys(ids))
    found = {r.id: r for r in rows.by_ids(source, asked)}
    present = [found[i] for i in asked if i in found]  # in the order asked
    if not present:
        return []
    gone = set(found)
    if source.count() > len(gone):
        target = client.create_collection(side, metadata=_metadata(source), embedding_function=None)
        _copy(source, target, lambda id_, _m: id_ in gone, step, documents=True, gone=gone)
        psource = _get(client, pname)
        if psource is not None:
            ptarget = client.create_collection(
                pside, metadata=_metadata(psource), embedding_function=None
            )
            _copy(
                psource,
                ptarget,
                lambda _i, m: m.get("message") in gone,
                step,
                documents=False,
                gone=gone,
            )
    drop(client, data_dir, name)  # first: its side copy is then the whole truth
    drop(client, data_dir, pname)
    finish(client, data_dir, scope)
    if data_dir is not None:  # what Chroma's own deletes left in pages in use
        compact(data_dir)
    return present
