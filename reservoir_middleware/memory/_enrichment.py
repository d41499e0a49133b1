"""What an enrichment gives back: the rewritten request, what went into it, and
what the write side keeps of it until the answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reservoir_middleware.context import (
    ContextPlan,
    InjectedMessage,
    SectionReport,
    TokenBudget,
    line_tokens,
)
from reservoir_middleware.memory._lane import WriteJob
from reservoir_middleware.memory.tokens import count_text
from reservoir_middleware.plugins import PluginFailure
from reservoir_middleware.records import MessageRecord, Scope
from reservoir_middleware.settings import MemoryMode


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
class Pending:
    """What the write side keeps of one enrichment until its answer (not public)."""

    began: float = 0.0  # a delete of the scope after it: nothing of the exchange is stored
    model: str | None = None
    known: dict[str, list[float]] = field(default_factory=dict)  # text -> its embedding
    visible: list[MessageRecord] = field(default_factory=list)  # shown while in flight
    job: WriteJob | None = None  # with store=True: the queued write of the request
    deleted: bool = False  # the scope was deleted while its memory was read
    blocks: list[str] = field(default_factory=list)  # the memory blocks the request carries


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
    block: str = ""
    """This turn's memory block as sent ("": none)."""
    carried_tokens: int = 0
    """Tokens of the blocks earlier turns' user messages carry again (a cached prefix)."""
    memory_mode: MemoryMode = "on"  # what memory did: `read`/`off` store nothing
    _pending: Pending = field(default_factory=Pending, init=False, repr=False, compare=False)

    @property
    def degraded(self) -> bool:
        return bool(self.failures)

    @property
    def memory_tokens(self) -> int:
        """Tokens of this turn's block: its lines, dates, notes and frame (counted
        when asked, not on the request path)."""
        return count_text(self.block + "\n\n", self._pending.model) if self.block else 0


def render_and_report(
    plan: ContextPlan, budget: TokenBudget
) -> tuple[list[dict[str, Any]], SectionReport, SectionReport, str]:
    """The request's messages as sent, what each section injected (a line's
    tokens each), and this turn's block."""
    sims = {u.hit_id: u.similarity for u in plan.semantic}
    instance = plan.instance
    semantic = SectionReport(
        [
            InjectedMessage(r.id, r.role, r.text, line_tokens(r, instance, budget), sims.get(r.id))
            for unit in plan.semantic
            for r in unit.records
        ]
    )
    recent = SectionReport(
        [
            InjectedMessage(r.id, r.role, r.text, line_tokens(r, instance, budget))
            for r in plan.recent
        ]
    )
    block = plan.block()
    return plan.render(block), semantic, recent, block
