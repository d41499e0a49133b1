"""A chat request read once: its messages, model, limits, records and query.

Every step of an enrichment (the "too long" check, retrieval, the plan, the
records written after it) asks the same things of the body; `ChatRequest`
answers them, each computed once.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reservoir_middleware.memory._writer import message_records
from reservoir_middleware.memory.tokens import ModelLimits
from reservoir_middleware.memory.validation import STORED_ROLES
from reservoir_middleware.records import MessageRecord, Scope, clean_text, content_text


class InvalidChatRequest(ValueError):
    """The body is not a chat request this engine can enrich."""


@dataclass(frozen=True)
class ChatRequest:
    """One chat request of a scope, as the `reservoir_rewrite_request` plugins left it."""

    scope: Scope
    body: dict[str, Any]
    messages: list[dict[str, Any]]
    model: str | None
    trace_id: str
    input_limit: int  # the prompt tokens the model allows with room for the reply
    refuse_over: int | None  # the most tokens the last message may take; None: never refused

    @classmethod
    def parse(cls, scope: Scope, body: dict[str, Any], limits: ModelLimits) -> ChatRequest:
        """Raises InvalidChatRequest for a body without chat messages."""
        messages = chat_messages(body)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        return cls(
            scope,
            body,
            messages,
            model,
            uuid.uuid4().hex,
            limits.input_limit(model, body),
            limits.refusal_limit(model, body),
        )

    @functools.cached_property
    def records(self) -> list[MessageRecord]:
        """The messages of the stored roles as chained records (made only for a
        request that is not refused as too long)."""
        return message_records(self.scope, self.messages, self.trace_id, self.model, "request")

    @functools.cached_property
    def record_positions(self) -> list[int]:
        """The index in `messages` of each record (system prompts have none)."""
        return [i for i, m in enumerate(self.messages) if m.get("role") in STORED_ROLES]

    @functools.cached_property
    def anchor(self) -> int | None:
        """The index in `records` of the newest user message: this turn's memory goes with it."""
        users = [i for i, r in enumerate(self.records) if r.role == "user"]
        return users[-1] if users else None

    @functools.cached_property
    def query_text(self) -> str:
        """The last user message, cleaned as the records are: what memory is searched for."""
        return clean_text(last_user_text(self.messages))

    @property
    def system_count(self) -> int:
        return leading_system_count(self.messages)


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
