"""What an enriched request and its answer become: writes, queued and journalled.

`store=True`: the request's new messages are queued at once. `store=
"with_answer"` (the middleware's way): they show in the recent window as in
flight, and are written with the answer in one batch when `record_answer`
is called, journalled first. A delete of the scope after the exchange began
drops all of it.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Literal

from reservoir_middleware.memory._deletions import Deletions
from reservoir_middleware.memory._enrichment import Enrichment
from reservoir_middleware.memory._lane import WriteJob
from reservoir_middleware.memory._recovery import ExchangeJournal
from reservoir_middleware.memory._writer import answer_after
from reservoir_middleware.memory._writes import Writes
from reservoir_middleware.plugins import Hooks
from reservoir_middleware.records import Answer, MessageRecord, clean_text, clean_value

FILTER_HOOK = "reservoir_prepare_record"


class Exchanges:
    """The write side of enrichments: accept, record the answer, discard."""

    def __init__(
        self, writes: Writes, journal: ExchangeJournal, deletions: Deletions, hooks: Hooks
    ) -> None:
        self.writes = writes
        self.journal = journal
        self.deletions = deletions
        self.hooks = hooks

    async def accept(self, result: Enrichment, store: bool | Literal["with_answer"]) -> None:
        """Queue the request's messages now, or (`"with_answer"`) show them as in
        flight until `record_answer` writes them with the answer."""
        pending = result._pending
        pending.visible = await self._visible(result.records)
        if store == "with_answer" and not pending.deleted:
            self.writes.inflight.show(result.scope.key, pending.visible)
            return
        pending.job = WriteJob(
            result.scope,
            result.records,
            pending.known,
            trace_id=result.trace_id,
            began=pending.began,
        )
        self.writes.enqueue(pending.job, show=pending.visible)

    async def _visible(self, records: list[MessageRecord]) -> list[MessageRecord]:
        """The records as the recent window may show them before they are written:
        filtered by the `reservoir_prepare_record` plugins (redaction) when any."""
        if not self.hooks.implemented(FILTER_HOOK):
            return records
        visible = []
        for record in records:
            prepared, _ = await self.hooks.prepare_record(replace(record))
            if prepared is not None:
                visible.append(prepared)
        return visible

    def record_answer(
        self, enrichment: Enrichment, answer: Answer | None, *, complete: bool
    ) -> asyncio.Future[str | None]:
        scope, pending = enrichment.scope, enrichment._pending
        if self.deletions.covers(scope.partition, scope.instance, pending.began):
            self.discard(enrichment)  # the scope was deleted since the exchange began
            stored: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            stored.set_result(None)
            return stored
        template = None
        if answer is not None:
            model = answer.model or pending.model
            template = MessageRecord(
                id="",
                partition=scope.partition,
                instance=scope.instance,
                role="assistant",
                text=without_blocks(
                    clean_text(answer.content or (answer.refusal or "")), pending.blocks
                ),
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
        filtered = self.hooks.implemented(FILTER_HOOK)
        shown = [preview] if preview is not None and not filtered else []
        if pending.job is not None:  # the request is queued already
            job = WriteJob(
                scope,
                [],
                answer=template,
                after=pending.job,
                trace_id=enrichment.trace_id,
                began=pending.began,
            )
            return self.writes.enqueue(job, show=shown)
        job = WriteJob(
            scope,
            records,
            pending.known,
            answer=template,
            trace_id=enrichment.trace_id,
            began=pending.began,
        )
        if filtered:  # nothing unfiltered may reach the disk, so the journal waits for them
            self.journal.keep_filtered(job, pending.visible)
        else:
            self.journal.keep(job, job.records, job.answer)
        return self.writes.enqueue(job, show=shown, release=pending.visible)

    def discard(self, enrichment: Enrichment) -> None:
        """Forget the messages of a `store="with_answer"` request that will not be sent."""
        self.writes.inflight.remove(enrichment.scope.key, enrichment._pending.visible)


def without_blocks(text: str, blocks: list[str]) -> str:
    """An answer without the memory blocks it repeats word for word (a model, or
    a stand-in, echoing its prompt): what they show is stored already, and a
    stored copy would come back as memory inside memory."""
    for block in blocks:
        if block and block in text:
            text = text.replace(block + "\n\n", "").replace(block, "")
    return text
