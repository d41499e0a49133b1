"""`reservoir import`: exported JSON Lines back into memory, through the engine's
write path (dedup by id, numbering, plugins), a batch at a time.

The line format is `storage.transfer`'s; storing goes through the engine, so
this lives with the commands, above both.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import anyio.to_thread

from reservoir_middleware.engine import Reservoir
from reservoir_middleware.records import MessageRecord
from reservoir_middleware.storage.transfer import BATCH, BadLine, ImportReport, parse_line


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
                    dimensions = len(
                        (await anyio.to_thread.run_sync(reservoir.embedder, ["dimensions"]))[0]
                    )
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
