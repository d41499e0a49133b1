"""`Reservoir`: the memory engine the middleware uses, usable without HTTP.

Reads happen on the request path (embedding the query, searching, fetching
the recent window); writes are queued per scope and run off the path, in
order, so an answer is always stored after the request that asked for it and
the next request of the scope waits for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import anyio.to_thread
import numpy as np

from reservoir_middleware._logs import current_trace, log_failure
from reservoir_middleware._private import private_dirs, tighten_tree
from reservoir_middleware.builtins.lexical import LexicalRetrieval, keyword_search
from reservoir_middleware.builtins.partition_keys import PartitionKeys
from reservoir_middleware.builtins.retrieval import RecentRetrieval, SemanticRetrieval
from reservoir_middleware.builtins.truncation import BudgetTruncation
from reservoir_middleware.context import (
    ContextPlan,
    InjectedMessage,
    RetrievalQuery,
    SectionReport,
    TokenBudget,
)
from reservoir_middleware.memory._deadletter import DeadLetters
from reservoir_middleware.memory._deletions import Deletion, Deletions, entry_began, now
from reservoir_middleware.memory._journal import Journal
from reservoir_middleware.memory._lane import WriteJob, WriteLane, lock_stripe, pending_futures
from reservoir_middleware.memory._selection import (
    Hit,
    build_units,
    fuse,
    neighbour_ids,
    recent_window,
)
from reservoir_middleware.memory.embeddings import MiniLMEmbedding, make_embedding_function
from reservoir_middleware.memory.tokens import (
    REPLY_PRIMING,
    ModelLimits,
    count_message,
    warm_up_encodings,
)
from reservoir_middleware.memory.validation import (
    STORED_ROLES,
    BadRecord,
    checked_name,
    checked_scope,
    record_from_dict,
)
from reservoir_middleware.plugins import Hooks, PluginFailure, make_plugin_manager
from reservoir_middleware.records import (
    Answer,
    MessageRecord,
    Scope,
    chained_id,
    clean_text,
    clean_value,
    content_text,
    message_text,
)
from reservoir_middleware.settings import ReservoirSettings
from reservoir_middleware.storage.chroma import ChromaStore
from reservoir_middleware.store import Storage

logger = logging.getLogger("reservoir")

BACKPRESSURE_WAIT_S = 2.0
SETTLE_POLL_S = 0.05  # the longest a request waits for a writer that fell behind
DELETIONS_CHECK_S = 1.0  # how often requests look for deletes made by other processes
CLOSE_WRITE_S = 10.0  # what close() gives the queued writes


class InvalidChatRequest(ValueError):
    """The body is not a chat request this engine can enrich."""


@dataclass(frozen=True)
class TooLong:
    tokens: int
    limit: int

    @property
    def message(self) -> str:
        return (
            f"Your last message is too long. It contains approximately {self.tokens} tokens, "
            f"which exceeds the maximum limit of {self.limit}. Please shorten your message."
        )


@dataclass
class Enrichment:
    """A rewritten request and what went into it."""

    scope: Scope
    body: dict[str, Any]
    trace_id: str
    semantic: SectionReport = field(default_factory=SectionReport)
    recent: SectionReport = field(default_factory=SectionReport)
    too_long: TooLong | None = None
    failures: list[PluginFailure] = field(default_factory=list)
    changed: bool = False
    records: list[MessageRecord] = field(default_factory=list)
    visible: list[MessageRecord] = field(default_factory=list)  # shown while in flight
    known: dict[str, list[float]] = field(default_factory=dict)
    job: WriteJob | None = None  # with store=True: the queued write of the request
    began: float = 0.0  # a delete of the scope after it: nothing of the exchange is stored

    @property
    def degraded(self) -> bool:
        return bool(self.failures)


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
            ("lexical", LexicalRetrieval(max_messages=s.lexical_max_messages)),
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
        self._locks: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, asyncio.Lock]
        ] = weakref.WeakKeyDictionary()
        self._lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WriteLane] = (
            weakref.WeakKeyDictionary()
        )
        self._inflight: dict[str, list[MessageRecord]] = {}
        self._journalling: set[asyncio.Task[None]] = set()
        self.journal = Journal(s.data_dir / "journal") if s.journal else None
        self.dead_letters = DeadLetters(s.data_dir)
        self.deletions = Deletions(s.data_dir)
        self._deletions_checked = float("-inf")  # (loop time)
        self._background: set[asyncio.Task[Any]] = set()
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
    ) -> list[str]:
        """Store messages of one scope now; returns the ids newly written."""
        scope = checked_scope(partition, instance)
        began = now()
        trace = clean_text(str(trace_id)) if trace_id else uuid.uuid4().hex
        records = self._records(scope, messages, trace, model, source)
        await self.settle(scope, timeout=30)  # after what the scope has queued
        job = WriteJob(scope, records, trace_id=trace, began=began)
        async with self._scope_lock(scope):
            await self._write_jobs(scope, [job])
        return job.written

    async def enrich(
        self,
        partition: str,
        instance: str,
        body: Mapping[str, Any],
        *,
        store: bool | Literal["with_answer"] = True,
    ) -> Enrichment:
        """The request with memory injected and trimmed; stores its new messages.

        `store=True` writes them now (in the background); `store="with_answer"`
        writes them together with the answer, in one batch, when
        `record_answer` is called (the middleware's way: one write per
        exchange); until then they already count as the scope's newest
        messages. `store=False` stores nothing.
        """
        began = now()
        if not self._warm:
            await self._warm_up_engine()
        self._watch_deletions()
        await self._lane().wait_for_room(BACKPRESSURE_WAIT_S)
        return await self._enrich(checked_scope(partition, instance), body, store, began)

    async def _enrich(
        self,
        scope: Scope,
        body: Mapping[str, Any],
        store: bool | Literal["with_answer"],
        began: float,
    ) -> Enrichment:
        new_body, rewrite = await self.hooks.rewrite_request(dict(body), scope)
        messages = chat_messages(new_body)
        model = new_body.get("model") if isinstance(new_body.get("model"), str) else None
        trace_id = uuid.uuid4().hex
        current_trace.set(trace_id)  # for the logs of this request
        result = Enrichment(scope, new_body, trace_id, failures=list(rewrite.failures))
        result.began = began
        limit = self.limits.input_limit(model, new_body)
        refuse_over = self.limits.refusal_limit(model, new_body)  # None: never refused
        if refuse_over is not None:
            last_tokens = await self._count(messages[-1], model)
            if last_tokens > refuse_over:
                result.too_long = TooLong(last_tokens, refuse_over)
                return result
        records = self._records(scope, messages, trace_id, model, "request")
        query_text = clean_text(last_user_text(messages))  # as the records are
        query = self._query(scope, new_body, records, query_text)
        # BM25 needs no embedding: it scores while the query is embedded
        lexical = self.plugin_manager.get_plugin("lexical")
        early = None
        if query_text and isinstance(lexical, LexicalRetrieval):
            early = asyncio.ensure_future(
                anyio.to_thread.run_sync(lexical.prefetch, query, self.store)
            )
        embedding = await self._embed_one(query_text) if query_text else None
        if early is not None:
            await early
        query = replace(query, embedding=embedding)
        plan = await self._plan(scope, messages, records, query, result)
        budget = self._budget(model, limit)
        truncated, outcome = await self.hooks.truncate(plan, budget)
        result.failures.extend(outcome.failures)
        plan = truncated or plan
        deleted = self.deletions.covers(scope.partition, scope.instance, began)
        if deleted:  # while its memory was read: what was read may be gone
            plan = replace(plan, semantic=[], recent=[])
        rendered, result.semantic, result.recent = await anyio.to_thread.run_sync(
            _render_and_report, plan, budget
        )
        if result.semantic.messages or result.recent.messages or rendered != messages:
            result.body = {**new_body, "messages": rendered}
            result.changed = True
        result.records = records
        result.known = {query_text: embedding} if embedding is not None else {}
        if store:
            result.visible = await self._visible(records)
        if store == "with_answer" and not deleted:
            self._inflight.setdefault(scope.key, []).extend(result.visible)
        elif store:
            result.job = WriteJob(scope, records, result.known, trace_id=trace_id, began=began)
            self._enqueue(result.job, show=result.visible)
        return result

    async def _visible(self, records: list[MessageRecord]) -> list[MessageRecord]:
        """The records as the recent window may show them before they are written:
        filtered by the `reservoir_prepare_record` plugins (redaction) when any."""
        if not self.hooks.pm.hook.reservoir_prepare_record.get_hookimpls():
            return records
        visible = []
        for record in records:
            prepared, _ = await self.hooks.prepare_record(replace(record))
            if prepared is not None:
                visible.append(prepared)
        return visible

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
        stored.
        """
        scope = enrichment.scope
        if self.deletions.covers(scope.partition, scope.instance, enrichment.began):
            self.discard(enrichment)  # the scope was deleted since the exchange began
            stored: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            stored.set_result(None)
            return stored
        template = None
        if answer is not None:
            model = answer.model or enrichment.body.get("model")
            template = MessageRecord(
                id="",
                partition=scope.partition,
                instance=scope.instance,
                role="assistant",
                text=clean_text(answer.content or (answer.refusal or "")),
                tool_calls=clean_value(answer.tool_calls) or None,
                trace_id=enrichment.trace_id,
                model=model if isinstance(model, str) else None,
                finish_reason=answer.finish_reason,
                complete=complete,
                source="response",
                choices=answer.choices if answer.choices > 1 else None,
            )
        records = enrichment.records
        preview = None
        if template is not None:
            preview = answer_after(template, records[-1].id if records else None)
        # with record filters (redaction) the answer shows once written, filtered
        filtered = bool(self.hooks.pm.hook.reservoir_prepare_record.get_hookimpls())
        shown = [preview] if preview is not None and not filtered else []
        if enrichment.job is not None:  # the request is queued already
            job = WriteJob(
                scope,
                [],
                answer=template,
                after=enrichment.job,
                trace_id=enrichment.trace_id,
                began=enrichment.began,
            )
            return self._enqueue(job, show=shown)
        job = WriteJob(
            scope,
            records,
            enrichment.known,
            answer=template,
            trace_id=enrichment.trace_id,
            began=enrichment.began,
        )
        if filtered:  # nothing unfiltered may reach the disk, so the journal waits for them
            task = asyncio.ensure_future(self._journal_filtered(job, enrichment.visible))
            self._journalling.add(task)
            task.add_done_callback(self._journalling.discard)
        else:
            self._journal(job, job.records, job.answer)
        return self._enqueue(job, show=shown, release=enrichment.visible)

    def discard(self, enrichment: Enrichment) -> None:
        """Forget the messages of a `store="with_answer"` request that will not be sent."""
        inflight = self._inflight.get(enrichment.scope.key, [])
        for record in enrichment.visible:
            with contextlib.suppress(ValueError):
                inflight.remove(record)

    async def search(
        self, partition: str, instance: str, query: str, *, limit: int = 10, semantic: bool = True
    ) -> list[SearchHit]:
        """Semantic (cosine) or keyword (BM25-ranked) search in one scope."""
        scope = checked_scope(partition, instance)
        query = clean_text(query)
        if semantic:
            vector = await self._embed_one(query)
            hits = await anyio.to_thread.run_sync(self.store.query, scope, vector, limit)
            return [SearchHit(r, sim) for r, sim in hits]
        lexical = self.plugin_manager.get_plugin("lexical")
        if not isinstance(lexical, LexicalRetrieval):  # disabled: a one-off index
            lexical = LexicalRetrieval()
        ranked = await anyio.to_thread.run_sync(
            keyword_search, lexical, self.store, scope, query, limit
        )
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
            self._forget_inflight(whole)
            scopes = await anyio.to_thread.run_sync(self.store.scopes, partition)
        for scope in scopes:
            async with self._scope_lock(scope):
                if instance is not None:
                    deletion = await anyio.to_thread.run_sync(
                        self.deletions.record, partition, instance
                    )
                    self._forget_inflight(deletion)
                outcome = await self.hooks.delete(scope)
            if outcome.failures:
                raise RuntimeError(str(outcome.failures[0])) from outcome.failures[0].error
        self._hurry_deleted(partition, instance)
        if self.journal is not None:  # nor what a journal keeps, after a crash too
            await anyio.to_thread.run_sync(self._purge_journals)
        await anyio.to_thread.run_sync(self.dead_letters.purge, partition, instance)
        return len(scopes)

    def _purge_journals(self) -> None:
        """This process's journal files, and orphans no live process holds; a live
        worker's file is its own to purge, when it learns of the delete."""
        assert self.journal is not None
        self.journal.purge(self.deletions.covers_entry)
        self.journal.purge_orphans(self.deletions.covers_entry)

    def _forget_inflight(self, deletion: Deletion) -> None:
        """Messages of exchanges begun before a delete no longer show as in flight."""
        for key, inflight in list(self._inflight.items()):
            partition, instance = key.split("\x00", 1)
            if partition == deletion.partition and deletion.instance in (None, instance):
                inflight[:] = [r for r in inflight if r.timestamp > deletion.time]
                if not inflight:
                    self._inflight.pop(key, None)

    def _hurry_deleted(self, partition: str, instance: str | None) -> None:
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

    def _learned(self, deletions: list[Deletion]) -> None:
        """Deletes made by another process: its queued and in-flight exchanges of
        those scopes are dropped when written; its own journal files are purged."""
        for deletion in deletions:
            self._forget_inflight(deletion)
            self._hurry_deleted(deletion.partition, deletion.instance)
        if self.journal is not None and deletions:
            purge = anyio.to_thread.run_sync(self.journal.purge, self.deletions.covers_entry)
            task = asyncio.ensure_future(purge)
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _watch_deletions(self) -> None:
        """At most once a second, look (in the background) for deletes made by other
        processes, so that this process purges its journal soon after them."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._deletions_checked < DELETIONS_CHECK_S:
            return
        self._deletions_checked = loop.time()

        async def check() -> None:
            self._learned(await anyio.to_thread.run_sync(self.deletions.refresh))

        task = asyncio.ensure_future(check())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(
        self,
        scope: Scope | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
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

    async def close(self, timeout: float = CLOSE_WRITE_S) -> None:  # noqa: ASYNC109
        """Store what is queued on this loop (for at most `timeout`; what is left
        stays in the journal), then stop the child process embedded Chroma runs
        in (it starts again if this engine is used later); the middleware does
        it at shutdown."""
        if self._journalling:  # (redaction) journalled before anything is given up
            await asyncio.wait(set(self._journalling), timeout=timeout)
        await self.settle(timeout=timeout)
        lane = self._lanes.pop(asyncio.get_running_loop(), None)
        if lane is not None:  # its writer must not restart the child after it stops
            await lane.stop()
        await anyio.to_thread.run_sync(self.store.close)
        # what was made meanwhile with the app's umask (by inline Chroma, a plugin) is tightened
        await anyio.to_thread.run_sync(tighten_tree, self.settings.data_dir)

    async def preload(self, partition: str, instance: str) -> None:
        """Load a scope's in-memory copies now (embedded mode: its messages by id;
        the BM25 index) instead of in the background of its first requests,
        e.g. at start-up for the busiest scopes; about 25 s per 100k messages."""
        scope = checked_scope(partition, instance)
        lexical = self.plugin_manager.get_plugin("lexical")

        def load() -> None:
            self.store.documents(scope, 0, 1)  # waits for the copy in embedded mode
            if isinstance(lexical, LexicalRetrieval):
                lexical.preload(scope, self.store)

        await anyio.to_thread.run_sync(load)

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
            await self._recover()

    # -- request path ------------------------------------------------------------

    def _query(
        self, scope: Scope, body: dict[str, Any], records: list[MessageRecord], query_text: str
    ) -> RetrievalQuery:
        """The question to the retrieval plugins, still without its embedding."""
        s = self.settings
        # With a memory budget, the hits fill it by rank: ask each retriever for
        # `semantic_candidates`; without one, the top `semantic_context_size` are injected.
        semantic_limit = s.semantic_context_size
        if s.fill_budget and s.context_token_budget is not None and semantic_limit:
            semantic_limit = max(semantic_limit, s.semantic_candidates)
        return RetrievalQuery(
            scope=scope,
            text=query_text,
            embedding=None,
            request_ids=frozenset(r.id for r in records),
            semantic_limit=semantic_limit,
            recent_limit=s.recent_context_size,
            min_similarity=s.min_similarity,
            semantic_scope=s.semantic_scope,
            body=body,
            pending=tuple(self._inflight.get(scope.key, ())),
            recent_excluded=s.context_token_budget is None,
        )

    async def _plan(
        self,
        scope: Scope,
        messages: list[dict[str, Any]],
        records: list[MessageRecord],
        query: RetrievalQuery,
        result: Enrichment,
    ) -> ContextPlan:
        s = self.settings
        in_request = {r.id for r in records}
        # the same words said again are not memory; an empty text (a tool call) says nothing
        request_texts = {(r.role, r.text) for r in records if r.text}

        def is_in_request(record: MessageRecord) -> bool:
            return record.id in in_request or (record.role, record.text) in request_texts

        fill = s.fill_budget and s.context_token_budget is not None
        outcome = await self.hooks.retrieve(query, self.store)
        result.failures.extend(outcome.failures)
        recent = recent_window(outcome.results, s.recent_context_size, is_in_request)
        # Under a budget the recent window may be cut (`recent_budget_share`), so its
        # messages stay eligible as semantic memory; truncation injects each once.
        recent_ids = {r.id for r in recent} if s.context_token_budget is None else set()

        def excluded(record: MessageRecord) -> bool:
            return is_in_request(record) or record.id in recent_ids

        fused = fuse(outcome.results)
        if not fill:  # enough for the count after what is left out
            fused = fused[: query.semantic_depth]
        hits = [h for h in await self._resolve(fused) if not excluded(h.record)]
        if not fill:
            hits = hits[: s.semantic_context_size]
        neighbours: dict[str, MessageRecord] = {}
        paired = hits[: s.semantic_context_size] if fill else hits  # bring their answers
        if paired and (s.pair_answers or s.synapse_neighbours):
            known = {h.record.id: h.record for h in hits}  # an answer is often a hit too
            for hit_scope, ids in neighbour_ids(paired).items():
                neighbours.update((i, known[i]) for i in ids if i in known)
                missing = [i for i in ids if i not in known]
                if missing:
                    found = await anyio.to_thread.run_sync(self.store.get, hit_scope, missing)
                    neighbours.update({r.id: r for r in found})
        units = build_units(
            hits,
            neighbours,
            pair_answers=s.pair_answers,
            synapse_limit=s.synapse_neighbours,
            excluded=excluded,
            paired=s.semantic_context_size if fill else None,
        )
        lead = leading_system_count(messages)
        return ContextPlan(
            system=messages[:lead],
            semantic=units,
            recent=recent,
            conversation=messages[lead:],
            merge_system=s.merge_system_messages,
            instance=scope.instance,
        )

    async def _resolve(self, hits: list[Hit]) -> list[Hit]:
        """Read the messages behind references, one store read per scope; a
        message the store no longer has is left out."""
        wanted: dict[Scope, list[str]] = {}
        for hit in hits:
            if not hit.resolved:
                wanted.setdefault(hit.record.scope, []).append(hit.record.id)
        if not wanted:
            return hits
        found: dict[str, MessageRecord] = {}
        for scope, ids in wanted.items():
            records = await anyio.to_thread.run_sync(self.store.get, scope, ids)
            found.update((r.id, r) for r in records)
        return [
            h if h.resolved else replace(h, record=found[h.record.id], resolved=True)
            for h in hits
            if h.resolved or h.record.id in found
        ]

    def _budget(self, model: str | None, limit: int) -> TokenBudget:
        counter = memoised_counter(model)
        return TokenBudget(
            model=model,
            input_limit=limit,
            context_budget=self.settings.context_token_budget,
            count_message=counter,
            count_messages=lambda ms: sum(counter(m) for m in ms) + REPLY_PRIMING,
            recent_share=self.settings.recent_budget_share,
        )

    async def _count(self, message: Mapping[str, Any], model: str | None) -> int:
        if len(content_text(message.get("content"))) < 2000:
            return count_message(dict(message), model)
        return await anyio.to_thread.run_sync(count_message, dict(message), model)

    def _embed_for_write(self, texts: list[str]) -> Sequence[Sequence[float] | np.ndarray]:
        """By the store when it can (the child process), else here."""
        vectors = self.store.embed(texts)
        return vectors if vectors is not None else self.embedder(texts)

    async def _embed_one(self, text: str) -> list[float]:
        vectors = await anyio.to_thread.run_sync(self.embedder, [text])
        return _floats(vectors[0])

    # -- writes --------------------------------------------------------------------

    def _records(
        self,
        scope: Scope,
        messages: Iterable[Mapping[str, Any]],
        trace_id: str,
        model: str | None,
        source: str,
    ) -> list[MessageRecord]:
        """Chain-id'd records for the stored roles (system prompts are not memory)."""
        records: list[MessageRecord] = []
        prev: str | None = None
        for message in messages:
            role = message.get("role")
            if role not in STORED_ROLES:
                continue
            text = clean_text(message_text(message))
            calls = clean_value(message.get("tool_calls")) if role == "assistant" else None
            record = MessageRecord(
                id=chained_id(scope, str(role), text, calls, prev),
                partition=scope.partition,
                instance=scope.instance,
                role=str(role),
                text=text,
                name=clean_text(name) if isinstance(name := message.get("name"), str) else None,
                tool_calls=calls if isinstance(calls, list) and calls else None,
                tool_call_id=clean_value(_str_or_none(message.get("tool_call_id"))),
                trace_id=trace_id,
                model=model,
                source=source,
                prev_id=prev,
            )
            records.append(record)
            prev = record.id
        return records

    def _lane(self) -> WriteLane:
        loop = asyncio.get_running_loop()
        lane = self._lanes.get(loop)
        if lane is None:
            lane = WriteLane(
                self._write_batch,
                self.settings.write_delay_ms / 1000,
                in_process=self.store.in_process,
                set_aside=self._set_aside,
                probe=self._probe,
            )
            self._lanes[loop] = lane
        return lane

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
        if self.journal is not None and job.entry is not None:
            self.journal.done(job.entry)
            job.entry = None

    async def _probe(self) -> None:
        """A write to the store of nothing of anyone's; raises if the store refuses it."""
        await anyio.to_thread.run_sync(self.store.probe)

    def _enqueue(
        self,
        job: WriteJob,
        show: Sequence[MessageRecord] = (),
        release: Sequence[MessageRecord] = (),
    ) -> asyncio.Future[str | None]:
        """Queue a write; `show` (and `release`, shown earlier) stay visible to the
        recent window as in flight until it is done, so no request waits for it."""
        key = job.scope.key
        inflight = self._inflight.setdefault(key, [])
        inflight.extend(show)
        gone = [*show, *release]

        def done(future: asyncio.Future[str | None]) -> None:
            for record in gone:
                with contextlib.suppress(ValueError):
                    inflight.remove(record)
            if not inflight and self._inflight.get(key) is inflight:
                self._inflight.pop(key, None)
            error = None if future.cancelled() else future.exception()
            if error is not None:
                log_failure(
                    "storing memory failed; these messages wait in the journal only",
                    error,
                    level=logging.ERROR,
                )

        job.future.add_done_callback(done)
        self._lane().submit(job)
        return job.future

    def _journal(
        self, job: WriteJob, records: list[MessageRecord], answer: MessageRecord | None
    ) -> None:
        """Keep the exchange on disk until the store has it (survives a kill)."""
        if self.journal is None or self.deletions.covers(
            job.scope.partition, job.scope.instance, job.began
        ):
            return  # (deleted while the record filters ran)
        data = exchange_data(job, records, answer)
        try:
            job.entry = self.journal.append(data)
        except Exception as exc:
            log_failure("cannot write the memory journal; a crash would lose queued memory", exc)
            return
        if job.future.done():  # stored already
            self.journal.done(job.entry)

    async def _journal_filtered(self, job: WriteJob, visible: list[MessageRecord]) -> None:
        """Journal an exchange as the record filters (redaction) leave it; a replay
        after a crash then stores what the filters returned, filtered again."""
        if self.journal is None:
            return
        answer = None
        if job.answer is not None:
            answer, _ = await self.hooks.prepare_record(replace(job.answer))
        self._journal(job, visible, answer)

    async def _recover(self) -> None:
        """Queue what dead processes left in their journals (replayed once, by one)."""
        if self.journal is None:
            return
        await anyio.to_thread.run_sync(self.deletions.refresh)
        orphans = await anyio.to_thread.run_sync(lambda: list(self.journal.orphans()))  # type: ignore[union-attr]
        deleted = 0
        for path, entries in orphans:
            kept = [e for e in entries if not self.deletions.covers_entry(e.data)]
            if len(kept) < len(entries):  # of a scope deleted since: never stored again
                keep = {id(e) for e in kept}
                for entry in entries:
                    if id(entry) not in keep:
                        self.journal.done(entry)
            deleted += len(entries) - len(kept)
            if kept:
                logger.info("replaying %d unsaved exchanges from %s", len(kept), path)
            for entry in kept:
                try:
                    job = job_from_journal(entry.data)
                except (KeyError, TypeError, ValueError) as exc:  # BadRecord, mostly
                    logger.error("memory journal %s: bad entry skipped: %s", path, exc)
                    self.journal.done(entry)
                    continue
                job.entry = entry
                self._enqueue(job)
        if deleted:  # their bytes go too
            await anyio.to_thread.run_sync(self.journal.purge, self.deletions.covers_entry)

    @contextlib.asynccontextmanager
    async def _scope_lock(self, scope: Scope) -> AsyncIterator[None]:
        """One writer per scope: per event loop, and across processes on a server."""
        locks = self._locks.setdefault(asyncio.get_running_loop(), {})
        lock = locks.get(scope.key)
        if lock is None:
            lock = locks[scope.key] = asyncio.Lock()
        async with lock:
            if self.store.single_writer:
                yield
                return
            directory = self.settings.data_dir / "locks"
            fd = await anyio.to_thread.run_sync(lock_stripe, directory, scope.key)
            try:
                yield
            finally:
                os.close(fd)

    async def _write_batch(self, scope: Scope, jobs: list[WriteJob]) -> None:
        async with self._scope_lock(scope):
            await self._write_jobs(scope, jobs)
        if self.journal is not None:
            for job in jobs:
                if job.entry is not None:
                    self.journal.done(job.entry)

    async def _write_jobs(self, scope: Scope, jobs: list[WriteJob]) -> None:
        """Store what is new in the jobs, in order, in one batch.

        A client that sends only its newest message and says the same thing
        again gets a new turn, chained to what the scope said last; a client
        re-sending its history writes nothing. Each job learns the id the next
        message chains to (`last_id`) and what it wrote (`written`).
        """
        # under the scope's write lock: a delete holds it while the store forgets the
        # scope, and records itself first, so what began before it is seen here
        self._learned(await anyio.to_thread.run_sync(self.deletions.refresh))
        latest = self.deletions.latest(scope.partition, scope.instance)
        for job in jobs:
            if job.began <= latest:
                job.written, job.last_id = [], None
        jobs = [job for job in jobs if job.began > latest]
        if not jobs:
            return
        store = self.store
        ids = [r.id for job in jobs for r in job.records]
        existing = await anyio.to_thread.run_sync(store.existing_ids, scope, ids) if ids else set()
        checked = set(ids)
        traces = [job.trace_id for job in jobs if job.verify and job.trace_id]
        stored_traces = (
            await anyio.to_thread.run_sync(store.traces_present, scope, traces) if traces else set()
        )
        tail = await anyio.to_thread.run_sync(store.tail, scope)
        seen = set(existing)
        last = tail[1]
        chosen: list[tuple[WriteJob, list[MessageRecord]]] = []
        for job in jobs:
            records = job.records
            prev = job.after.last_id if job.after is not None else None
            only = records[0] if len(records) == 1 else None
            rechained = False
            if (
                only is not None
                and only.prev_id is None
                and only.id in seen
                and last is not None
                and last.id != only.id
            ):
                chained = chained_id(scope, only.role, only.text, only.tool_calls, last.id)
                records = [replace(only, id=chained, prev_id=last.id)]
                rechained = True
            if job.answer is not None:
                records = [*records, answer_after(job.answer, records[-1].id if records else prev)]
            job.last_id = records[-1].id if records else prev
            # a retried job found in the store: its ids tell what landed (a big one
            # goes in several upserts), except a re-chained turn, whose id moved on
            if job.trace_id in stored_traces and (rechained or not records):
                continue
            new = [r for r in records if r.id not in seen]
            seen.update(r.id for r in new)
            if new:
                last = new[-1]
            chosen.append((job, new))
        unchecked = [r.id for _, new in chosen for r in new if r.id not in checked]
        found = set()
        if unchecked:
            found = await anyio.to_thread.run_sync(store.existing_ids, scope, unchecked)
        fresh: list[MessageRecord] = []
        known: dict[str, list[float]] = {}
        for job, new in chosen:
            known.update(job.known)
            job.written = []
            for record in new:
                if record.id in found:
                    continue
                prepared, _ = await self.hooks.prepare_record(record)
                if prepared is not None:
                    fresh.append(prepared)
                    job.written.append(prepared.id)
        if fresh:
            try:
                await self._store(scope, fresh, known, tail)
            except Exception:  # stale caches (scope deleted elsewhere)? once more, afresh
                tail = await anyio.to_thread.run_sync(store.tail, scope)
                await self._store(scope, fresh, known, tail)

    async def _store(
        self,
        scope: Scope,
        fresh: list[MessageRecord],
        known: dict[str, list[float]],
        tail: tuple[int, MessageRecord | None, list[float] | None],
    ) -> None:
        """Embed, number and link new messages, then hand them to the store plugins."""
        texts = [embedding_text(r) for r in fresh]
        missing = [t for t in dict.fromkeys(texts) if t not in known]
        if missing:
            vectors = await anyio.to_thread.run_sync(self._embed_for_write, missing)
            known = {
                **known,
                **{t: _floats(v) for t, v in zip(missing, vectors, strict=True)},
            }
        embeddings = [known[t] for t in texts]
        next_seq, last, last_vector = tail
        for index, (record, vector) in enumerate(zip(fresh, embeddings, strict=True)):
            record.seq = next_seq
            record.before_id = last.id if last is not None else None
            record.after_id = fresh[index + 1].id if index + 1 < len(fresh) else None
            record.embedding_model = self.embedding_model
            threshold = self.settings.synapse_threshold
            if (
                last is not None
                and last_vector is not None
                and cosine(last_vector, vector) >= threshold
            ):
                record.synapse_prev = last.id
            next_seq, last, last_vector = next_seq + 1, record, vector
        outcome = await self.hooks.store(scope, fresh, embeddings)
        for failure in outcome.failures:
            if failure.plugin == self.store.name:
                self.store.forget(scope)
                raise failure.error


def answer_after(template: MessageRecord, prev_id: str | None) -> MessageRecord:
    """The answer record chained after the message it answers."""
    chained = chained_id(template.scope, "assistant", template.text, template.tool_calls, prev_id)
    return replace(template, id=chained, prev_id=prev_id)


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


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidChatRequest("'messages' must be a non-empty list")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise InvalidChatRequest("every message must be an object with a 'role'")
    return messages


def leading_system_count(messages: Sequence[Mapping[str, Any]]) -> int:
    count = 0
    for message in messages[:-1]:
        if message.get("role") not in ("system", "developer"):
            break
        count += 1
    return count


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return content_text(messages[-1].get("content")) if messages else ""


def embedding_text(record: MessageRecord) -> str:
    content = record.to_message().get("content")
    return content if isinstance(content, str) else record.text


def _floats(vector: Sequence[float] | np.ndarray) -> list[float]:
    """A model's vector as Python floats (numpy's `tolist` is 30x faster than a loop)."""
    if isinstance(vector, np.ndarray):
        floats: list[float] = vector.tolist()
        return floats
    return [float(x) for x in vector]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / norm if norm else 0.0


_TOKEN_MEMO: dict[tuple[Any, ...], int] = {}
TOKEN_MEMO_MAX = 100_000  # plain messages whose count is kept (then it starts again)
_PLAIN_KEYS = frozenset({"role", "content", "name"})


def memoised_counter(model: str | None) -> Callable[[dict[str, Any]], int]:
    """`count_message` with a memory: a plain text message (a stored one, a
    note) is tokenised once in the process, however many requests bring it
    back and however often truncation and the report ask (0.5 ms a request)."""

    def count(message: dict[str, Any]) -> int:
        content, role, name = message.get("content"), message.get("role"), message.get("name")
        # only str keys: a `name` (or role) that is an object would make the key unhashable
        plain = isinstance(role, str) and (name is None or isinstance(name, str))
        if not plain or not isinstance(content, str) or not message.keys() <= _PLAIN_KEYS:
            return count_message(message, model)
        key = (model, role, content, name)
        tokens = _TOKEN_MEMO.get(key)
        if tokens is None:
            if len(_TOKEN_MEMO) >= TOKEN_MEMO_MAX:
                _TOKEN_MEMO.clear()
            tokens = _TOKEN_MEMO[key] = count_message(message, model)
        return tokens

    return count


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _render_and_report(
    plan: ContextPlan, budget: TokenBudget
) -> tuple[list[dict[str, Any]], SectionReport, SectionReport]:
    sims = {u.hit_id: u.similarity for u in plan.semantic}
    semantic = SectionReport(
        [
            InjectedMessage(
                r.id, r.role, r.text, budget.count_message(r.to_message()), sims.get(r.id)
            )
            for unit in plan.semantic
            for r in unit.records
        ]
    )
    recent = SectionReport(
        [
            InjectedMessage(r.id, r.role, r.text, budget.count_message(r.to_message()))
            for r in plan.recent
        ]
    )
    return plan.render(), semantic, recent
