"""`reservoir import`: exported JSON Lines back into memory, through the engine's
write path (dedup by id, numbering, plugins), a batch at a time.

The line format is `storage.transfer`'s; storing goes through the engine, so
this lives with the commands, above both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import anyio.to_thread

from reservoir_middleware.engine import Reservoir
from reservoir_middleware.records import MessageRecord, Scope, embedding_text
from reservoir_middleware.storage.transfer import BATCH, BadLine, ImportReport, parse_line


async def import_records(
    reservoir: Reservoir, batch: Sequence[tuple[MessageRecord, list[float] | None]]
) -> tuple[int, int]:
    """Store exported records as they are (ids, links, times kept); returns
    (written, already stored). Vectors are reused when they come from the
    configured embedding model, else recomputed."""
    by_scope: dict[Scope, list[tuple[MessageRecord, list[float] | None]]] = {}
    for record, vector in batch:
        by_scope.setdefault(record.scope, []).append((record, vector))
    written = existing = 0
    for scope, items in by_scope.items():
        await reservoir.settle(scope, timeout=30)
        async with reservoir._scope_lock(scope):
            ids = [r.id for r, _ in items]
            stored = await anyio.to_thread.run_sync(reservoir.store.existing_ids, scope, ids)
            fresh: list[tuple[MessageRecord, list[float] | None]] = []
            seen: set[str] = set()
            for record, vector in sorted(items, key=lambda item: (item[0].seq, item[0].timestamp)):
                if record.id in stored or record.id in seen:
                    existing += 1
                    continue
                seen.add(record.id)
                prepared, _ = await reservoir.hooks.prepare_record(record)
                if prepared is not None:
                    reuse = vector if record.embedding_model == reservoir.embedding_model else None
                    fresh.append((prepared, reuse if prepared.text == record.text else None))
            if not fresh:
                continue
            todo = [embedding_text(r) for r, v in fresh if v is None]
            computed = iter(
                await anyio.to_thread.run_sync(reservoir.embedder, todo) if todo else []
            )
            vectors = [v if v is not None else [float(x) for x in next(computed)] for _, v in fresh]
            next_seq = (await anyio.to_thread.run_sync(reservoir.store.tail, scope))[0]
            records = [r for r, _ in fresh]
            for offset, record in enumerate(records):
                record.seq = next_seq + offset
                record.embedding_model = reservoir.embedding_model
            outcome = await reservoir.hooks.store(scope, records, vectors)
            for failure in outcome.failures:
                if failure.plugin == reservoir.store.name:
                    reservoir.store.forget(scope)
                    raise failure.error
            written += len(records)
    return written, existing


async def import_lines(
    reservoir: Reservoir, lines: Iterable[tuple[int, str]], *, progress: Any = None
) -> ImportReport:
    report = ImportReport()
    batch: list[tuple[int, MessageRecord, list[float] | None]] = []

    async def store(items: list[tuple[int, MessageRecord, list[float] | None]]) -> None:
        written, existing = await import_records(reservoir, [(r, v) for _, r, v in items])
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
