"""What both answer assemblers share (`asgi._answer`): the caps, the pieces of a
message (text parts, errors, tool calls) and the base class that inflates the
body's copy and never raises to the middleware."""

from __future__ import annotations

import json
import zlib
from typing import Any

from reservoir_middleware.asgi._inflate import ENCODINGS, Inflater
from reservoir_middleware.records import Answer

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
# A streamed answer is assembled up to this many characters (content, refusal
# and tool-call arguments together); the rest is still forwarded to the client,
# and memory stores what fits, marked incomplete (`Answer.capped`).
MAX_ANSWER_CHARS = 4 * 1024 * 1024
# One SSE event may hold a whole capped answer and the JSON around it; past
# this its start is kept (the answer is then capped).
MAX_EVENT_BYTES = MAX_ANSWER_CHARS + 64 * 1024
# Tool calls of one answer; those past it are not kept (the answer is capped).
MAX_TOOL_CALLS = 1024


def str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def as_error(value: object) -> dict[str, Any] | str:
    if isinstance(value, dict | str):
        return value
    return json.dumps(value)


def join_parts(value: object, kind: str) -> str:
    """Text of a content given as a string or as a list of typed parts."""
    if isinstance(value, str):
        return value if kind == "text" else ""
    if not isinstance(value, list):
        return ""
    return "".join(
        p[kind]
        for p in value
        if isinstance(p, dict) and p.get("type", kind) == kind and isinstance(p.get(kind), str)
    )


class ToolCall:
    """One tool call put together from pieces: id and name set once, arguments appended."""

    __slots__ = ("args", "id", "name")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.args: list[str] = []

    def merge(self, delta: dict[str, Any]) -> None:
        if not self.id and isinstance(delta.get("id"), str):
            self.id = delta["id"]
        function = delta.get("function")
        if isinstance(function, dict):
            self.merge_function(function)

    def merge_function(self, function: dict[str, Any]) -> None:
        name = function.get("name")
        if not self.name and isinstance(name, str):
            self.name = name
        args = function.get("arguments")
        if isinstance(args, str):
            self.args.append(args)
        elif args is not None:  # some providers send an object, not its JSON text
            self.args.append(json.dumps(args))

    def as_dict(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": "".join(self.args)}
        return {"id": self.id, "type": "function", "function": function}


class Assembler:
    """Shared plumbing of the assemblers: inflation and the never-raise guard."""

    def __init__(self, content_encoding: str | None = None) -> None:
        if content_encoding is not None and content_encoding not in ENCODINGS:
            raise ValueError(f"unsupported content encoding: {content_encoding!r}")
        self._inflater = Inflater(content_encoding) if content_encoding else None
        self._failure: str | None = None
        self._answer: Answer | None = None

    def feed(self, chunk: bytes) -> None:
        """Take a copy of one body chunk; never raises."""
        if self._failure is not None or self._answer is not None or not chunk:
            return
        try:
            if self._inflater is None:
                self._consume(chunk)
                return
            for piece in self._inflater.feed(chunk):
                self._consume(piece)
                if not self._wants_more():
                    break
        except zlib.error:
            self._failure = "invalid compressed body"
        except Exception as exc:  # a recorder bug must not break the response
            self._failure = f"recorder failed: {type(exc).__name__}"

    def finish(self) -> Answer:
        """End of body: the assembled answer (the same object on later calls)."""
        if self._answer is not None:
            return self._answer
        if self._inflater is not None and self._failure is None:
            try:
                self._consume(self._inflater.flush())
            except zlib.error:
                self._failure = "invalid compressed body"
        try:
            answer = self._build()
        except Exception as exc:
            answer = Answer(error=f"recorder failed: {type(exc).__name__}")
        if self._failure is not None and not isinstance(answer.error, dict):
            answer.error = self._failure
        self._answer = answer
        return answer

    def _consume(self, chunk: bytes) -> None:
        raise NotImplementedError

    def _wants_more(self) -> bool:
        return True

    def _build(self) -> Answer:
        raise NotImplementedError
