"""Forgetting single messages (`Reservoir.forget`) and retention (`retention_days`).

A message is forgotten as a scope is deleted, for that message only: the
forget is recorded (fsynced) in `deletions.jsonl` under the scope's write lock
(`Deletions.record` with its ids), so that no exchange that began before it,
in any process, stores the message again (`Writes.write_now` drops it from
the job; a journal replay drops the entry); then the store removes it with
no trace where it keeps its data (`Storage.remove_messages`), and the
journal files and the dead-letter file are rewritten without it. Processes
that learn of the record (`Writes.learned`) drop their in-memory copies of
the scope.

Retention removes, the same way, the messages whose stored `timestamp` is
older than the partition's `retention_days` (`ReservoirSettings.policy_for`;
0 keeps them for ever): in a background task of the engine, at start and
then every `RETENTION_EVERY_S`, a scope at a time with a pause between
scopes, never on a request's path; or on demand (`reservoir retention`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import anyio.to_thread

from reservoir_middleware._logs import log_failure
from reservoir_middleware.memory._deadletter import DeadLetters
from reservoir_middleware.memory._deletions import Deletions
from reservoir_middleware.memory._recovery import ExchangeJournal
from reservoir_middleware.memory._writes import Writes
from reservoir_middleware.records import MessageRecord, Scope
from reservoir_middleware.settings import ReservoirSettings
from reservoir_middleware.store import Storage

RETENTION_EVERY_S = 3600.0  # between two sweeps of the background task
SCOPE_PAUSE_S = 0.05  # between two scopes of a sweep: requests and writes go first
QUIET_WAIT_S = 10.0
DAY_S = 86400.0


@dataclass(frozen=True)
class Expired:
    """One scope in a retention sweep."""

    scope: Scope
    retention_days: float
    expired: int  # messages older than that
    removed: int  # of those, removed now (0 on a dry run)


class Forgetting:
    """Single-message forgets and retention sweeps of one engine."""

    def __init__(
        self,
        settings: ReservoirSettings,
        store: Storage,
        writes: Writes,
        deletions: Deletions,
        journal: ExchangeJournal,
        dead_letters: DeadLetters,
    ) -> None:
        self.settings = settings
        self.store = store
        self.writes = writes
        self.deletions = deletions
        self.journal = journal
        self.dead_letters = dead_letters
        self._task: asyncio.Task[None] | None = None

    async def forget(self, scope: Scope, ids: Sequence[str]) -> list[MessageRecord]:
        """Remove these messages of the scope for good; returns those it held."""
        await anyio.to_thread.run_sync(self.store.open)  # reachable (and ours)
        await self.writes.settle(scope, timeout=30)  # what this process queued goes first
        gone = list(dict.fromkeys(ids))
        async with self.writes.scope_lock(scope):
            # recorded first (an id only in flight elsewhere too: it is not written)
            record = self.deletions.record
            deletion = await anyio.to_thread.run_sync(record, scope.partition, scope.instance, gone)
            self.writes.inflight.forget(deletion)
            found = await anyio.to_thread.run_sync(self.store.remove_messages, scope, gone)
        self.writes.forgotten(deletion)
        await anyio.to_thread.run_sync(self.dead_letters.purge_messages, set(gone))
        if self.journal.enabled:  # the journal's copies, this process's and orphans
            await anyio.to_thread.run_sync(self.journal.purge_all)
        return found

    # -- retention -------------------------------------------------------------------

    def days(self, partition: str) -> float:
        return self.settings.policy_for(partition).retention_days or 0.0

    @property
    def configured(self) -> bool:
        """Some partition keeps its messages for a limited time."""
        s = self.settings
        return s.retention_days > 0 or any(p.retention_days for p in s.partitions.values())

    async def sweep(self, *, apply: bool = True) -> list[Expired]:
        """Every scope with messages older than its retention: removed (`apply`), or told."""
        found: list[Expired] = []
        if not self.configured:
            return found
        await anyio.to_thread.run_sync(self.store.open)
        for scope in await anyio.to_thread.run_sync(self.store.scopes):
            days = self.days(scope.partition)
            if days <= 0:
                continue
            cutoff = time.time() - days * DAY_S
            old = await anyio.to_thread.run_sync(self.store.expired, scope, cutoff)
            if not old:
                continue
            await self._writes_first()
            removed = len(await self.forget(scope, old)) if apply else 0
            found.append(Expired(scope, days, len(old), removed))
            await asyncio.sleep(SCOPE_PAUSE_S)
        return found

    async def _writes_first(self) -> None:
        """Queued writes (which requests may wait for) go before a scope is rebuilt:
        the sweep waits for this loop's write queue to empty, up to `QUIET_WAIT_S`."""
        lane = self.writes.lane()
        for _ in range(int(QUIET_WAIT_S / SCOPE_PAUSE_S)):
            if not lane.backlog:
                return
            await asyncio.sleep(SCOPE_PAUSE_S)

    def start(self, every: float = RETENTION_EVERY_S) -> None:
        """The background sweeps (when retention is configured), on this loop."""
        if self._task is None and self.configured:
            self._task = asyncio.ensure_future(self._sweeps(every))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sweeps(self, every: float) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # tried again at the next sweep
                log_failure("the retention sweep failed; it runs again later", exc)
            await asyncio.sleep(every)
