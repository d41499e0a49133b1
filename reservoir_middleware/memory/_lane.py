"""The write queue: memory is written after the answer, per scope in order, in batches.

A chroma upsert costs about the same for one message as for ten (and, with
Chroma in this process, holds the interpreter while it runs), so writing
each exchange on its own would waste CPU the requests need. Exchanges wait here up to
`write_delay_ms` (or until enough are queued, or someone waits for them),
then all queued exchanges of a scope go in one batch. (Writing at the first
quiet moment instead was measured: back to back it gave up the batching and
tripled the added latency.) A batch that fails
with the store at fault (down, busy, full, an internal error) stays queued
and is tried again with a growing pause, without end; the journal keeps it
across restarts. A batch that fails otherwise has its jobs tried alone; a
job that fails alone `MAX_ATTEMPTS` times while the store takes a probe
write is shown to be the cause and set aside (the dead-letter file): no
exchange can stop its scope, and no healthy one is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reservoir_middleware._logs import current_trace, log_failure
from reservoir_middleware.memory._deletions import now
from reservoir_middleware.records import MessageRecord, Scope

if TYPE_CHECKING:
    from reservoir_middleware.memory._journal import JournalEntry

# Chroma in this process holds the interpreter while it writes, so its batches
# stay small; a Chroma server (ours in a child process, or a shared one) does
# not, and bigger batches cost it less CPU per message.
FLUSH_RECORDS = 6  # queued messages that trigger a write without waiting (in process)
MAX_BATCH_JOBS = 8  # exchanges per write (in process)
SERVER_FLUSH_RECORDS = 64
SERVER_MAX_BATCH_JOBS = 32
BACKLOG = 256  # queued exchanges beyond which new requests wait for the writer
MAX_QUEUED_JOBS = 2000  # per scope while the store is down; older ones wait in the journal
RETRY_FIRST = 0.5
RETRY_MAX = 30.0
MAX_ATTEMPTS = 5  # failures alone, not the store's fault, before a job may be set aside


@dataclass(eq=False)
class WriteJob:
    """Messages of one scope to store, and the answer chained after them."""

    scope: Scope
    records: list[MessageRecord]
    known: dict[str, list[float]] = field(default_factory=dict)
    answer: MessageRecord | None = None  # its id and prev_id are set when written
    after: WriteJob | None = None  # the answer chains after that job's last message
    trace_id: str | None = None
    entry: JournalEntry | None = None
    verify: bool = False  # may be in the store already (replayed, retried): check by trace id
    written: list[str] = field(default_factory=list)
    failures: int = 0  # attempts that failed with the store up
    last_id: str | None = None
    future: asyncio.Future[str | None] = field(default_factory=lambda: _loop().create_future())
    queued_at: float = field(default_factory=lambda: _loop().time())
    began: float = field(default_factory=now)  # a delete of the scope after it drops the job
    forgotten: frozenset[str] = frozenset()  # ids forgotten since it began: not written

    @property
    def size(self) -> int:
        return len(self.records) + (self.answer is not None)


def _loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


WriteBatch = Callable[[Scope, list[WriteJob]], Awaitable[None]]
SetAside = Callable[[WriteJob, BaseException], Awaitable[None]]
Probe = Callable[[], Awaitable[None]]


def store_side(exc: BaseException) -> bool:
    """Without a store's own judgement (`Storage.unavailable`): the system's errors."""
    return isinstance(exc, (OSError, TimeoutError))


class WriteLane:
    """The queue and the writer task of one event loop."""

    def __init__(
        self,
        write: WriteBatch,
        delay: float,
        *,
        in_process: bool = True,
        set_aside: SetAside | None = None,
        probe: Probe | None = None,
        store_down: Callable[[BaseException], bool] = store_side,
    ) -> None:
        self.write = write
        self.store_down = store_down  # the store's failure, not the job's: retried without end
        self.set_aside = set_aside
        self.probe = probe  # a write to the store that only fails when the store does
        self.delay = delay
        self.flush_records = FLUSH_RECORDS if in_process else SERVER_FLUSH_RECORDS
        self.max_batch_jobs = MAX_BATCH_JOBS if in_process else SERVER_MAX_BATCH_JOBS
        self.queues: dict[str, deque[WriteJob]] = {}
        self.retry_at: dict[str, tuple[float, float]] = {}  # scope key -> (when, pause)
        self.urgent: set[str] = set()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.queued = 0  # messages
        self.backlog = 0  # jobs
        self.room = asyncio.Event()
        self.room.set()

    def submit(self, job: WriteJob, *, urgent: bool = False) -> None:
        queue = self.queues.setdefault(job.scope.key, deque())
        queue.append(job)
        self.queued += job.size
        self.backlog += 1
        if self.backlog > BACKLOG:
            self.room.clear()
        if len(queue) > MAX_QUEUED_JOBS:
            dropped = queue.popleft()
            self.queued -= dropped.size
            self._left(1)
            dropped.future.set_exception(
                RuntimeError("too many exchanges waiting for the store; kept in the journal only")
            )
        if urgent:
            self.urgent.add(job.scope.key)
        self.wake.set()
        if self.task is None:
            self.task = asyncio.ensure_future(self._run())

    async def wait_for_room(self, timeout: float) -> None:
        """Back-pressure: when writes fall behind a healthy store, the next
        requests wait (at most `timeout`) instead of letting the queue grow
        without bound. A store that is down does not slow requests: its
        writes wait in the journal."""
        if self.room.is_set() or self.retry_at:
            return
        self.hurry()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.room.wait(), timeout)

    def _left(self, jobs: int) -> None:
        self.backlog -= jobs
        if self.backlog <= BACKLOG // 2:
            self.room.set()

    def hurry(self, key: str | None = None, *, retry_now: bool = False) -> None:
        """Write now what is queued (for `key`, or everything); with `retry_now`
        also what waits for a retry after a failure."""
        keys = [key] if key is not None else list(self.queues)
        self.urgent.update(keys)
        if retry_now:
            for each in keys:
                self.retry_at.pop(each, None)
        self.wake.set()

    async def stop(self) -> None:
        """Stop the writer; what is still queued stays in the journal only."""
        task = self.task
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    def jobs(self, key: str | None = None) -> list[WriteJob]:
        keys = [key] if key is not None else list(self.queues)
        return [job for k in keys for job in self.queues.get(k, ())]

    async def _run(self) -> None:
        try:
            while self.queues:
                key = await self._next()
                if key is not None:
                    await self._write(key)
        finally:
            self.task = None
            if self.queues:  # cancelled with work left: it stays in the journal
                for queue in self.queues.values():
                    for job in queue:
                        if not job.future.done():
                            job.future.cancel()
                self.queues.clear()
                self.backlog = 0
                self.room.set()

    async def _next(self) -> str | None:
        """The scope to write now, once its oldest job is due."""
        loop = asyncio.get_running_loop()
        while self.queues:
            now = loop.time()
            due: list[tuple[float, float, str]] = []  # when, then the oldest first
            for key, queue in self.queues.items():
                at = queue[0].queued_at + self.delay
                if key in self.urgent or self.queued >= self.flush_records:
                    at = now
                retry = self.retry_at.get(key)
                if retry is not None:
                    at = max(at, retry[0])
                due.append((at, queue[0].queued_at, key))
            at, _, key = min(due)
            if at <= now:
                return key
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), at - now)
        return None

    async def _write(self, key: str) -> None:
        queue = self.queues[key]
        # a job that failed with the store up is tried alone: only it may be set aside
        jobs = [queue[0]] if queue[0].failures else list(queue)[: self.max_batch_jobs]
        current_trace.set(jobs[0].trace_id)  # (this task's own context) for the logs
        try:
            await self.write(jobs[0].scope, jobs)
        except Exception as exc:
            down = self.store_down(exc)
            for job in jobs:
                job.verify = True  # the failed write may have landed
                if not down:
                    job.failures += 1
            if not down and len(jobs) > 1:  # find the bad one: each alone, at once
                log_failure("storing a batch of memory failed; its exchanges are tried alone", exc)
                return
            # the cause, if it fails alone while the store takes other writes
            suspect = not down and jobs[0].failures >= MAX_ATTEMPTS
            if suspect and await self._store_takes_writes():
                kept = await self._set_aside(key, queue, jobs[0], exc)
                if kept:
                    return
            self._retry_later(key, queue, exc)
            return
        self.retry_at.pop(key, None)
        self._remove(key, queue, jobs)

    def _retry_later(self, key: str, queue: deque[WriteJob], exc: BaseException) -> None:
        pause = min(RETRY_MAX, self.retry_at.get(key, (0.0, RETRY_FIRST / 2))[1] * 2)
        if self.queues.get(key) is queue:  # (not dropped meanwhile)
            self.retry_at[key] = (asyncio.get_running_loop().time() + pause, pause)
        log_failure(
            f"storing memory failed; {sum(len(q) for q in self.queues.values())} exchanges "
            f"wait and are retried (next in {pause:.1f} s), the journal keeps them",
            exc,
            level=logging.ERROR,
        )

    async def _store_takes_writes(self) -> bool:
        """Whether the store accepts a write now (then a job failing alone is the cause)."""
        if self.probe is None:
            return True
        try:
            await self.probe()
        except Exception as exc:
            log_failure("the store refuses a probe write: it is treated as down", exc)
            return False
        return True

    async def _set_aside(
        self, key: str, queue: deque[WriteJob], job: WriteJob, exc: BaseException
    ) -> bool:
        """A job that keeps failing alone while the store takes writes: out of the
        way of its scope. False (the job stays queued) if it could not be kept."""
        if self.set_aside is not None:
            try:
                await self.set_aside(job, exc)
            except Exception as error:
                log_failure("cannot write the dead-letter file; the exchange stays queued", error)
                return False
        log_failure(
            f"an exchange (trace id {job.trace_id}) failed to be stored {job.failures} times "
            "while the store took other writes; it is set aside in the dead-letter file and "
            "its scope goes on",
            exc,
            level=logging.ERROR,
        )
        self.retry_at.pop(key, None)
        self._remove(key, queue, [job])
        return True

    def _remove(self, key: str, queue: deque[WriteJob], jobs: list[WriteJob]) -> None:
        removed = 0
        for job in jobs:  # a job dropped meanwhile (queue overflow) is gone already
            if queue and queue[0] is job:
                queue.popleft()
            elif job in queue:
                queue.remove(job)
            else:
                continue
            removed += 1
            self.queued -= job.size
            if not job.future.done():
                job.future.set_result(job.last_id)
        self._left(removed)
        if not queue and self.queues.get(key) is queue:  # (not dropped meanwhile)
            del self.queues[key]
            self.urgent.discard(key)


LOCK_STRIPES = 256


def lock_stripe(directory: Path, key: str) -> int:
    """Block until this process holds the cross-process write lock of `key`.

    Workers on one machine sharing a Chroma server take turns per scope
    (striped over a fixed set of files); release by closing the returned fd.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    stripe = int(hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16)
    path = directory / f"scope-{stripe % LOCK_STRIPES:03d}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def pending_futures(jobs: list[WriteJob]) -> set[asyncio.Future[Any]]:
    return {job.future for job in jobs if not job.future.done()}
