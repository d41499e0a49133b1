"""Export and import of memory as JSON Lines: one message record per line.

An export holds every field of the record (and, on request, its embedding);
importing it again stores nothing new (ids are kept), and importing it into an
empty directory gives the same search results. Bad lines are reported by line
number and skipped; the good ones are imported.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import anyio.to_thread

from reservoir_middleware.engine import Reservoir
from reservoir_middleware.memory.validation import BadRecord, record_from_dict
from reservoir_middleware.records import MessageRecord, Scope
from reservoir_middleware.storage.maintenance import pages

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
    reservoir: Reservoir, scopes: Iterable[Scope], *, embeddings: bool = False
) -> AsyncIterator[str]:
    """Every record of the scopes, oldest first, one JSON line each (with "\\n")."""
    for scope in scopes:
        if not await anyio.to_thread.run_sync(reservoir.store.count, scope):
            continue
        paged = pages(reservoir, scope, embeddings=embeddings, size=BATCH)
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


async def import_lines(
    reservoir: Reservoir, lines: Iterable[tuple[int, str]], *, progress: Any = None
) -> ImportReport:
    report = ImportReport()
    batch: list[tuple[int, MessageRecord, list[float] | None]] = []

    async def store(items: list[tuple[int, MessageRecord, list[float] | None]]) -> None:
        written, existing = await reservoir.import_records([(r, v) for _, r, v in items])
        report.imported += written
        report.existing += existing

    async def flush() -> None:
        try:
            await store(batch)
        except Exception:  # the store refused one: the lines one by one, to name it
            for item in batch:
                try:
                    await store([item])
                except Exception as exc:
                    report.bad.append((item[0], f"not stored: {exc}"))
        if progress is not None:
            progress(len(batch))
        batch.clear()

    dimensions: int | None = None
    for number, line in lines:
        report.read += 1
        try:
            record, vector = parse_line(line)
            if vector is not None and record.embedding_model == reservoir.embedding_model:
                if dimensions is None:  # what the model gives, asked once
                    dimensions = len(await reservoir._embed_one("dimensions"))
                if len(vector) != dimensions:
                    raise BadLine(f"'embedding' has {len(vector)} numbers, not {dimensions}")
        except BadLine as exc:
            report.bad.append((number, str(exc)))
            continue
        batch.append((number, record, vector))
        if len(batch) >= BATCH:
            await flush()
    if batch:
        await flush()
    report.bad.sort()
    return report
