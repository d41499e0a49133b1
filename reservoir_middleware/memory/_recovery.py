"""Exchanges in the journal: the record format, what is kept, and the replay.

An answered exchange is journalled (`Journal`, one JSON line) before it is
queued, as the record filters (redaction) leave it, and marked done once the
store has it. A process that starts replays what dead ones left: each entry
is checked as a request is (a journal file could be planted), and entries of
a scope deleted since are dropped, their bytes purged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import anyio.to_thread

from reservoir_middleware._logs import log_failure
from reservoir_middleware.memory._deletions import Deletions, entry_began
from reservoir_middleware.memory._journal import Journal
from reservoir_middleware.memory._lane import WriteJob
from reservoir_middleware.memory.validation import BadRecord, checked_scope, record_from_dict
from reservoir_middleware.plugins import Hooks
from reservoir_middleware.records import MessageRecord, clean_text

logger = logging.getLogger("reservoir")


class ExchangeJournal:
    """This process's journal of exchanges not stored yet (None: journalling is off)."""

    def __init__(self, journal: Journal | None, deletions: Deletions, hooks: Hooks) -> None:
        self.journal = journal
        self.deletions = deletions
        self.hooks = hooks
        self._journalling: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return self.journal is not None

    def keep(
        self, job: WriteJob, records: list[MessageRecord], answer: MessageRecord | None
    ) -> None:
        """Keep the exchange on disk until the store has it (survives a kill)."""
        if self.journal is None or self.deletions.covers(
            job.scope.partition, job.scope.instance, job.began
        ):
            return  # (deleted while the record filters ran)
        gone = self.deletions.forgotten(job.scope.partition, job.scope.instance, job.began)
        if gone:  # (forgotten since it began: `Reservoir.forget`) never on disk again
            records = [r for r in records if r.id not in gone]
        data = exchange_data(job, records, answer)
        try:
            job.entry = self.journal.append(data)
        except Exception as exc:
            log_failure("cannot write the memory journal; a crash would lose queued memory", exc)
            return
        if job.future.done():  # stored already
            self.journal.done(job.entry)

    def keep_filtered(self, job: WriteJob, visible: list[MessageRecord]) -> None:
        """`keep`, as the record filters (redaction) leave the exchange: nothing
        unfiltered reaches the disk; a replay stores what they returned, filtered again."""
        task = asyncio.ensure_future(self._keep_filtered(job, visible))
        self._journalling.add(task)
        task.add_done_callback(self._journalling.discard)

    async def _keep_filtered(self, job: WriteJob, visible: list[MessageRecord]) -> None:
        if self.journal is None:
            return
        answer = None
        if job.answer is not None:
            answer, _ = await self.hooks.prepare_record(replace(job.answer))
        self.keep(job, visible, answer)

    async def settle(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait (at most `timeout`) for the exchanges being filtered to be journalled."""
        if self._journalling:
            await asyncio.wait(set(self._journalling), timeout=timeout)

    def done(self, job: WriteJob, *, close: bool = False) -> None:
        """The store has the job (or the dead-letter file: `close` forgets the entry)."""
        if self.journal is not None and job.entry is not None:
            self.journal.done(job.entry)
            if close:
                job.entry = None

    def purge(self) -> None:
        """Drop deleted scopes' entries from this process's files (blocking)."""
        if self.journal is not None:
            self.journal.purge(self.deletions.covers_entry)

    def purge_all(self) -> None:
        """`purge`, and orphans no live process holds; a live worker's file is
        its own to purge, when it learns of the delete (blocking)."""
        if self.journal is not None:
            self.journal.purge(self.deletions.covers_entry)
            self.journal.purge_orphans(self.deletions.covers_entry)

    async def recover(self, enqueue: Callable[[WriteJob], object]) -> None:
        """Queue what dead processes left in their journals (replayed once, by one)."""
        journal = self.journal
        if journal is None:
            return
        await anyio.to_thread.run_sync(self.deletions.refresh)
        orphans = await anyio.to_thread.run_sync(lambda: list(journal.orphans()))
        deleted = 0
        for path, entries in orphans:
            kept = [e for e in entries if not self.deletions.covers_entry(e.data)]
            if len(kept) < len(entries):  # of a scope deleted since: never stored again
                keep = {id(e) for e in kept}
                for entry in entries:
                    if id(entry) not in keep:
                        journal.done(entry)
            deleted += len(entries) - len(kept)
            if kept:
                logger.info("replaying %d unsaved exchanges from %s", len(kept), path)
            for entry in kept:
                try:
                    job = job_from_journal(entry.data)
                except (KeyError, TypeError, ValueError) as exc:  # BadRecord, mostly
                    logger.error("memory journal %s: bad entry skipped: %s", path, exc)
                    journal.done(entry)
                    continue
                job.entry = entry
                enqueue(job)
        if deleted:  # their bytes go too
            await anyio.to_thread.run_sync(journal.purge, self.deletions.covers_entry)


def exchange_data(
    job: WriteJob, records: list[MessageRecord], answer: MessageRecord | None
) -> dict[str, Any]:
    """An exchange as the journal and the dead-letter file keep it (`job_from_journal` reads it)."""
    return {
        "scope": [job.scope.partition, job.scope.instance],
        "began": job.began,
        "trace_id": job.trace_id,
        "records": [r.to_dict() for r in records],
        "answer": answer.to_dict() if answer is not None else None,
    }


def job_from_journal(data: Any) -> WriteJob:
    """A journalled exchange, to write again (it may be stored already).

    Checked as a request is (a journal file could be planted): the scope's names,
    each record's fields and role, and that every record is of the entry's scope;
    the answer is an assistant message. BadRecord says what is wrong.
    """
    if not isinstance(data, Mapping):
        raise BadRecord("the entry is not a JSON object")
    names, records, answer = data.get("scope"), data.get("records"), data.get("answer")
    if not isinstance(names, list) or len(names) != 2:
        raise BadRecord("'scope' is not a [partition, instance] pair")
    try:
        scope = checked_scope(*names)
    except ValueError as exc:
        raise BadRecord(str(exc)) from exc
    if not isinstance(records, list):
        raise BadRecord("'records' is not a list")
    trace_id = data.get("trace_id")
    if trace_id is not None and not isinstance(trace_id, str):
        raise BadRecord("'trace_id' is not a string")
    if answer is not None:
        answer = record_from_dict(answer, scope, answer=True)
        if answer.role != "assistant":
            raise BadRecord(f"the answer's role is {answer.role!r}, not 'assistant'")
    return WriteJob(
        scope,
        [record_from_dict(r, scope) for r in records],
        answer=answer,
        trace_id=clean_text(trace_id) if trace_id else None,
        verify=True,
        began=entry_began(data),
    )
