"""Where writes wait and who may write.

A write lane per event loop (`WriteLane`: the queue, batching, retries), one
writer per scope (an asyncio lock per loop, and a lock stripe across the
processes sharing a store), the messages in flight (accepted, not written
yet: the recent window shows them), and the deletes made by other processes,
which drop what this one still holds of their scopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio.to_thread

from reservoir_middleware._logs import log_failure
from reservoir_middleware.memory._deadletter import DeadLetters
from reservoir_middleware.memory._deletions import Deletion, Deletions
from reservoir_middleware.memory._lane import WriteJob, WriteLane, lock_stripe, pending_futures
from reservoir_middleware.memory._recovery import ExchangeJournal, exchange_data
from reservoir_middleware.plugins import Hooks
from reservoir_middleware.records import MessageRecord, Scope
from reservoir_middleware.store import Storage

BACKPRESSURE_WAIT_S = 2.0
SETTLE_POLL_S = 0.05  # the longest a request waits for a writer that fell behind
DELETIONS_CHECK_S = 1.0  # how often requests look for deletes made by other processes

Write = Callable[[Scope, list[WriteJob]], Awaitable[None]]


class InFlight:
    """Messages of each scope accepted for storage but perhaps not written yet."""

    def __init__(self) -> None:
        self._by_key: dict[str, list[MessageRecord]] = {}

    def of(self, scope: Scope) -> tuple[MessageRecord, ...]:
        return tuple(self._by_key.get(scope.key, ()))

    def show(self, key: str, records: Sequence[MessageRecord]) -> list[MessageRecord]:
        shown = self._by_key.setdefault(key, [])
        shown.extend(records)
        return shown

    def remove(self, key: str, records: Sequence[MessageRecord]) -> None:
        shown = self._by_key.get(key, [])
        for record in records:
            with contextlib.suppress(ValueError):
                shown.remove(record)

    def hold(
        self, key: str, show: Sequence[MessageRecord], release: Sequence[MessageRecord]
    ) -> Callable[[], None]:
        """Show `show` now; the function returned takes it away, with `release` (shown earlier)."""
        shown = self.show(key, show)
        gone = [*show, *release]

        def done() -> None:
            for record in gone:
                with contextlib.suppress(ValueError):
                    shown.remove(record)
            if not shown and self._by_key.get(key) is shown:
                self._by_key.pop(key, None)

        return done

    def forget(self, deletion: Deletion) -> None:
        """Messages of exchanges begun before a delete no longer show as in flight
        (of a delete of some messages: those)."""
        gone = set(deletion.messages)
        for key, shown in list(self._by_key.items()):
            partition, instance = key.split("\x00", 1)
            if partition == deletion.partition and deletion.instance in (None, instance):
                if gone:
                    shown[:] = [r for r in shown if r.id not in gone]
                else:
                    shown[:] = [r for r in shown if r.timestamp > deletion.time]
                if not shown:
                    self._by_key.pop(key, None)


class Writes:
    """The write lanes, scope locks, in-flight messages and deletion watching of one engine."""

    def __init__(
        self,
        write: Write,
        *,
        store: Storage,
        hooks: Hooks,
        journal: ExchangeJournal,
        deletions: Deletions,
        dead_letters: DeadLetters,
        locks_dir: Path,
        delay: float,
    ) -> None:
        """`write` stores a batch of jobs of one scope (called under its lock)."""
        self.write = write
        self.store = store
        self.hooks = hooks
        self.journal = journal
        self.deletions = deletions
        self.dead_letters = dead_letters
        self.locks_dir = locks_dir
        self.delay = delay
        self.inflight = InFlight()
        self._locks: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, asyncio.Lock]
        ] = weakref.WeakKeyDictionary()
        self._lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WriteLane] = (
            weakref.WeakKeyDictionary()
        )
        self._deletions_checked = float("-inf")  # (loop time)
        self._background: set[asyncio.Task[Any]] = set()
        # told of a scope some of whose messages were forgotten (the engine's plugins' indexes)
        self.on_forgotten: Callable[[Scope], None] = lambda scope: None

    # -- the lane of this loop ---------------------------------------------------------

    def lane(self) -> WriteLane:
        loop = asyncio.get_running_loop()
        lane = self._lanes.get(loop)
        if lane is None:
            lane = WriteLane(
                self._write_batch,
                self.delay,
                in_process=self.store.in_process,
                set_aside=self._set_aside,
                probe=self._probe,
                store_down=self.store.unavailable,
            )
            self._lanes[loop] = lane
        return lane

    async def wait_for_room(self) -> None:
        await self.lane().wait_for_room(BACKPRESSURE_WAIT_S)

    def enqueue(
        self,
        job: WriteJob,
        show: Sequence[MessageRecord] = (),
        release: Sequence[MessageRecord] = (),
    ) -> asyncio.Future[str | None]:
        """Queue a write; `show` (and `release`, shown earlier) stay visible to the
        recent window as in flight until it is done, so no request waits for it."""
        release_all = self.inflight.hold(job.scope.key, show, release)

        def done(future: asyncio.Future[str | None]) -> None:
            release_all()
            error = None if future.cancelled() else future.exception()
            if error is not None:
                log_failure(
                    "storing memory failed; these messages wait in the journal only",
                    error,
                    level=logging.ERROR,
                )

        job.future.add_done_callback(done)
        self.lane().submit(job)
        return job.future

    async def settle(self, scope: Scope | None = None, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Write now, and wait for, what is queued (for one scope, or all) on this loop.

        Returns early when the store fails those writes: they then wait for a
        retry (and stay in the journal) instead of holding the caller.
        """
        loop = asyncio.get_running_loop()
        lane = self._lanes.get(loop)
        if lane is None:
            return
        key = scope.key if scope is not None else None
        jobs = lane.jobs(key)
        futures = pending_futures(jobs)
        if not futures:
            return
        lane.hurry(key, retry_now=True)
        deadline = None if timeout is None else loop.time() + timeout
        while futures:
            step = SETTLE_POLL_S if deadline is None else min(SETTLE_POLL_S, deadline - loop.time())
            if step <= 0:
                return
            _, futures = await asyncio.wait(futures, timeout=step)
            waiting = {job.scope.key for job in jobs if not job.future.done()}
            if waiting and waiting <= lane.retry_at.keys():  # the store fails them
                return

    async def stop(self) -> None:
        """Stop this loop's writer (it must not restart the store after it closes)."""
        lane = self._lanes.pop(asyncio.get_running_loop(), None)
        if lane is not None:
            await lane.stop()

    # -- one writer per scope ------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def scope_lock(self, scope: Scope) -> AsyncIterator[None]:
        """One writer per scope: per event loop, and across processes on a server."""
        locks = self._locks.setdefault(asyncio.get_running_loop(), {})
        lock = locks.get(scope.key)
        if lock is None:
            lock = locks[scope.key] = asyncio.Lock()
        async with lock:
            if self.store.single_writer:
                yield
                return
            fd = await anyio.to_thread.run_sync(lock_stripe, self.locks_dir, scope.key)
            try:
                yield
            finally:
                os.close(fd)

    async def write_now(self, scope: Scope, jobs: list[WriteJob]) -> None:
        """Write the jobs under the scope's lock; those begun before a delete of
        the scope write nothing (a delete records itself first, then holds this
        lock while the store forgets the scope, so what began before it is seen)."""
        async with self.scope_lock(scope):
            self.learned(await anyio.to_thread.run_sync(self.deletions.refresh))
            latest = self.deletions.latest(scope.partition, scope.instance)
            for job in jobs:
                if job.began <= latest:
                    job.written, job.last_id = [], None
                else:  # nor what was forgotten since it began (`Reservoir.forget`)
                    job.forgotten = self.deletions.forgotten(
                        scope.partition, scope.instance, job.began
                    )
            jobs = [job for job in jobs if job.began > latest]
            if jobs:
                await self.write(scope, jobs)

    async def _write_batch(self, scope: Scope, jobs: list[WriteJob]) -> None:
        await self.write_now(scope, jobs)
        for job in jobs:
            self.journal.done(job)

    async def _set_aside(self, job: WriteJob, error: BaseException) -> None:
        """Keep a job the store refuses (alone, while it takes other writes) in the
        dead-letter file; only then is its journal entry closed."""
        if job.entry is not None:  # as journalled (filtered already, when filters run)
            data = job.entry.data
        else:
            answer = job.answer
            records: list[MessageRecord] = []
            for record in job.records:
                prepared, _ = await self.hooks.prepare_record(replace(record))
                if prepared is not None:
                    records.append(prepared)
            if answer is not None:
                answer, _ = await self.hooks.prepare_record(replace(answer))
            data = exchange_data(job, records, answer)
        # an error leaves the job queued and journalled (tried again later); a job of
        # a scope deleted meanwhile is not written (`DeadLetters.purge`)
        await anyio.to_thread.run_sync(self.dead_letters.add, data, error, job.failures, job.began)
        self.journal.done(job, close=True)

    async def _probe(self) -> None:
        """A write to the store of nothing of anyone's; raises if the store refuses it."""
        await anyio.to_thread.run_sync(self.store.probe)

    # -- deletes -------------------------------------------------------------------------

    def hurry_deleted(self, partition: str, instance: str | None) -> None:
        """Queued jobs of a deleted scope go now (and are dropped, their journal
        entries closed), also those waiting for a retry."""
        with contextlib.suppress(RuntimeError):  # (no running loop)
            lane = self._lanes.get(asyncio.get_running_loop())
            if lane is None:
                return
            for key in list(lane.queues):
                each_partition, each_instance = key.split("\x00", 1)
                if each_partition == partition and instance in (None, each_instance):
                    lane.hurry(key, retry_now=True)

    def learned(self, deletions: list[Deletion]) -> None:
        """Deletes made by another process: its queued and in-flight exchanges of
        those scopes are dropped when written; its own journal files are purged."""
        for deletion in deletions:
            self.inflight.forget(deletion)
            self.hurry_deleted(deletion.partition, deletion.instance)
            if deletion.messages:  # what this process keeps of them
                self.forgotten(deletion)
                purge = self.dead_letters.purge_messages
                self._in_background(anyio.to_thread.run_sync(purge, set(deletion.messages)))
        if self.journal.enabled and deletions:
            self._in_background(anyio.to_thread.run_sync(self.journal.purge))

    def forgotten(self, deletion: Deletion) -> None:
        """Messages forgotten (by another process, or this one): the in-memory
        copies of the scope (the store's, the plugins' indexes) are dropped, to
        be read again."""
        if deletion.instance is not None:
            self.store.forget(Scope(deletion.partition, deletion.instance))
            self.on_forgotten(Scope(deletion.partition, deletion.instance))

    def watch_deletions(self) -> None:
        """At most once a second, look (in the background) for deletes made by other
        processes, so that this process purges its journal soon after them."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._deletions_checked < DELETIONS_CHECK_S:
            return
        self._deletions_checked = loop.time()

        async def check() -> None:
            self.learned(await anyio.to_thread.run_sync(self.deletions.refresh))

        self._in_background(check())

    def _in_background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
