"""How a message record is kept in Chroma: one collection per scope (named by a
hash of the scope), the text as the document, the other fields as metadata;
and the questions `ChromaStore` asks a collection when its caches cannot answer."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from reservoir_middleware.records import MessageRecord, Scope
from reservoir_middleware.store import Tail

COLLECTION_PREFIX = "rsv-"
# A scope's passages (`memory._passages`): a sibling collection, made at its first
# long message, of vectors only (no text), id `<message id>#<n>`, metadata
# {"message": id}; not COLLECTION_PREFIX: it is no scope.
PASSAGES_PREFIX = "rsvpas-"
PASSAGE_DEPTH = 3  # passages asked for per message wanted (several may be one message's)
_RECORD_FIELDS = {f.name for f in fields(MessageRecord)}


def collection_name(scope: Scope) -> str:
    return (
        COLLECTION_PREFIX
        + hashlib.sha256(scope.key.encode("utf-8", "surrogatepass")).hexdigest()[:48]
    )


def passages_name(scope: Scope) -> str:
    return PASSAGES_PREFIX + collection_name(scope)[len(COLLECTION_PREFIX) :]


def passage_rows(
    ids: Sequence[str], passages: Sequence[Sequence[Sequence[float]]]
) -> tuple[list[str], list[list[float]], list[dict[str, Any]]]:
    """Ids, vectors and metadata of the passages of messages `ids`, numbered from 1."""
    out_ids: list[str] = []
    vectors: list[list[float]] = []
    metas: list[dict[str, Any]] = []
    for id_, vectors_of in zip(ids, passages, strict=True):
        for n, vector in enumerate(vectors_of, start=1):
            out_ids.append(f"{id_}#{n}")
            vectors.append([float(x) for x in vector])
            metas.append({"message": id_})
    return out_ids, vectors, metas


def best_of(*hits: Sequence[tuple[str, float]], limit: int) -> list[tuple[str, float]]:
    """Each message once, with its best similarity, best first."""
    best: dict[str, float] = {}
    for found in hits:
        for id_, similarity in found:
            if similarity > best.get(id_, -2.0):
                best[id_] = similarity
    return sorted(best.items(), key=lambda item: -item[1])[:limit]


def _metadata(record: MessageRecord) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in record.to_dict().items():
        if key in ("id", "text") or value is None:
            continue
        meta[key] = json.dumps(value, ensure_ascii=False) if key == "tool_calls" else value
    return meta


def _record(id_: str, text: str | None, meta: dict[str, Any] | None) -> MessageRecord:
    data = {k: v for k, v in (meta or {}).items() if k in _RECORD_FIELDS}
    if isinstance(data.get("tool_calls"), str):
        data["tool_calls"] = json.loads(data["tool_calls"])
    data.setdefault("partition", "")
    data.setdefault("instance", "")
    data.setdefault("role", "user")
    return MessageRecord(id=id_, text=text or "", **data)


def _records(result: Any) -> list[MessageRecord]:
    return sorted(_records_in_order(result), key=lambda r: r.seq)


def _records_in_order(result: Any) -> list[MessageRecord]:
    """The records of a `get` result in its own order (that of its embeddings)."""
    docs = result.get("documents") or [None] * len(result["ids"])
    metas = result.get("metadatas") or [None] * len(result["ids"])
    return [_record(i, d, m) for i, d, m in zip(result["ids"], docs, metas, strict=True)]


def scopes(collections: Sequence[Any], partition: str | None) -> list[Scope]:
    """The scopes (of `partition` if given) whose collections these are."""
    out = []
    for col in collections:
        meta = col.metadata or {}
        if not col.name.startswith(COLLECTION_PREFIX) or "partition" not in meta:
            continue
        if partition is None or meta["partition"] == partition:
            out.append(Scope(str(meta["partition"]), str(meta.get("instance", ""))))
    return sorted(out, key=lambda s: (s.partition, s.instance))


# -- what a collection is asked (`col` is a Chroma collection handle) ---------


def query(col: Any, embedding: Sequence[float], limit: int) -> list[tuple[MessageRecord, float]]:
    result = col.query(
        query_embeddings=[list(embedding)],
        n_results=limit,
        include=["documents", "metadatas", "distances"],
    )
    ids = result["ids"][0]
    return [
        (_record(i, d, m), 1.0 - float(dist))
        for i, d, m, dist in zip(
            ids,
            result["documents"][0],
            result["metadatas"][0],
            result["distances"][0],
            strict=True,
        )
    ]


def nearest(col: Any, embedding: Sequence[float], limit: int) -> list[tuple[str, float]]:
    result = col.query(query_embeddings=[list(embedding)], n_results=limit, include=["distances"])
    return [
        (i, 1.0 - float(dist))
        for i, dist in zip(result["ids"][0], result["distances"][0], strict=True)
    ]


def nearest_passages(col: Any, embedding: Sequence[float], limit: int) -> list[tuple[str, float]]:
    """The messages of the passages nearest to `embedding`, each with its best."""
    result = col.query(
        query_embeddings=[list(embedding)],
        n_results=limit * PASSAGE_DEPTH,
        include=["distances", "metadatas"],
    )
    hits = [
        (str((meta or {}).get("message", "")), 1.0 - float(dist))
        for meta, dist in zip(result["metadatas"][0], result["distances"][0], strict=True)
    ]
    return best_of([h for h in hits if h[0]], limit=limit)


def passage_page(col: Any, offset: int, limit: int) -> tuple[list[str], Any]:
    """Passages in the store's order: their messages' ids and their vectors."""
    result = col.get(include=["metadatas", "embeddings"], offset=offset, limit=limit)
    owners = [str((m or {}).get("message", "")) for m in result.get("metadatas") or []]
    return owners, result.get("embeddings")


def newest(col: Any, limit: int) -> list[MessageRecord]:
    total = col.count()
    result = col.get(where={"seq": {"$gte": total - limit}}, include=["documents", "metadatas"])
    return _records(result)[-limit:]


def page(col: Any, offset: int, limit: int) -> tuple[list[MessageRecord], Any]:
    """Records in the store's order, with their embeddings (for `_mirror`)."""
    result = col.get(include=["documents", "metadatas", "embeddings"], offset=offset, limit=limit)
    return _records_in_order(result), result.get("embeddings")


def by_ids(col: Any, ids: Sequence[str]) -> list[MessageRecord]:
    unique = list(dict.fromkeys(ids))
    return _records(col.get(ids=unique, include=["documents", "metadatas"]))


def documents(col: Any, offset: int, limit: int, min_seq: int | None) -> list[tuple[str, str]]:
    where = {"seq": {"$gte": min_seq}} if min_seq is not None else None
    result = col.get(include=["documents"], where=where, offset=offset, limit=limit)
    docs = result.get("documents") or [None] * len(result["ids"])
    return [(i, d or "") for i, d in zip(result["ids"], docs, strict=True)]


def existing(col: Any, ids: Sequence[str]) -> set[str]:
    return set(col.get(ids=list(dict.fromkeys(ids)), include=[])["ids"])


def traces(col: Any, trace_ids: Sequence[str]) -> set[str]:
    wanted = list(dict.fromkeys(trace_ids))
    where = {"trace_id": wanted[0]} if len(wanted) == 1 else {"trace_id": {"$in": wanted}}
    result = col.get(where=where, include=["metadatas"])
    return {str(m.get("trace_id")) for m in result.get("metadatas") or [] if m}


def expired(col: Any, before: float) -> list[str]:
    """Ids of the messages stored with a `timestamp` before `before` (no text read)."""
    return [str(i) for i in col.get(where={"timestamp": {"$lt": before}}, include=[])["ids"]]


def keyword(col: Any, terms: Sequence[str], limit: int) -> list[MessageRecord]:
    clauses: list[dict[str, Any]] = [{"$contains": t} for t in terms]
    where_document = clauses[0] if len(clauses) == 1 else {"$or": clauses}
    result = col.get(where_document=where_document, limit=limit, include=["documents", "metadatas"])
    return _records(result)


def tail(col: Any) -> Tail:
    """The next sequence number and the last message with its embedding."""
    total = col.count()
    if total == 0:
        return 0, None, None
    result = col.get(
        where={"seq": {"$gte": total - 1}}, include=["documents", "metadatas", "embeddings"]
    )
    if not result["ids"]:
        return total, None, None
    records = _records(result)
    last = records[-1]
    index = result["ids"].index(last.id)
    embedding = [float(x) for x in result["embeddings"][index]]
    return max(total, last.seq + 1), last, embedding
