"""Export and import of memory as JSON Lines: one message record per line.

An export holds every field of the record (and, on request, its embedding);
importing it again stores nothing new (ids are kept), and importing it into an
empty directory gives the same search results. Bad lines are reported by line
number and skipped; the good ones are imported. The import itself goes through
the engine's write path (`cli._transfer.import_lines`); this is the format.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

import anyio.to_thread

from reservoir_middleware.memory.validation import BadRecord, record_from_dict
from reservoir_middleware.records import MessageRecord, Scope
from reservoir_middleware.store import Storage

BATCH = 256


class BadLine(ValueError):
    pass


@dataclass
class ImportReport:
    read: int = 0
    imported: int = 0
    existing: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)


def record_line(record: MessageRecord, embedding: list[float] | None) -> str:
    data = record.to_dict()
    if embedding is not None:
        data["embedding"] = [float(x) for x in embedding]
    return json.dumps(data, ensure_ascii=False)


def parse_line(line: str) -> tuple[MessageRecord, list[float] | None]:
    """One exported line back to a record, checked as every stored record is
    (`record_from_dict`); BadLine says what is wrong."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadLine(f"not JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise BadLine("not a JSON object")
    embedding = data.pop("embedding", None)
    if embedding is not None and (
        not isinstance(embedding, list)
        or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            for x in embedding
        )
    ):
        raise BadLine("'embedding' is not a list of finite numbers")
    try:
        return record_from_dict(data), embedding
    except BadRecord as exc:
        raise BadLine(str(exc)) from exc


async def export_lines(
    store: Storage, scopes: Iterable[Scope], *, embeddings: bool = False
) -> AsyncIterator[str]:
    """Every record of the scopes, oldest first, one JSON line each (with "\\n")."""
    for scope in scopes:
        if not await anyio.to_thread.run_sync(store.count, scope):
            continue
        paged = store.pages(scope, embeddings=embeddings, size=BATCH)
        while True:
            page = await anyio.to_thread.run_sync(next, paged, None)
            if page is None:
                break
            for record, vector in page:
                yield record_line(record, vector) + "\n"


def numbered_lines(stream: TextIO) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(stream, start=1):
        if line.strip():
            yield number, line
