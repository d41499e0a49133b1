"""The request path: a chat request parsed once, memory retrieved, the budget filled.

`RequestPath` is built once per engine; each enrichment is an `_Enriching`
(per call: the request, its query, its result). While the query is embedded
the `reservoir_prefetch` plugins start on it; then every `reservoir_retrieve`
plugin proposes candidates, the core fuses and reads them, pairs answers and
synapse neighbours, and the `reservoir_truncate` plugin fits the plan to the
token budget before it is rendered into the request's messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence, Set
from dataclasses import replace
from typing import Any

import anyio.to_thread

from reservoir_middleware._logs import current_trace
from reservoir_middleware.context import (
    ContextPlan,
    RetrievalQuery,
    TokenBudget,
    attach,
    chronological,
)
from reservoir_middleware.memory._blocks import FOLLOWUP_SHARE, Carried, carried_blocks, encode
from reservoir_middleware.memory._chat import ChatRequest
from reservoir_middleware.memory._deletions import Deletions
from reservoir_middleware.memory._enrichment import Enrichment, TooLong, render_and_report
from reservoir_middleware.memory._relevance import (
    ALL,
    Relevance,
    best_similarity,
    exact_match,
    relevance,
    single_retriever,
    trimmed,
)
from reservoir_middleware.memory._selection import (
    Hit,
    build_units,
    fuse,
    neighbour_ids,
    recent_window,
)
from reservoir_middleware.memory._token_memo import memoised_counter, memoised_text_counter
from reservoir_middleware.memory.tokens import (
    REPLY_PRIMING,
    ModelLimits,
    count_message,
)
from reservoir_middleware.plugins import Hooks, PluginFailure
from reservoir_middleware.records import MessageRecord, Scope, content_text
from reservoir_middleware.settings import ReservoirSettings
from reservoir_middleware.store import MemoryStore


class RequestPath:
    """Enriches chat requests: one per engine, an `_Enriching` per call."""

    def __init__(
        self,
        settings: ReservoirSettings,
        hooks: Hooks,
        store: MemoryStore,
        limits: ModelLimits,
        deletions: Deletions,
        embed: Callable[[str], Awaitable[list[float]]],
        in_flight: Callable[[Scope], tuple[MessageRecord, ...]],
    ) -> None:
        self.settings = settings
        self.hooks = hooks
        self.store = store
        self.limits = limits
        self.deletions = deletions
        self.embed = embed
        self.in_flight = in_flight

    async def enrich(self, scope: Scope, body: Mapping[str, Any], began: float) -> Enrichment:
        """Raises InvalidChatRequest for a body without chat messages."""
        new_body, rewrite = await self.hooks.rewrite_request(dict(body), scope)
        request = ChatRequest.parse(scope, new_body, self.limits)
        current_trace.set(request.trace_id)  # for the logs of this request
        return await _Enriching(self, request, began, rewrite.failures).run()

    def query(self, request: ChatRequest, shown: Set[str] = frozenset()) -> RetrievalQuery:
        """The question to the retrieval plugins, still without its embedding;
        `shown`: messages the request's earlier memory blocks show already."""
        s = self.settings
        # With a memory budget, the hits fill it by rank: ask each retriever for
        # `semantic_candidates`; without one, the top `semantic_context_size` are injected.
        semantic_limit = s.semantic_context_size
        if s.fill_budget and s.context_token_budget is not None and semantic_limit:
            semantic_limit = max(semantic_limit, s.semantic_candidates)
        return RetrievalQuery(
            scope=request.scope,
            text=request.query_text,
            embedding=None,
            request_ids=frozenset(r.id for r in request.records) | frozenset(shown),
            semantic_limit=semantic_limit,
            recent_limit=s.recent_context_size,
            min_similarity=s.min_similarity,
            semantic_scope=s.semantic_scope,
            body=request.body,
            pending=self.in_flight(request.scope),
            recent_excluded=s.context_token_budget is None,
        )

    def budget(
        self,
        model: str | None,
        limit: int,
        recent: Sequence[MessageRecord] = (),
        carried: Sequence[str] = (),
    ) -> TokenBudget:
        """The limits of one request. Its memory budget is what the blocks its
        earlier turns carry leave, but at least `FOLLOWUP_SHARE` of it: a new
        subject late in a conversation still gets memory."""
        counter = memoised_counter(model)
        text_counter = memoised_text_counter(model)
        context_budget = self.settings.context_token_budget
        if context_budget is not None and carried:
            taken = sum(text_counter(t) + 2 for t in carried)
            context_budget = max(context_budget - taken, int(context_budget * FOLLOWUP_SHARE))
        return TokenBudget(
            model=model,
            input_limit=limit,
            context_budget=context_budget,
            count_message=counter,
            count_messages=lambda ms: sum(counter(m) for m in ms) + REPLY_PRIMING,
            recent_share=self.recent_share(recent),
            long_message=self.settings.long_message_tokens,
            count_text=text_counter,
        )

    def recent_share(self, recent: Sequence[MessageRecord]) -> float:
        """`recent_budget_share`, fading with the age of the newest recent message:
        a conversation picked up days later needs its last turns less than what
        its question is about; one going on needs them whole."""
        share, fade = self.settings.recent_budget_share, self.settings.recent_fade_hours
        if not recent or fade <= 0:
            return share
        hours = (time.time() - max(r.timestamp for r in recent)) / 3600
        if hours <= 1 or fade <= 1:
            return share if hours <= max(1.0, fade) else 0.0
        return share * max(0.0, 1 - (hours - 1) / (fade - 1))

    async def resolve(self, hits: list[Hit]) -> list[Hit]:
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

    async def passthrough(self, scope: Scope, body: Mapping[str, Any], began: float) -> Enrichment:
        """The request as sent (after the `reservoir_rewrite_request` plugins),
        for a memory mode that does not read (`write`, `off`): nothing is embedded,
        retrieved nor injected. Its records are kept for the write side, and the
        "too long" check still holds. Raises InvalidChatRequest as `enrich` does."""
        new_body, rewrite = await self.hooks.rewrite_request(dict(body), scope)
        request = ChatRequest.parse(scope, new_body, self.limits)
        current_trace.set(request.trace_id)
        result = Enrichment(scope, request.body, request.trace_id)
        result.failures = list(rewrite.failures)
        result._pending.began, result._pending.model = began, request.model
        if request.refuse_over is not None:
            last_tokens = await _count(request.messages[-1], request.model)
            if last_tokens > request.refuse_over:
                result.too_long = TooLong(last_tokens, request.refuse_over)
                return result
        result.changed = self.hooks.implemented("reservoir_rewrite_request") and new_body != body
        result.records = request.records
        pending = result._pending
        pending.deleted = self.deletions.covers(scope.partition, scope.instance, began)
        return result


class _Enriching:
    """One enrichment in progress."""

    def __init__(
        self, path: RequestPath, request: ChatRequest, began: float, failures: list[PluginFailure]
    ) -> None:
        self.path = path
        self.request = request
        self.result = Enrichment(request.scope, request.body, request.trace_id)
        self.result.failures = list(failures)
        self.result._pending.began = began
        self.result._pending.model = request.model

    async def run(self) -> Enrichment:
        path, request, result = self.path, self.request, self.result
        if request.refuse_over is not None:
            last_tokens = await _count(request.messages[-1], request.model)
            if last_tokens > request.refuse_over:
                result.too_long = TooLong(last_tokens, request.refuse_over)
                return result
        try:
            carried = await carried_blocks(
                path.store,
                path.in_flight,
                request.scope,
                request.records,
                request.anchor,
                others=path.settings.semantic_scope == "partition",
            )
        except Exception as exc:  # the store is down: memory as retrieval can, nothing lost
            result.failures.append(PluginFailure("store", "memory blocks", exc))
            carried = Carried()
        query = path.query(request, carried.shown)
        text = request.query_text if not carried.reused else ""
        # what needs no embedding (BM25) is scored while the query is embedded
        early = None
        if text and path.hooks.implemented("reservoir_prefetch"):
            early = asyncio.ensure_future(path.hooks.prefetch(query, path.store))
        embedding = await path.embed(text) if text else None
        if early is not None:
            await early
        query = replace(query, embedding=embedding)
        plan = await self._plan(query, carried)
        budget = path.budget(
            request.model, request.input_limit, plan.recent, list(carried.texts.values())
        )
        truncated, outcome = await path.hooks.truncate(plan, budget)
        result.failures.extend(outcome.failures)
        plan = truncated or plan
        scope, pending = request.scope, result._pending
        pending.deleted = path.deletions.covers(scope.partition, scope.instance, pending.began)
        if pending.deleted:  # while its memory was read: what was read may be gone
            plan = replace(plan, semantic=[], recent=[])
        (
            rendered,
            result.semantic,
            result.recent,
            result.block,
        ) = await anyio.to_thread.run_sync(render_and_report, plan, budget)
        if result.semantic.messages or result.recent.messages or rendered != request.messages:
            result.body = {**request.body, "messages": rendered}
            result.changed = True
        result.carried_tokens = sum(budget.block_tokens(t) for t in carried.texts.values())
        pending.blocks = [*carried.texts.values(), *([result.block] if result.block else [])]
        result.records = self._with_block(plan, carried)
        pending.known = {text: embedding} if embedding is not None else {}
        return result

    def _with_block(self, plan: ContextPlan, carried: Carried) -> list[MessageRecord]:
        """The request's records, the newest user message's with the ids of the
        block it got (stored with it, shown with it on later turns)."""
        records, anchor = self.request.records, self.request.anchor
        if anchor is None or carried.reused:
            return records
        semantic = [r for unit in chronological(plan.semantic) for r in unit.records]
        block = encode(semantic, plan.recent, self.request.scope.instance)
        if block == records[anchor].memory:
            return records
        return [*records[:anchor], replace(records[anchor], memory=block), *records[anchor + 1 :]]

    def _conversation(self, carried: Carried) -> list[dict[str, Any]]:
        """The client's turns after its system messages, each user message with
        the block it carried on earlier turns, as it was then."""
        request, lead = self.request, self.request.system_count
        conversation = list(request.messages[lead:])
        for index, block in sorted(carried.texts.items(), reverse=True):  # inserts shift
            at = request.record_positions[index] - lead
            if 0 <= at < len(conversation):
                attach(conversation, at, block)
        return conversation

    async def _plan(self, query: RetrievalQuery, carried: Carried) -> ContextPlan:
        s, store, request = self.path.settings, self.path.store, self.request
        records = request.records
        lead = request.system_count
        if carried.reused:  # this turn's block is the one it got before
            return ContextPlan(
                system=request.messages[:lead],
                semantic=[],
                recent=[],
                conversation=self._conversation(carried),
                merge_system=s.merge_system_messages,
                instance=request.scope.instance,
            )
        in_request = {r.id for r in records} | carried.shown
        # the same words said again are not memory; an empty text (a tool call) says nothing
        request_texts = {(r.role, r.text) for r in records if r.text}

        def is_in_request(record: MessageRecord) -> bool:
            return record.id in in_request or (record.role, record.text) in request_texts

        fill = s.fill_budget and s.context_token_budget is not None
        outcome = await self.path.hooks.retrieve(query, store)
        self.result.failures.extend(outcome.failures)
        recent = recent_window(outcome.results, s.recent_context_size, is_in_request)
        # Under a budget the recent window may be cut (`recent_budget_share`), so its
        # messages stay eligible as semantic memory; truncation injects each once.
        recent_ids = {r.id for r in recent} if s.context_token_budget is None else set()

        def excluded(record: MessageRecord) -> bool:
            return is_in_request(record) or record.id in recent_ids

        fused, gate = await self._relevant(query, fuse(outcome.results))
        if not fill:  # enough for the count after what is left out
            fused = fused[: query.semantic_depth]
        hits = [h for h in await self.path.resolve(fused) if not excluded(h.record)]
        if not fill:
            hits = hits[: s.semantic_context_size]
        neighbours: dict[str, MessageRecord] = {}
        paired = hits[: s.semantic_context_size] if fill else hits  # bring their answers
        paired = [] if gate.alone else paired  # an unrelated question's lone hit: alone
        if paired and (s.pair_answers or s.synapse_neighbours):
            known = {h.record.id: h.record for h in hits}  # an answer is often a hit too
            for hit_scope, ids in neighbour_ids(paired).items():
                neighbours.update((i, known[i]) for i in ids if i in known)
                missing = [i for i in ids if i not in known]
                if missing:
                    found = await anyio.to_thread.run_sync(store.get, hit_scope, missing)
                    neighbours.update({r.id: r for r in found})
        units = build_units(
            hits,
            neighbours,
            pair_answers=s.pair_answers,
            synapse_limit=s.synapse_neighbours,
            excluded=excluded,
            paired=s.semantic_context_size if fill else None,
        )
        count = memoised_text_counter(request.model)  # stored texts: counted once
        units = trimmed(units, gate, lambda r: count(r.text))
        return ContextPlan(
            system=request.messages[:lead],
            semantic=units,
            recent=recent,
            conversation=self._conversation(carried),
            merge_system=s.merge_system_messages,
            instance=request.scope.instance,
        )

    async def _relevant(
        self, query: RetrievalQuery, fused: list[Hit]
    ) -> tuple[list[Hit], Relevance]:
        """Less semantic memory for a question little related to what is stored
        (`relevance_floor`, `relevance_full`), whichever plugins proposed the hits."""
        if not fused or query.embedding is None:
            return fused, ALL
        best = best_similarity(fused)
        if best is None:  # no dense candidate among them: the store's best
            best = await anyio.to_thread.run_sync(_best_stored, self.path.store, query)
        s = self.path.settings
        gate = relevance(
            best,
            s.relevance_floor,
            s.relevance_full,
            s.relevance_band_tokens,
            s.relevance_band_message_tokens,
            single=single_retriever(s.disable_plugins),
        )
        if gate.alone:
            return fused[:1], gate
        if gate.cap == 0:  # unrelated, unless it names what one message holds exactly
            top = await self.path.resolve(fused[: s.semantic_candidates])
            match = exact_match(query.text, top)
            return ([match], Relevance(alone=True)) if match is not None else ([], gate)
        return fused, gate


def _best_stored(store: MemoryStore, query: RetrievalQuery) -> float | None:
    """The best dense similarity of the query to the scopes it searches."""
    assert query.embedding is not None
    found = [
        similarity
        for scope in query.search_scopes(store)
        for _, similarity in store.nearest(scope, query.embedding, 1)
    ]
    return max(found, default=None)


async def _count(message: Mapping[str, Any], model: str | None) -> int:
    if len(content_text(message.get("content"))) < 2000:
        return count_message(dict(message), model)
    return await anyio.to_thread.run_sync(count_message, dict(message), model)
