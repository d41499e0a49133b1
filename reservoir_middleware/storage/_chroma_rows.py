"""How a message record is kept in Chroma: one collection per scope (named by a
hash of the scope), the text as the document, the other fields as metadata."""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from typing import Any

from reservoir_middleware.records import MessageRecord, Scope

COLLECTION_PREFIX = "rsv-"
_RECORD_FIELDS = {f.name for f in fields(MessageRecord)}


def collection_name(scope: Scope) -> str:
    return (
        COLLECTION_PREFIX
        + hashlib.sha256(scope.key.encode("utf-8", "surrogatepass")).hexdigest()[:48]
    )


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
