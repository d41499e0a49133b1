"""Rebuild the assistant message of an OpenAI chat completion from response bytes.

The middleware forwards each body chunk at once and feeds a copy here, so this
runs on the hot path of every streamed chunk: it keeps only small per-stream
state (content pieces, tool call pieces) and never raises to its caller; bad
input ends up in ``Answer.error`` instead.

Only choice index 0 is assembled (memory keeps one reply); other indexes are
counted in ``Answer.choices``. Compressed bodies are inflated incrementally for
``gzip``/``x-gzip``/``deflate``; ``br``, ``zstd`` and unknown codings cannot be
recorded (``make_assembler`` returns ``None``), as the standard library has no
decoder for them.

What goes past a cap (the answer's characters, its number of tool calls, one
event's bytes, the JSON body's bytes) is not kept: the start is, completed as
JSON where it was cut (`partialjson`), and the answer is marked `capped`. A
stream that ends before its end (no `[DONE]` nor `finish_reason`, inside an
event, inside a tool call's arguments) is marked `cut`.

Here: the JSON recorder and the choice between the two; the stream recorder is
`asgi._stream`, what both share (caps, tool calls, the base) `asgi._assembler`,
the inflater `asgi._inflate`.
"""

from __future__ import annotations

import json
from typing import Any

from reservoir_middleware.asgi._assembler import (
    DEFAULT_MAX_BODY_BYTES,
    MAX_ANSWER_CHARS,
    MAX_EVENT_BYTES,
    MAX_TOOL_CALLS,
    Assembler,
    ToolCall,
    as_error,
    join_parts,
    str_or_none,
)
from reservoir_middleware.asgi._inflate import coding_of
from reservoir_middleware.asgi._partialjson import loads_prefix, utf8_prefix
from reservoir_middleware.asgi._stream import StreamAssembler
from reservoir_middleware.records import Answer

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "MAX_ANSWER_CHARS",
    "MAX_EVENT_BYTES",
    "MAX_TOOL_CALLS",
    "Answer",
    "Assembler",
    "JsonAssembler",
    "StreamAssembler",
    "make_assembler",
]


class JsonAssembler(Assembler):
    """Buffers a ``chat.completion`` JSON body (up to a cap) and parses it at the end."""

    def __init__(
        self,
        content_encoding: str | None = None,
        *,
        max_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        super().__init__(content_encoding)
        self._max = max_bytes
        self._parts: list[bytes] = []
        self._size = 0
        self.overflowed = False

    def _consume(self, chunk: bytes) -> None:
        if self.overflowed or not chunk:
            return
        room = self._max - self._size
        if len(chunk) > room:  # keep the start; the answer is read from it, capped
            self.overflowed = True
            chunk = chunk[:room]
        self._size += len(chunk)
        self._parts.append(bytes(chunk))

    def _wants_more(self) -> bool:
        return not self.overflowed

    def _build(self) -> Answer:
        if self.overflowed:  # what the start holds, marked capped; no error: the question stays
            obj = loads_prefix(utf8_prefix(b"".join(self._parts)).removeprefix("\ufeff"))
            answer = self._answer_of(obj) if isinstance(obj, dict) else Answer()
            answer.done, answer.overflowed, answer.capped = False, True, True
            return answer
        try:
            obj = json.loads(b"".join(self._parts))
        except (ValueError, RecursionError):
            return Answer(error="invalid json")
        if not isinstance(obj, dict):
            return Answer(error="invalid json")
        return self._answer_of(obj)

    @staticmethod
    def _answer_of(obj: dict[str, Any]) -> Answer:
        answer = Answer(
            model=str_or_none(obj.get("model")), response_id=str_or_none(obj.get("id")), done=True
        )
        usage = obj.get("usage")
        answer.usage = usage if isinstance(usage, dict) else None
        if obj.get("error") is not None:
            answer.error = as_error(obj["error"])
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return answer
        answer.choices = len(choices)
        dicts = [c for c in choices if isinstance(c, dict)]
        choice = next((c for c in dicts if c.get("index", 0) == 0), None)
        if choice is None:
            return answer
        answer.finish_reason = str_or_none(choice.get("finish_reason"))
        message = choice.get("message")
        if not isinstance(message, dict):
            return answer
        answer.role = str_or_none(message.get("role"))
        content = message.get("content")
        answer.content = join_parts(content, "text")
        refusal = str_or_none(message.get("refusal")) or join_parts(content, "refusal") or None
        answer.refusal = refusal
        calls: list[ToolCall] = []
        raw_calls = message.get("tool_calls")
        for raw in raw_calls if isinstance(raw_calls, list) else ():
            if len(calls) >= MAX_TOOL_CALLS:
                answer.capped = True
                break
            if isinstance(raw, dict):
                calls.append(ToolCall())
                calls[-1].merge(raw)
        function_call = message.get("function_call")
        if isinstance(function_call, dict) and not calls:
            calls.append(ToolCall())
            calls[0].merge_function(function_call)
        answer.tool_calls = [c.as_dict() for c in calls]
        return answer


def make_assembler(
    content_type: str | None, content_encoding: str | None = None
) -> StreamAssembler | JsonAssembler | None:
    """The recorder for a response, or ``None`` when its body cannot be recorded.

    ``text/event-stream`` gives a StreamAssembler, ``application/json`` and any
    ``+json`` type a JsonAssembler; gzip/x-gzip/deflate are inflated on the copy.
    Unknown types and ``br``/``zstd``/unknown encodings give ``None``.
    """
    if not content_type:
        return None
    encoding = coding_of(content_encoding)
    if encoding is None:
        return None
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime == "text/event-stream":
        return StreamAssembler(encoding or None)
    if mime == "application/json" or mime.endswith("+json"):
        return JsonAssembler(encoding or None)
    return None
