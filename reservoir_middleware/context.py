"""What retrieval hands to truncation, and what truncation hands back.

These are the values plugins see: a retrieval query, the candidates they
return, and the context plan (system messages, memory sections, the client's
own turns) that the truncation hook trims to the token budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from reservoir_middleware.records import MessageRecord, Scope, content_text

if TYPE_CHECKING:
    from reservoir_middleware.store import MemoryStore

Section = Literal["semantic", "recent"]

SEMANTIC_NOTE = (
    "The following is the result of a semantic search of the most related messages "
    "by cosine similarity to previous conversations"
)
RECENT_NOTE = (
    "The following are the most recent messages in the conversation in chronological order"
)


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
    """The request as it will be sent, in parts, before rendering."""

    system: list[dict[str, Any]]
    semantic: list[MemoryUnit]
    recent: list[MessageRecord]
    conversation: list[dict[str, Any]]
    merge_system: bool = False
    instance: str | None = None
    """The request's instance: memory of another one (`semantic_scope="partition"`)
    is rendered as quoted text (`memory_message`), never as its turns."""

    def render(self) -> list[dict[str, Any]]:
        """The messages list: system, notes and memory, then the client's turns."""
        memory: list[tuple[str, list[dict[str, Any]]]] = []
        semantic = [r for unit in chronological(self.semantic) for r in unit.records]
        if semantic:
            memory.append((SEMANTIC_NOTE, [self.memory_message(r) for r in semantic]))
        if self.recent:
            memory.append((RECENT_NOTE, [self.memory_message(r) for r in self.recent]))
        if not self.merge_system:
            out = list(self.system)
            for note, messages in memory:
                out.append({"role": "system", "content": note})
                out.extend(messages)
            return out + list(self.conversation)
        return merged_system(self.system, memory) + list(self.conversation)

    def memory_message(self, record: MessageRecord) -> dict[str, Any]:
        """A stored message as injected. Another instance's message is what
        another client said, or claimed the model said: it becomes a `user`
        message quoting it with its origin, so no client can put words in the
        mouth of the model (or of a tool) in a conversation not its own."""
        if self.instance is None or record.instance == self.instance:
            return record.to_message()
        said = record.to_message()
        who = record.role + (f" {said['name']}" if said.get("name") else "")
        return {"role": "user", "content": f"[instance {record.instance}, {who}] {said['content']}"}


def chronological(units: list[MemoryUnit]) -> list[MemoryUnit]:
    return sorted(units, key=lambda u: (u.records[0].timestamp, u.records[0].seq))


def merged_system(
    system: list[dict[str, Any]], memory: list[tuple[str, list[dict[str, Any]]]]
) -> list[dict[str, Any]]:
    """One leading system message, for providers that accept only one."""
    parts = [content_text(m.get("content")) for m in system]
    for note, messages in memory:
        lines = [
            f"{m['role']} ({m['name']}): {m['content']}"
            if m.get("name")
            else f"{m['role']}: {m['content']}"
            for m in messages
        ]
        parts.append(note + ":\n" + "\n".join(lines))
    parts = [p for p in parts if p]
    if not parts:
        return []
    return [{"role": "system", "content": "\n\n".join(parts)}]


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
