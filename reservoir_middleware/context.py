"""What retrieval hands to truncation, and what truncation hands back.

These are the values plugins see: a retrieval query, the candidates they
return, and the context plan (system messages, memory sections, the client's
own turns) that the truncation hook trims to the token budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from reservoir_middleware.records import MessageRecord, Scope, content_text

if TYPE_CHECKING:
    from reservoir_middleware.store import MemoryStore

Section = Literal["semantic", "recent"]

# A memory block, as the model reads it: the text put before the user message
# it was retrieved for (see `memory_block`).
MEMORY_OPEN = "<memory>"
MEMORY_CLOSE = "</memory>"
SEMANTIC_NOTE = "Related messages from earlier conversations:"
RECENT_NOTE = "The latest messages before this conversation:"


@dataclass(frozen=True)
class RetrievalQuery:
    """One enrichment's question to the retrieval plugins."""

    scope: Scope
    text: str
    embedding: list[float] | None
    request_ids: frozenset[str]
    semantic_limit: int
    """Semantic hits wanted: `semantic_context_size`, or, when they fill a memory
    budget, `semantic_candidates` per retriever (the budget decides how many
    are injected). 0: no semantic memory."""
    recent_limit: int
    min_similarity: float
    semantic_scope: Literal["instance", "partition"]
    body: Mapping[str, Any]
    pending: tuple[MessageRecord, ...] = ()
    """Messages of the scope accepted for storage but perhaps not written yet,
    oldest first (the previous answer, typically): newer than anything stored."""
    recent_excluded: bool = True
    """Whether the core leaves the recent window's messages out of the semantic
    section: it does without a memory budget; under one the window may be cut,
    so they stay eligible (and are injected once)."""

    @property
    def semantic_depth(self) -> int:
        """How many semantic candidates a retriever should propose:
        `semantic_limit` plus room for those the core leaves out."""
        excluded = len(self.request_ids) + (self.recent_limit if self.recent_excluded else 0)
        return self.semantic_limit + excluded

    def search_scopes(self, store: MemoryStore) -> list[Scope]:
        """The scopes a semantic retriever searches: the query's own, or with
        `semantic_scope="partition"` every scope of its partition (a store read
        then: blocking, call it from a worker thread)."""
        if self.semantic_scope == "partition":
            return store.scopes(self.scope.partition) or [self.scope]
        return [self.scope]


@dataclass
class Candidate:
    """A stored message one retrieval plugin proposes for a section.

    `score` is the plugin's own relevance (cosine similarity for the built-in
    semantic search, BM25 for the lexical one; higher is better). The core
    fuses the semantic candidates of every plugin by rank, so scores need not
    be comparable across plugins.

    `resolved=False` (semantic candidates only): the record carries just the id
    and the scope (`MessageRecord(id, partition, instance, role="", text="")`);
    the core reads the messages that survive fusion from the store, in one
    read for all plugins. The built-in retrievers propose such references.
    """

    record: MessageRecord
    section: Section
    score: float = 0.0
    source: str = ""
    resolved: bool = True


@dataclass
class MemoryUnit:
    """Messages injected and dropped together: a hit, its answer, its synapses."""

    records: list[MessageRecord]
    score: float
    hit_id: str
    similarity: float | None = None


@dataclass
class ContextPlan:
    """The request as it will be sent, in parts, before rendering.

    `conversation` is the client's messages after its leading system ones,
    each user message already carrying the memory block it got on an earlier
    turn (kept byte for byte: the provider's prompt cache holds). The memory of
    this turn, `semantic` then `recent`, goes into the last user message.
    """

    system: list[dict[str, Any]]
    semantic: list[MemoryUnit]
    recent: list[MessageRecord]
    conversation: list[dict[str, Any]]
    merge_system: bool = False
    instance: str | None = None
    """The request's instance: memory of another one (`semantic_scope="partition"`)
    is quoted with its origin (`memory_line`), never as its own turns."""

    def render(self, block: str | None = None) -> list[dict[str, Any]]:
        """The messages list: system, then the client's turns, the last user
        message with this turn's memory block in front of its text (`block`:
        `self.block()`, when the caller has it already)."""
        system = merged_system(self.system) if self.merge_system else list(self.system)
        return system + with_block(self.conversation, self.block() if block is None else block)

    def block(self) -> str:
        semantic = [r for unit in chronological(self.semantic) for r in unit.records]
        return memory_block(semantic, self.recent, self.instance)

    def memory_line(self, record: MessageRecord) -> str:
        return memory_line(record, self.instance)


def memory_line(record: MessageRecord, instance: str | None) -> str:
    """A stored message as one line of a memory block: `role: text`."""
    who, content = line_parts(record, instance)
    return who + content


def line_parts(record: MessageRecord, instance: str | None) -> tuple[str, str]:
    """A memory line's speaker (`"user: "`) and text. Another instance's message
    is what another client said, or claimed the model said: it is quoted with
    its origin, so no client can put words in the mouth of the model (or of a
    tool) in a conversation not its own."""
    said = record.to_message()
    role = said["role"]
    if instance is not None and record.instance != instance:
        role = f"[instance {record.instance}] {record.role}"
    who = role + (f" ({said['name']})" if said.get("name") else "")
    return f"{who}: ", said["content"]


def line_tokens(record: MessageRecord, instance: str | None, budget: TokenBudget) -> int:
    """What a record's line costs in a block (its text's count is memoised): the
    speaker without the space, which joins the text's first word, and a newline."""
    who, content = line_parts(record, instance)
    return budget.text_tokens(who.rstrip()) + budget.text_tokens(content) + 1


MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def memory_day(record: MessageRecord) -> str:
    """The day a message was said, "2023-05-25", in UTC: every replica groups
    (and writes) the same."""
    return time.strftime("%Y-%m-%d", time.gmtime(record.timestamp))


def day_line(day: str, year_shown: bool) -> str:
    """A date line, "25 May 2023:" (6 tokens), or "27 May:" (3) after a line of
    the same year: a section is in date order. English month names whatever the
    locale."""
    year, month, mday = day.split("-")
    label = f"{int(mday)} {MONTHS[int(month) - 1]}"
    return f"{label}:" if year_shown else f"{label} {year}:"


def day_lines(days: set[str]) -> list[str]:
    """The date lines of a section that shows these days."""
    lines, year = [], ""
    for day in sorted(days):
        lines.append(day_line(day, day[:4] == year))
        year = day[:4]
    return lines


def memory_block(
    semantic: list[MessageRecord], recent: list[MessageRecord], instance: str | None
) -> str:
    """The text of a memory block: each section's messages oldest first, a date
    line each time the date changes. Empty when there is nothing to show."""
    if not semantic and not recent:
        return ""
    lines = [MEMORY_OPEN]
    for note, records in ((SEMANTIC_NOTE, semantic), (RECENT_NOTE, recent)):
        if not records:
            continue
        lines.append(note)
        day = year = ""
        for record in records:
            if memory_day(record) != day:
                day = memory_day(record)
                lines.append(day_line(day, day[:4] == year))
                year = day[:4]
            lines.append(memory_line(record, instance))
    lines.append(MEMORY_CLOSE)
    return "\n".join(lines)


def with_block(conversation: list[dict[str, Any]], block: str) -> list[dict[str, Any]]:
    """The conversation with `block` in front of the last user message's text
    (a message of its own first when there is no user message)."""
    out = list(conversation)
    if not block:
        return out
    for index in range(len(out) - 1, -1, -1):
        if out[index].get("role") == "user":
            attach(out, index, block)
            return out
    out.insert(0, {"role": "user", "content": block})
    return out


def attach(messages: list[dict[str, Any]], index: int, block: str) -> None:
    """Put a block in front of the text of `messages[index]`, in place; a content
    of no known shape stays the provider's to judge: the block goes just before it."""
    if isinstance(messages[index].get("content"), str | list):
        messages[index] = prefixed(messages[index], block)
    else:
        messages.insert(index, {"role": "user", "content": block})


def prefixed(message: dict[str, Any], block: str) -> dict[str, Any]:
    """A user message with a memory block before its text (a text part before
    its parts when its content is a list of parts)."""
    content = message.get("content")
    if isinstance(content, list):
        return {**message, "content": [{"type": "text", "text": block}, *content]}
    text = content if isinstance(content, str) else ""
    return {**message, "content": f"{block}\n\n{text}" if text else block}


def without_memory(text: str) -> str:
    """A user message's own text, without the memory block in front of it (for
    an app behind the middleware that wants the user's words alone)."""
    if text.startswith(MEMORY_OPEN):
        end = text.find(MEMORY_CLOSE + "\n\n")
        if end >= 0:
            return text[end + len(MEMORY_CLOSE) + 2 :]
        if text.endswith(MEMORY_CLOSE):
            return ""
    return text


def chronological(units: list[MemoryUnit]) -> list[MemoryUnit]:
    return sorted(units, key=lambda u: (u.records[0].timestamp, u.records[0].seq))


def merged_system(system: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One leading system message, for providers that accept only one."""
    parts = [p for p in (content_text(m.get("content")) for m in system) if p]
    return [{"role": "system", "content": "\n\n".join(parts)}] if parts else []


@dataclass(frozen=True)
class TokenBudget:
    """The limits one request must respect, and the counter to measure them."""

    model: str | None
    input_limit: int
    context_budget: int | None
    count_message: Callable[[dict[str, Any]], int]
    count_messages: Callable[[list[dict[str, Any]]], int]
    recent_share: float = 1.0
    """The most of `context_budget` the newest recent messages take before
    semantic memory; older recent messages only get what semantic memory leaves."""
    long_message: int = 0
    """Tokens over which the rest of a hit's unit (its answer or question, its
    neighbours) waits until every hit that fits is in (0: it never waits)."""
    count_text: Callable[[str], int] | None = None
    """Tokens of a text on its own (a memory line); None: from `count_message`."""

    def text_tokens(self, text: str) -> int:
        if self.count_text is not None:
            return self.count_text(text)
        empty = self.count_message({"role": "user", "content": ""})
        return self.count_message({"role": "user", "content": text}) - empty

    def block_tokens(self, block: str) -> int:
        """What a memory block adds to the message it goes into."""
        return self.text_tokens(block + "\n\n") if block else 0


@dataclass
class InjectedMessage:
    id: str
    role: str
    text: str
    tokens: int
    similarity: float | None = None


@dataclass
class SectionReport:
    messages: list[InjectedMessage] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(m.tokens for m in self.messages)
