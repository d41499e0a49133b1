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
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from reservoir_middleware.asgi._partialjson import loads_prefix, utf8_prefix
from reservoir_middleware.asgi._sse import SSEEvent, SSEReader
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
_INFLATE_STEP = 256 * 1024  # bounds what one compressed chunk may expand to at once
_ENCODINGS = frozenset({"gzip", "x-gzip", "deflate"})


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _as_error(value: object) -> dict[str, Any] | str:
    if isinstance(value, dict | str):
        return value
    return json.dumps(value)


def _join_parts(value: object, kind: str) -> str:
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


class _ToolCall:
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


class _Inflater:
    """Incremental gzip/deflate decoder; output comes in steps of bounded size."""

    __slots__ = ("_d", "_ended", "_gzip", "_probe")

    def __init__(self, encoding: str) -> None:
        self._gzip = encoding != "deflate"
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS if self._gzip else zlib.MAX_WBITS)
        # "deflate" is meant zlib-wrapped but some servers send it raw: keep the first
        # bytes so they can be replayed into a raw decoder if the header check fails.
        self._probe: bytes | None = None if self._gzip else b""
        self._ended = False

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        if self._ended:
            return
        d = self._d
        if d.eof:  # the last chunk ended exactly where a gzip member did
            if not (self._gzip and chunk[:1] == b"\x1f"):
                self._ended = True
                return
            d = self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        if self._probe is not None:
            seen = self._probe + chunk
            try:
                out = d.decompress(chunk, _INFLATE_STEP)
            except zlib.error:
                d = self._d = zlib.decompressobj(-zlib.MAX_WBITS)
                self._probe = None
                out = d.decompress(seen, _INFLATE_STEP)
            else:
                self._probe = seen if len(seen) < 64 else None
        else:
            out = d.decompress(chunk, _INFLATE_STEP)
        while True:
            if out:
                yield out
            if d.unconsumed_tail:
                out = d.decompress(d.unconsumed_tail, _INFLATE_STEP)
            elif d.eof and d.unused_data:
                rest = d.unused_data
                if not (self._gzip and rest[:1] == b"\x1f"):
                    self._ended = True  # trailing garbage after the body is ignored
                    return
                d = self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # next gzip member
                out = d.decompress(rest, _INFLATE_STEP)
            else:
                return

    def flush(self) -> bytes:
        return b"" if self._ended else self._d.flush()


class Assembler:
    """Shared plumbing of the assemblers: inflation and the never-raise guard."""

    def __init__(self, content_encoding: str | None = None) -> None:
        if content_encoding is not None and content_encoding not in _ENCODINGS:
            raise ValueError(f"unsupported content encoding: {content_encoding!r}")
        self._inflater = _Inflater(content_encoding) if content_encoding else None
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


class StreamAssembler(Assembler):
    """Assembles a ``text/event-stream`` of ``chat.completion.chunk`` events.

    A legacy ``delta.function_call`` (name/arguments) is recorded as the tool
    call of index 0, of type "function", so old-style replies are stored alike.
    """

    def __init__(
        self,
        content_encoding: str | None = None,
        *,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        super().__init__(content_encoding)
        self._reader = SSEReader(max_event_bytes)
        self._content: list[str] = []
        self._refusal: list[str] | None = None
        self._tools: dict[int, _ToolCall] = {}
        self._indexes: set[int] = set()
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._model: str | None = None
        self._id: str | None = None
        self._role: str | None = None
        self._error: dict[str, Any] | str | None = None
        self._done = False
        self._room = MAX_ANSWER_CHARS  # characters the assembled answer may still take
        self._capped = False
        self._cut = False

    def _take(self, text: str) -> str:
        """What of `text` fits under the answer's cap (the rest is not kept)."""
        if len(text) <= self._room:
            self._room -= len(text)
            return text
        kept, self._room, self._capped = text[: self._room], 0, True
        return kept

    def _consume(self, chunk: bytes) -> None:
        for event in self._reader.feed(chunk):
            self._event(event)

    def _event(self, event: SSEEvent, last: bool = False) -> None:
        """One event; `last`: the stream ended inside it (its line had no end)."""
        self._read(event, last)
        if event.truncated:  # only its start was read: nothing after it is kept
            self._room, self._capped = 0, True

    def _read(self, event: SSEEvent, last: bool) -> None:
        data = event.data
        if event.event == "error":
            try:
                obj: Any = json.loads(data)
            except (ValueError, RecursionError):
                obj = data
            self._error = _as_error(obj.get("error", obj) if isinstance(obj, dict) else obj)
            return
        if len(data) < 16 and data.strip() == "[DONE]":
            self._done = True
            return
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            if not (event.truncated or last):
                return  # not JSON: ignored, a stream may carry other events
            obj = loads_prefix(data)  # cut: its start, as far as it goes
            self._cut = self._cut or last
        if not isinstance(obj, dict):
            return
        error = obj.get("error")
        if error is not None:  # LiteLLM-style `data: {"error": {...}}`
            self._error = _as_error(error)
            return
        if self._id is None:
            self._id = _str(obj.get("id"))
        if self._model is None:
            self._model = _str(obj.get("model"))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            self._indexes.add(index if isinstance(index, int) else -1)
            if index != 0:
                continue
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self._finish_reason = reason
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice.get("message")  # seen from a few non-conforming servers
                if not isinstance(delta, dict):
                    continue
            self._delta(delta)

    def _delta(self, delta: dict[str, Any]) -> None:
        content = delta.get("content")
        if content:
            self._content.append(self._take(_join_parts(content, "text")))
        refusal = delta.get("refusal")
        if isinstance(refusal, str):
            if self._refusal is None:
                self._refusal = []
            self._refusal.append(self._take(refusal))
        if self._role is None:
            self._role = _str(delta.get("role"))
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, dict):
                    tool = self._tool(call.get("index"), call.get("id"))
                    if tool is not None:
                        self._capped_merge(tool, tool.merge, call)
        function_call = delta.get("function_call")
        if isinstance(function_call, dict):
            tool = self._tool(0, None)
            if tool is not None:
                self._capped_merge(tool, tool.merge_function, function_call)

    def _capped_merge(
        self, tool: _ToolCall, merge: Callable[[dict[str, Any]], None], piece: dict[str, Any]
    ) -> None:
        before, had_id, had_name = len(tool.args), bool(tool.id), bool(tool.name)
        merge(piece)
        # the id, the name and the arguments count against the cap too
        if tool.id and not had_id:
            tool.id = self._take(tool.id)
        if tool.name and not had_name:
            tool.name = self._take(tool.name)
        if len(tool.args) > before:
            tool.args[-1] = self._take(tool.args[-1])

    def _tool(self, index: object, call_id: object) -> _ToolCall | None:
        """The call a piece belongs to; None when a new one would go past a cap."""
        if not isinstance(index, int):  # no index: match by id, else a new or the last call
            known = [k for k, v in self._tools.items() if call_id and v.id == call_id]
            if known:
                index = known[0]
            elif call_id or not self._tools:
                index = max(self._tools, default=-1) + 1
            else:
                index = max(self._tools)
        call = self._tools.get(index)
        if call is None:
            if len(self._tools) >= MAX_TOOL_CALLS or self._room <= 0:
                self._capped = True
                return None
            call = self._tools[index] = _ToolCall()
        return call

    def _ended_early(self) -> bool:
        """No [DONE] nor finish_reason, or a tool call's arguments not whole JSON."""
        if not self._done and self._finish_reason is None:
            return True
        if self._capped:
            return False  # its own arguments may be cut by the cap
        for call in self._tools.values():
            args = "".join(call.args)
            if args.strip():
                try:
                    json.loads(args)
                except (ValueError, RecursionError):
                    return True
        return False

    def _build(self) -> Answer:
        for event in self._reader.close():
            self._event(event, last=self._reader.ended_mid_line)
        return Answer(
            content="".join(self._content),
            refusal=None if self._refusal is None else "".join(self._refusal),
            tool_calls=[self._tools[k].as_dict() for k in sorted(self._tools)],
            finish_reason=self._finish_reason,
            usage=self._usage,
            model=self._model,
            response_id=self._id,
            role=self._role,
            choices=len(self._indexes),
            error=self._error,
            done=self._done,
            overflowed=self._reader.overflowed,
            capped=self._capped,
            cut=self._cut or self._ended_early(),
        )


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
        answer = Answer(model=_str(obj.get("model")), response_id=_str(obj.get("id")), done=True)
        usage = obj.get("usage")
        answer.usage = usage if isinstance(usage, dict) else None
        if obj.get("error") is not None:
            answer.error = _as_error(obj["error"])
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return answer
        answer.choices = len(choices)
        dicts = [c for c in choices if isinstance(c, dict)]
        choice = next((c for c in dicts if c.get("index", 0) == 0), None)
        if choice is None:
            return answer
        answer.finish_reason = _str(choice.get("finish_reason"))
        message = choice.get("message")
        if not isinstance(message, dict):
            return answer
        answer.role = _str(message.get("role"))
        content = message.get("content")
        answer.content = _join_parts(content, "text")
        refusal = _str(message.get("refusal")) or _join_parts(content, "refusal") or None
        answer.refusal = refusal
        calls: list[_ToolCall] = []
        raw_calls = message.get("tool_calls")
        for raw in raw_calls if isinstance(raw_calls, list) else ():
            if len(calls) >= MAX_TOOL_CALLS:
                answer.capped = True
                break
            if isinstance(raw, dict):
                calls.append(_ToolCall())
                calls[-1].merge(raw)
        function_call = message.get("function_call")
        if isinstance(function_call, dict) and not calls:
            calls.append(_ToolCall())
            calls[0].merge_function(function_call)
        answer.tool_calls = [c.as_dict() for c in calls]
        return answer


def _encoding(value: str | None) -> str | None:
    """The one coding to undo: "" for none/identity, ``None`` if not supported."""
    codings = [c.strip().lower() for c in (value or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return ""
    if len(codings) == 1 and codings[0] in _ENCODINGS:
        return codings[0]
    return None


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
    encoding = _encoding(content_encoding)
    if encoding is None:
        return None
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime == "text/event-stream":
        return StreamAssembler(encoding or None)
    if mime == "application/json" or mime.endswith("+json"):
        return JsonAssembler(encoding or None)
    return None
