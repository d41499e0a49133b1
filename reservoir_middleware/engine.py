"""`Reservoir`: the memory engine the middleware uses, usable without HTTP.

Reads happen on the request path (embedding the query, searching, fetching
the recent window); writes are queued per scope and run off the path, in
order, so an answer is always stored after the request that asked for it and
the next request of the scope waits for both. This is the facade over
`memory/`: the request path (`_request`, over one parsed `_chat.ChatRequest`),
what an exchange writes (`_exchange`), where writes wait and who may write
(`_writes`), the write path (`_writer`), the journal's format and replay
(`_recovery`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import anyio.to_thread

from reservoir_middleware._private import private_dirs, tighten_tree
from reservoir_middleware.builtins.lexical import LexicalRetrieval
from reservoir_middleware.builtins.partition_keys import PartitionKeys
from reservoir_middleware.builtins.retrieval import RecentRetrieval, SemanticRetrieval
from reservoir_middleware.builtins.truncation import BudgetTruncation
from reservoir_middleware.memory._chat import InvalidChatRequest as InvalidChatRequest
from reservoir_middleware.memory._deadletter import DeadLetters
from reservoir_middleware.memory._deletions import Deletions, now
from reservoir_middleware.memory._enrichment import Enrichment as Enrichment
from reservoir_middleware.memory._enrichment import TooLong as TooLong
from reservoir_middleware.memory._exchange import Exchanges
from reservoir_middleware.memory._forgetting import Expired as Expired
from reservoir_middleware.memory._forgetting import Forgetting
from reservoir_middleware.memory._journal import Journal
from reservoir_middleware.memory._lane import WriteJob, WriteLane
from reservoir_middleware.memory._mode import narrow, parse_mode, policy_mode, reads, writes
from reservoir_middleware.memory._recovery import ExchangeJournal
from reservoir_middleware.memory._request import RequestPath
from reservoir_middleware.memory._token_memo import precount_messages, precount_scope
from reservoir_middleware.memory._writer import Exported, Writer, message_records
from reservoir_middleware.memory._writes import Writes
from reservoir_middleware.memory.embeddings import (
    MiniLMEmbedding,
    as_floats,
    make_embedding_function,
)
from reservoir_middleware.memory.tokens import ModelLimits, warm_up_encodings
from reservoir_middleware.memory.validation import (
    STORED_ROLES,
    checked_name,
    checked_scope,
    message_time,
)
from reservoir_middleware.plugins import Hooks, make_plugin_manager
from reservoir_middleware.records import Answer, MessageRecord, Scope, clean_text
from reservoir_middleware.settings import MemoryMode, ReservoirSettings
from reservoir_middleware.storage.chroma import ChromaStore
from reservoir_middleware.store import Storage

CLOSE_WRITE_S = 10.0  # what close() gives the queued writes


@dataclass
class SearchHit:
    record: MessageRecord
    score: float


class Reservoir:
    """Stores, searches and injects the memory of every (partition, instance)."""

    def __init__(
        self,
        settings: ReservoirSettings | None = None,
        plugins: Sequence[object] = (),
        *,
        store: Storage | None = None,
    ) -> None:
        """`store`: another implementation of the `Storage` protocol than Chroma
        (`storage.inmemory.InMemoryStore` for tests); it is registered as a plugin."""
        self.settings = settings or ReservoirSettings()
        s = self.settings
        self.embedder, self.embedding_model = make_embedding_function(
            s.embedding,
            url=s.embedding_url,
            api_key=s.embedding_api_key,
            threads=s.embedding_threads,
        )
        self.store: Storage = (
            store
            if store is not None
            else ChromaStore(
                s.data_dir,
                s.chroma_url,
                self.embedding_model,
                chroma_process=s.chroma_process,
                # the built-in model also runs in the child, for what is written
                child_embeddings=isinstance(self.embedder, MiniLMEmbedding),
            )
        )
        builtins: list[tuple[str, object]] = [
            (self.store.name, self.store),
            ("semantic", SemanticRetrieval()),
            (
                "lexical",
                LexicalRetrieval(
                    max_messages=s.lexical_max_messages,
                    neighbour_weight=s.lexical_neighbour_weight,
                ),
            ),
            ("recent", RecentRetrieval()),
            ("truncate", BudgetTruncation()),
            ("partition-keys", PartitionKeys(s.partition_keys)),
        ]
        self.plugin_manager = make_plugin_manager(
            builtins, plugins, disabled=s.disable_plugins, load_entry_points=s.load_entry_points
        )
        self.hooks = Hooks(self.plugin_manager)
        self.limits = ModelLimits(
            s.model_limits,
            default_window=s.default_context_window,
            default_output_reserve=s.default_output_reserve,
        )
        self.journal = Journal(s.data_dir / "journal") if s.journal else None
        self.dead_letters = DeadLetters(s.data_dir)
        self.deletions = Deletions(s.data_dir)
        self._journal = ExchangeJournal(self.journal, self.deletions, self.hooks)
        self._writer = Writer(
            self.hooks, self.store, self.embedder, self.embedding_model, s.synapse_threshold
        )
        self._writes = Writes(
            self._writer.write,
            store=self.store,
            hooks=self.hooks,
            journal=self._journal,
            deletions=self.deletions,
            dead_letters=self.dead_letters,
            locks_dir=s.data_dir / "locks",
            delay=s.write_delay_ms / 1000,
        )
        self._writes.on_forgotten = self._forget_indexes
        self._forgetting = Forgetting(
            s, self.store, self._writes, self.deletions, self._journal, self.dead_letters
        )
        self._exchanges = Exchanges(self._writes, self._journal, self.deletions, self.hooks)
        in_flight = self._writes.inflight.of
        self._requests = RequestPath(
            s, self.hooks, self.store, self.limits, self.deletions, self._embed_one, in_flight
        )
        self._warm = False
        self._recovered = False

    # -- public API ------------------------------------------------------------

    async def add(
        self,
        partition: str,
        instance: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        source: str = "import",
        trace_id: str | None = None,
        model: str | None = None,
        timestamp: float | datetime | str | None = None,
    ) -> list[str]:
        """Store messages of one scope now; returns the ids newly written.

        Each message keeps its original time: its own `"timestamp"` key, else
        `timestamp`, else now (seconds since 1970, a `datetime`, naive = UTC,
        or an ISO 8601 string), so an old conversation keeps its dates.
        Raises ValueError for a time that is none of these."""
        scope = checked_scope(partition, instance)
        began = now()
        trace = clean_text(str(trace_id)) if trace_id else uuid.uuid4().hex
        default_time = None if timestamp is None else message_time(timestamp)
        stored = [m for m in messages if m.get("role") in STORED_ROLES]
        times = [
            message_time(m["timestamp"]) if m.get("timestamp") is not None else default_time
            for m in stored
        ]
        records = message_records(scope, stored, trace, model, source)
        for record, at in zip(records, times, strict=True):
            if at is not None:
                record.timestamp = at
        await self.settle(scope, timeout=30)  # after what the scope has queued
        job = WriteJob(scope, records, trace_id=trace, began=began)
        await self._writes.write_now(scope, [job])
        return job.written

    async def enrich(
        self,
        partition: str,
        instance: str,
        body: Mapping[str, Any],
        *,
        store: bool | Literal["with_answer"] = True,
        memory: MemoryMode = "on",
    ) -> Enrichment:
        """The request with memory injected and trimmed; stores its new messages.

        `store=True` writes them now (in the background); `store="with_answer"`
        writes them together with the answer, in one batch, when
        `record_answer` is called (the middleware's way: one write per
        exchange); until then they already count as the scope's newest
        messages. `store=False` stores nothing.

        `memory` narrows what the partition's `memory_mode` allows (the result's
        `memory_mode` is what held): `read` injects but stores nothing, `write`
        stores but retrieves nothing, `off` neither. Raises ValueError for
        another value.
        """
        began = now()
        scope = checked_scope(partition, instance)
        mode = narrow(parse_mode(memory), policy_mode(self.settings, scope.partition))
        if not self._warm:
            await self._warm_up_engine()
        self._writes.watch_deletions()
        await self._writes.wait_for_room()
        if reads(mode):
            result = await self._requests.enrich(scope, body, began)
        else:  # no retrieval work at all
            result = await self._requests.passthrough(scope, body, began)
        result.memory_mode = mode
        if store and writes(mode) and result.too_long is None:
            await self._exchanges.accept(result, store)
        return result

    def record_answer(
        self,
        enrichment: Enrichment,
        answer: Answer | None,
        *,
        complete: bool = True,
    ) -> asyncio.Future[str | None]:
        """Queue the answer (None: no answer) for storage after the request's messages.

        With `enrich(..., store="with_answer")` this writes the request's
        messages and the answer in one batch, journalled first so that a
        crash loses nothing; call it exactly once. The future resolves once
        stored. An enrichment whose `memory_mode` stores nothing (`read`, `off`)
        writes nothing, journals nothing, and resolves to None.
        """
        if not writes(enrichment.memory_mode):
            self._exchanges.discard(enrichment)
            nothing: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            nothing.set_result(None)
            return nothing
        return self._exchanges.record_answer(enrichment, answer, complete=complete)

    def discard(self, enrichment: Enrichment) -> None:
        """Forget the messages of a `store="with_answer"` request that will not be sent."""
        self._exchanges.discard(enrichment)

    async def search(
        self, partition: str, instance: str, query: str, *, limit: int = 10, semantic: bool = True
    ) -> list[SearchHit]:
        """Semantic (cosine) or keyword (BM25-ranked) search in one scope.

        Keyword search asks the `reservoir_keyword_search` plugins (the built-in
        `lexical` one); with none, a BM25 index of the scope is built for the call."""
        scope = checked_scope(partition, instance)
        query = clean_text(query)
        if semantic:
            vector = await self._embed_one(query)
            hits = await anyio.to_thread.run_sync(self.store.query, scope, vector, limit)
            return [SearchHit(r, sim) for r, sim in hits]
        ranked, outcome = await self.hooks.keyword_search(scope, query, limit, self.store)
        if ranked is None and outcome.failures:
            raise outcome.failures[0].error
        if ranked is None:  # (`lexical` blocked) a one-off index
            one_off = LexicalRetrieval(
                neighbour_weight=self.settings.lexical_neighbour_weight
            ).reservoir_keyword_search
            ranked = await anyio.to_thread.run_sync(one_off, scope, query, limit, self.store)
        return [SearchHit(r, score) for r, score in ranked]

    async def recent(
        self, partition: str, instance: str, *, limit: int = 15
    ) -> list[MessageRecord]:
        """The last `limit` messages of a scope, oldest first."""
        scope = checked_scope(partition, instance)
        await self.settle(scope)
        return await anyio.to_thread.run_sync(self.store.recent, scope, limit)

    async def delete(self, partition: str, instance: str | None = None) -> int:
        """Forget one scope, or every instance of a partition; returns how many.

        What began before, in any process on the data directory (an exchange
        in flight, queued, journalled, or replayed after a crash), is not
        stored after it: the delete is recorded (fsynced) in `deletions.jsonl`
        before the store forgets the scope under its write lock, and every
        write checks that record under the same lock.
        """
        await anyio.to_thread.run_sync(self.store.open)  # reachable (and ours)
        if instance is not None:
            scopes = [checked_scope(partition, instance)]
        else:
            checked_name("partition", partition)
            whole = await anyio.to_thread.run_sync(self.deletions.record, partition, None)
            self._writes.inflight.forget(whole)
            scopes = await anyio.to_thread.run_sync(self.store.scopes, partition)
        for scope in scopes:
            async with self._writes.scope_lock(scope):
                if instance is not None:
                    deletion = await anyio.to_thread.run_sync(
                        self.deletions.record, partition, instance
                    )
                    self._writes.inflight.forget(deletion)
                outcome = await self.hooks.delete(scope)
            if outcome.failures:
                raise RuntimeError(str(outcome.failures[0])) from outcome.failures[0].error
        self._writes.hurry_deleted(partition, instance)
        if self.journal is not None:  # nor what a journal keeps, after a crash too
            await anyio.to_thread.run_sync(self._journal.purge_all)
        await anyio.to_thread.run_sync(self.dead_letters.purge, partition, instance)
        return len(scopes)

    async def forget(self, partition: str, instance: str, message_id: str) -> MessageRecord | None:
        """Forget one message (an id `search` gave) as `delete` forgets a scope, the
        others staying as they are; returns it (None: the scope holds no such id)."""
        scope = checked_scope(partition, instance)
        found = await self._forgetting.forget(scope, [str(message_id)])
        return found[0] if found else None

    async def retention(self, *, apply: bool = True) -> list[Expired]:
        """Remove (`apply`) or count the messages older than their partition's
        `retention_days`, as `forget` does; the engine also runs it hourly."""
        return await self._forgetting.sweep(apply=apply)

    def _forget_indexes(self, scope: Scope) -> None:
        """Some messages of the scope were forgotten: the BM25 indexes built of it go."""
        for plugin in self.plugin_manager.get_plugins():
            if isinstance(plugin, LexicalRetrieval):
                plugin.forget(scope)

    async def import_records(self, batch: Sequence[Exported]) -> tuple[int, int]:
        """Store exported records as they are (ids, links, times kept), after what
        their scopes have queued; returns (written, already stored). Vectors are
        reused when they come from the configured embedding model, else recomputed."""
        by_scope: dict[Scope, list[Exported]] = {}
        for record, vector in batch:
            by_scope.setdefault(record.scope, []).append((record, vector))
        written = existing = 0
        for scope, items in by_scope.items():
            await self.settle(scope, timeout=30)
            async with self._writes.scope_lock(scope):
                new, old = await self._writer.import_scope(scope, items)
            written, existing = written + new, existing + old
        return written, existing

    async def settle(
        self,
        scope: Scope | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        """Write now, and wait for, what is queued (for one scope, or all) on this loop.

        Returns early when the store fails those writes: they then wait for a
        retry (and stay in the journal) instead of holding the caller.
        """
        await self._writes.settle(scope, timeout)

    async def close(self, timeout: float = CLOSE_WRITE_S) -> None:  # noqa: ASYNC109
        """Store what is queued on this loop (for at most `timeout`; what is left
        stays in the journal), then stop the child process embedded Chroma runs
        in (it starts again if this engine is used later); the middleware does
        it at shutdown."""
        await self._journal.settle(timeout)  # (redaction) journalled before anything is given up
        await self.settle(timeout=timeout)
        await self._forgetting.stop()
        await self._writes.stop()  # its writer must not restart the child after it stops
        await anyio.to_thread.run_sync(self.store.close)
        # what was made meanwhile with the app's umask (by inline Chroma, a plugin) is tightened
        await anyio.to_thread.run_sync(tighten_tree, self.settings.data_dir)

    async def preload(self, partition: str, instance: str) -> None:
        """Load a scope's in-memory copies now (embedded mode: its messages by id;
        its newest messages; the token counts of its texts; the `reservoir_preload`
        plugins: the BM25 index) instead of in the background of its first
        requests, e.g. at start-up for the busiest scopes; about 25 s per 100k
        messages (more when they are long: counting 100k answers of 500 tokens
        takes another 10-20 s)."""
        scope = checked_scope(partition, instance)
        # waits for the copy in embedded mode
        await anyio.to_thread.run_sync(self.store.documents, scope, 0, 1)
        await anyio.to_thread.run_sync(warm_up_encodings)  # what `precount_scope` counts in
        # what its first request would read (the recent cache), and the token
        # counts of its texts, which every request filling a budget asks for
        recent = await anyio.to_thread.run_sync(
            self.store.recent, scope, max(1, self.settings.recent_context_size)
        )
        await anyio.to_thread.run_sync(precount_messages, [r.to_message() for r in recent])
        await anyio.to_thread.run_sync(precount_scope, self.store, scope)
        outcome = await self.hooks.preload(scope, self.store)
        if outcome.failures:
            raise outcome.failures[0].error

    async def warm_up(self) -> None:
        """Load the embedding model and token encodings, open the store.

        Called at application start-up by the middleware, else by the first
        request, so that no loading ever happens on the event loop.
        """
        await self._warm_up_engine()
        if self.journal is not None:  # its files are 0600; its directory is private too
            directories = (self.settings.data_dir, self.journal.directory)
            await anyio.to_thread.run_sync(private_dirs, *directories)
        await anyio.to_thread.run_sync(self.store.open)

    async def _warm_up_engine(self) -> None:
        """What requests need besides the store: a store that is down must not
        stop them from being answered and recorded (the journal keeps them)."""
        await self._embed_one("warm up")
        await anyio.to_thread.run_sync(warm_up_encodings)
        self._warm = True
        if not self._recovered:
            self._recovered = True
            await self._journal.recover(self._writes.enqueue)
        self._forgetting.start()  # retention: in the background, hourly

    async def _embed_one(self, text: str) -> list[float]:
        vectors = await anyio.to_thread.run_sync(self.embedder, [text])
        return as_floats(vectors[0])

    def _lane(self) -> WriteLane:
        """This loop's write lane (for tests that watch the queue)."""
        return self._writes.lane()
