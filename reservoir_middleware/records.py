"""The stored unit of memory and the rules that make ids content-chained.

A record is one chat message of one scope (partition, instance). Its id hashes
the scope, the role, the content and the id of the message before it in the
request, so a client that re-sends the whole history writes nothing new while
the same short reply at another place of the conversation is a new message.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool", "developer"]
Source = Literal["request", "response", "import"]


@dataclass(frozen=True)
class Scope:
    """One (partition, instance): the unit of isolation and of storage."""

    partition: str
    instance: str

    @property
    def key(self) -> str:
        # Kept as it is: chained ids, Chroma collection names and index files hash it,
        # so another shape would orphan stored memory. It names one scope only because
        # every entry point refuses control characters, NUL included, in names
        # (`validation.checked_scope`).
        return f"{self.partition}\x00{self.instance}"

    def __str__(self) -> str:
        return f"{self.partition}/{self.instance}"


@dataclass
class MessageRecord:
    """A chat message as memory keeps it (see the design's memory model)."""

    id: str
    partition: str
    instance: str
    role: str
    text: str
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    trace_id: str = ""
    seq: int = -1
    timestamp: float = field(default_factory=time.time)
    model: str | None = None
    embedding_model: str | None = None
    finish_reason: str | None = None
    complete: bool = True
    source: str = "request"
    prev_id: str | None = None  # the message before it in its request (the id chain)
    before_id: str | None = None  # the scope's message before it
    after_id: str | None = None  # the next one, when written in the same batch (its answer)
    synapse_prev: str | None = None  # before_id, when the two are similar enough to link
    choices: int | None = None
    # A user message's memory block: the ids of the messages injected with it
    # when it was the newest (`memory._blocks`), shown with it on later turns.
    memory: str | None = None

    def __post_init__(self) -> None:
        """Every record is made here, so every string is cleaned here (`clean_text`):
        a lone surrogate from a request, an answer or a file (import, journal)
        never reaches the tokenizer, Chroma or a file."""
        for name in _STRING_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) and not value.isascii():
                setattr(self, name, clean_text(value))
        if self.tool_calls is not None:
            self.tool_calls = clean_value(self.tool_calls)

    @property
    def scope(self) -> Scope:
        return Scope(self.partition, self.instance)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_message(self) -> dict[str, Any]:
        """The record as an OpenAI chat message that is valid on its own.

        Tool traffic is rendered as plain text: a `tool` message or an
        assistant `tool_calls` message injected without its partner would be
        rejected by providers.
        """
        if self.role == "tool":
            return {"role": "user", "content": f"[tool result] {self.text}"}
        if self.role == "assistant" and self.tool_calls:
            calls = "; ".join(
                f"{c['function']['name'] or '?'}({c['function']['arguments'] or ''})"
                for c in canonical_tool_calls(self.tool_calls) or ()
            )
            text = (
                f"{self.text}\n[called tools] {calls}" if self.text else f"[called tools] {calls}"
            )
            return {"role": "assistant", "content": text}
        message: dict[str, Any] = {"role": self.role, "content": self.text}
        name = message_name(self.name)
        if name:
            message["name"] = name
        return message


_STRING_FIELDS = tuple(f.name for f in fields(MessageRecord) if f.name != "tool_calls")
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Text that encodes as UTF-8: a lone surrogate (JSON allows `"\\ud800"`) becomes
    U+FFFD, at the record boundary, so no tokenizer, store or file refuses it later."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def clean_value(value: Any) -> Any:
    """`clean_text` through the strings of a JSON value (tool calls)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [clean_value(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_value(v) for k, v in value.items()}
    return value


def message_text(message: Mapping[str, Any]) -> str:
    """The text memory keeps for a chat message: its content's text, or, for an
    assistant message whose content is empty, its `refusal` (the API's shape of
    a refused answer: `content: null, refusal: "..."`), as an answer's record
    keeps it, so the two get the same content-chained id."""
    text = content_text(message.get("content"))
    refusal = message.get("refusal")
    if not text and message.get("role") == "assistant" and isinstance(refusal, str):
        return refusal
    return text


def message_name(name: str | None) -> str | None:
    """A `name` as OpenAI accepts it (`[a-zA-Z0-9_-]`, at most 64 characters):
    other characters become `_`, so a name another provider allowed (`Ana Lima`)
    never makes an injected message invalid."""
    if not name:
        return None
    return _NAME_INVALID.sub("_", name)[:64]


_NAME_INVALID = re.compile(r"[^a-zA-Z0-9_-]")
_MAX_FILENAME = 120


def content_text(content: Any) -> str:
    """The text of an OpenAI `content` field in any of its allowed shapes.

    Text parts give their text (a refusal part its refusal), one per line;
    media parts give a short marker (`[image]`, `[audio]`, `[file: name]`),
    never their data: memory is text, and a base64 image is not.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):  # not the API's shape, but a lone part is read as one
        content = [content]
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                text = _part_text(part)
                if text is not None:
                    parts.append(text)
        return "\n".join(parts)
    return json.dumps(content, ensure_ascii=False, sort_keys=True)


def _part_text(part: dict[str, Any]) -> str | None:
    kind = part.get("type")
    if kind in ("image_url", "input_image", "image"):
        return "[image]"
    if kind in ("input_audio", "audio"):
        return "[audio]"
    if kind in ("file", "input_file"):
        file = part.get("file")
        name = (file if isinstance(file, dict) else part).get("filename")
        if isinstance(name, str) and name.strip():
            name = " ".join(name.split())[:_MAX_FILENAME]  # one line, bounded
            return f"[file: {name}]"
        return "[file]"
    if kind == "refusal":
        refusal = part.get("refusal")
        return refusal if isinstance(refusal, str) else None
    text = part.get("text")  # "text", "input_text", "output_text", or untyped
    return text if isinstance(text, str) else None


def canonical_tool_calls(tool_calls: Any) -> list[dict[str, Any]] | None:
    """Tool calls reduced to what identifies them (id, name, arguments)."""
    if not isinstance(tool_calls, list) or not tool_calls:
        return None
    calls: list[dict[str, Any]] = []
    for call in tool_calls:
        if not isinstance(call, dict):
            continue
        raw_function = call.get("function")
        function: dict[str, Any] = raw_function if isinstance(raw_function, dict) else {}
        calls.append(
            {
                "id": call.get("id"),
                "type": call.get("type", "function"),
                "function": {
                    "name": function.get("name"),
                    "arguments": function.get("arguments", ""),
                },
            }
        )
    return calls or None


def chained_id(scope: Scope, role: str, text: str, tool_calls: Any, prev_id: str | None) -> str:
    """The content-chained id of a message (32 hex chars)."""
    digest = hashlib.sha256()
    calls = canonical_tool_calls(tool_calls)
    for piece in (
        scope.key,
        role,
        text,
        json.dumps(calls, sort_keys=True, ensure_ascii=False) if calls else "",
        prev_id or "",
    ):
        digest.update(piece.encode("utf-8", "surrogatepass"))
        digest.update(b"\x1f")
    return digest.hexdigest()[:32]


@dataclass
class Answer:
    """The assistant message as the client received it, plus what memory stores with it."""

    content: str = ""
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None
    response_id: str | None = None
    role: str | None = None
    choices: int = 0
    error: dict[str, Any] | str | None = None
    done: bool = False  # saw `data: [DONE]`; for a JSON body: it parsed
    overflowed: bool = False  # an event or the body exceeded its byte cap: only its start is read
    capped: bool = False  # over a cap (characters, tool calls, bytes): only its start is here
    cut: bool = False  # the stream ended early: no [DONE] nor finish_reason, mid-event, mid-call

    @property
    def incomplete(self) -> bool:
        """Stored with `complete=false`: what is here is only the answer's start."""
        return self.capped or self.cut

    @property
    def is_empty(self) -> bool:
        return not self.content and not self.refusal and not self.tool_calls


def embedding_text(record: MessageRecord) -> str:
    """The text a record's vector is made of: its message content (a tool call
    shown as text), so that a replay gives the vectors the engine would."""
    content = record.to_message().get("content")
    return content if isinstance(content, str) else record.text
