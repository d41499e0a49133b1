"""The write path: which messages are new, and how they chain, number and link.

A message's id is a hash of its scope, role, content and the id before it, so
a client re-sending its history writes nothing, and one that sends only its
newest message, saying the same thing again, gets a new turn chained to what
the scope said last. What is new is embedded (by the store when it can),
numbered after the scope's last message, linked to its neighbours (a synapse
when consecutive messages are similar enough) and handed to the
`reservoir_store` plugins. Imports keep ids, links and times as exported.

The caller holds the scope's write lock (`Writes.scope_lock`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import anyio.to_thread

from reservoir_middleware.memory._lane import WriteJob
from reservoir_middleware.memory._passages import passages_of
from reservoir_middleware.memory._token_memo import precount_messages
from reservoir_middleware.memory.embeddings import as_floats, cosine
from reservoir_middleware.memory.validation import STORED_ROLES
from reservoir_middleware.plugins import Hooks
from reservoir_middleware.records import (
    MessageRecord,
    Scope,
    chained_id,
    clean_text,
    clean_value,
    embedding_text,
    message_text,
)
from reservoir_middleware.store import Passages, Storage, Tail

Exported = tuple[MessageRecord, list[float] | None]  # a record and its vector, if kept


class Writer:
    """Stores what is new in write jobs, and imported records, one scope at a time."""

    def __init__(
        self,
        hooks: Hooks,
        store: Storage,
        embedder: Callable[[list[str]], Sequence[Any]],
        embedding_model: str,
        synapse_threshold: float,
    ) -> None:
        self.hooks = hooks
        self.store = store
        self.embedder = embedder
        self.embedding_model = embedding_model
        self.synapse_threshold = synapse_threshold

    async def write(self, scope: Scope, jobs: list[WriteJob]) -> None:
        """Store what is new in the jobs, in order, in one batch.

        A client that sends only its newest message and says the same thing
        again gets a new turn, chained to what the scope said last; a client
        re-sending its history writes nothing. Each job learns the id the next
        message chains to (`last_id`) and what it wrote (`written`).
        """
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
            new = [r for r in records if r.id not in seen and r.id not in job.forgotten]
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
        tail: Tail,
    ) -> None:
        """Embed, number and link new messages, then hand them to the store plugins."""
        texts = [embedding_text(r) for r in fresh]
        missing = [t for t in dict.fromkeys(texts) if t not in known]
        embedded = await anyio.to_thread.run_sync(self._embed_for_write, missing, texts)
        known = {**known, **embedded.vectors}
        embeddings = [known[t] for t in texts]
        next_seq, last, last_vector = tail
        for index, (record, vector) in enumerate(zip(fresh, embeddings, strict=True)):
            record.seq = next_seq
            record.before_id = last.id if last is not None else None
            record.after_id = fresh[index + 1].id if index + 1 < len(fresh) else None
            record.embedding_model = self.embedding_model
            if (
                last is not None
                and last_vector is not None
                and cosine(last_vector, vector) >= self.synapse_threshold
            ):
                record.synapse_prev = last.id
            next_seq, last, last_vector = next_seq + 1, record, vector
        await self._hand_over(scope, fresh, embeddings, embedded.passages_of(texts))
        # their token counts now, not on the request that first injects them
        await anyio.to_thread.run_sync(precount_messages, [r.to_message() for r in fresh])

    async def _hand_over(
        self,
        scope: Scope,
        records: list[MessageRecord],
        embeddings: list[list[float]],
        passages: Passages,
    ) -> None:
        """To the store plugins; the store's own failure fails the write."""
        outcome = await self.hooks.store(scope, records, embeddings, passages)
        for failure in outcome.failures:
            if failure.plugin == self.store.name:
                self.store.forget(scope)
                raise failure.error

    def _embed_for_write(
        self, missing: list[str], texts: list[str], *, by_store: bool = True
    ) -> _Embedded:
        """The vectors of the `missing` texts and of the passages of all `texts` (the
        long ones: `memory._passages`): by the store when it can (the child
        process), else here (an import: with all the engine's threads). The
        passages go in a batch of their own: padded to the longest message (256
        word pieces) they would take 1.5x the time."""
        missing = list(dict.fromkeys(missing))
        cut = dict(zip(texts, passages_of(self.embedder, texts), strict=True))
        pieces = list(dict.fromkeys(p for text in texts for p in cut[text]))
        vectors = self._vectors(missing, by_store)
        return _Embedded(vectors, cut, self._vectors(pieces, by_store))

    def _vectors(self, texts: list[str], by_store: bool) -> dict[str, list[float]]:
        if not texts:
            return {}
        vectors = self.store.embed(texts) if by_store else None
        if vectors is None:
            vectors = self.embedder(texts)
        return {t: as_floats(v) for t, v in zip(texts, vectors, strict=True)}

    async def import_scope(self, scope: Scope, items: Sequence[Exported]) -> tuple[int, int]:
        """Store exported records of one scope as they are (ids, links, times kept);
        returns (written, already stored). Vectors are reused when they come from
        the configured embedding model (and the record filters left the text),
        else recomputed; the records are numbered after the scope's last."""
        ids = [r.id for r, _ in items]
        stored = await anyio.to_thread.run_sync(self.store.existing_ids, scope, ids)
        fresh: list[Exported] = []
        seen: set[str] = set()
        existing = 0
        for record, vector in sorted(items, key=lambda item: (item[0].seq, item[0].timestamp)):
            if record.id in stored or record.id in seen:
                existing += 1
                continue
            seen.add(record.id)
            prepared, _ = await self.hooks.prepare_record(record)
            if prepared is not None:
                reuse = vector if record.embedding_model == self.embedding_model else None
                fresh.append((prepared, reuse if prepared.text == record.text else None))
        if not fresh:
            return 0, existing
        texts = [embedding_text(r) for r, _ in fresh]
        todo = [t for (_, v), t in zip(fresh, texts, strict=True) if v is None]
        embedded = await anyio.to_thread.run_sync(
            functools.partial(self._embed_for_write, todo, texts, by_store=False)
        )
        vectors = [
            v if v is not None else embedded.vectors[t]
            for (_, v), t in zip(fresh, texts, strict=True)
        ]
        next_seq = (await anyio.to_thread.run_sync(self.store.tail, scope))[0]
        records = [r for r, _ in fresh]
        for offset, record in enumerate(records):
            record.seq = next_seq + offset
            record.embedding_model = self.embedding_model
        await self._hand_over(scope, records, vectors, embedded.passages_of(texts))
        return len(records), existing


@dataclass
class _Embedded:
    """Vectors of texts to write, and of their passages."""

    vectors: dict[str, list[float]]  # text -> its vector
    cut: dict[str, list[str]]  # text -> its passages
    pieces: dict[str, list[float]]  # passage -> its vector

    def passages_of(self, texts: list[str]) -> Passages:
        """Each text's passage vectors, in order (empty for a text read whole)."""
        return [[self.pieces[p] for p in self.cut[t]] for t in texts]


def message_records(
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


def answer_after(template: MessageRecord, prev_id: str | None) -> MessageRecord:
    """The answer record chained after the message it answers."""
    chained = chained_id(template.scope, "assistant", template.text, template.tool_calls, prev_id)
    return replace(template, id=chained, prev_id=prev_id)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
