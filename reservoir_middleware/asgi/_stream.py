"""The recorder of a streamed answer: ``chat.completion.chunk`` events of a
``text/event-stream`` put together into one assistant message (`asgi._answer`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from reservoir_middleware.asgi._assembler import (
    MAX_ANSWER_CHARS,
    MAX_EVENT_BYTES,
    MAX_TOOL_CALLS,
    Assembler,
    ToolCall,
    as_error,
    join_parts,
    str_or_none,
)
from reservoir_middleware.asgi._partialjson import loads_prefix
from reservoir_middleware.asgi._sse import SSEEvent, SSEReader
from reservoir_middleware.records import Answer


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
        self._tools: dict[int, ToolCall] = {}
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
            self._error = as_error(obj.get("error", obj) if isinstance(obj, dict) else obj)
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
            self._error = as_error(error)
            return
        if self._id is None:
            self._id = str_or_none(obj.get("id"))
        if self._model is None:
            self._model = str_or_none(obj.get("model"))
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
            self._content.append(self._take(join_parts(content, "text")))
        refusal = delta.get("refusal")
        if isinstance(refusal, str):
            if self._refusal is None:
                self._refusal = []
            self._refusal.append(self._take(refusal))
        if self._role is None:
            self._role = str_or_none(delta.get("role"))
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
        self, tool: ToolCall, merge: Callable[[dict[str, Any]], None], piece: dict[str, Any]
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

    def _tool(self, index: object, call_id: object) -> ToolCall | None:
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
            call = self._tools[index] = ToolCall()
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
