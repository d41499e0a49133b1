"""Responses the middleware sends itself: error envelopes and the "too long" answer;
and the one builder of OpenAI chat completions (JSON and SSE chunks)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

from starlette.types import Send

STATUS_HEADER = b"x-reservoir-status"
TRACE_HEADER = b"x-reservoir-trace-id"


def status_header(*, degraded: bool, memory: str = "on") -> tuple[bytes, bytes] | None:
    """`x-reservoir-status`: `degraded` on a memory failure, `memory=MODE` when
    memory is not fully on, `; `-separated (`degraded; memory=read`); none when
    neither (so a plain `degraded` stays exactly that)."""
    parts = (["degraded"] if degraded else []) + ([f"memory={memory}"] if memory != "on" else [])
    return (STATUS_HEADER, "; ".join(parts).encode("ascii")) if parts else None


def _json_bytes(payload: Any) -> bytes:
    """Compact UTF-8 JSON; a lone surrogate (a client's odd string echoed back)
    cannot be UTF-8, so such a payload is written with `\\u` escapes instead."""
    try:
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(payload, separators=(",", ":")).encode("ascii")


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode("ascii")),
        *(extra_headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(
    send: Send,
    status: int,
    error_type: str,
    message: str,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """The envelope `{"error": {"type", "message"}}` every middleware error uses."""
    body = _json_bytes({"error": {"type": error_type, "message": message}})
    await send_bytes(send, status, body, b"application/json", extra_headers)


def _completion_id() -> str:
    return "chatcmpl-rsv-" + uuid.uuid4().hex[:24]


# One builder of OpenAI chat completions: the middleware's own answers, and the stand-in
# models of the tests, the bench and `reservoir demo`, so they all speak the same shape.


def chat_completion(
    content: str | None,
    model: str,
    *,
    finish_reason: str = "stop",
    completion_id: str | None = None,
    created: int | None = None,
    usage: tuple[int, int] = (0, 0),
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A `chat.completion` with one choice (`usage`: prompt and completion tokens)."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    prompt_tokens, completion_tokens = usage
    return {
        "id": completion_id or _completion_id(),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def completion_chunk(
    delta: dict[str, Any],
    model: str,
    *,
    finish_reason: str | None = None,
    completion_id: str,
    created: int,
    index: int = 0,
) -> dict[str, Any]:
    """One `chat.completion.chunk` of a stream: one choice's delta."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}],
    }


def completion_chunks(
    pieces: Iterable[str],
    model: str,
    *,
    finish_reason: str = "stop",
    completion_id: str | None = None,
    created: int | None = None,
) -> list[dict[str, Any]]:
    """The chunks of a streamed answer: the role, one delta per piece, the finish."""
    ident = completion_id or _completion_id()
    when = int(time.time()) if created is None else created
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    deltas += [{"content": piece} for piece in pieces]
    chunks = [completion_chunk(d, model, completion_id=ident, created=when) for d in deltas]
    finish = completion_chunk(
        {}, model, finish_reason=finish_reason, completion_id=ident, created=when
    )
    return [*chunks, finish]


def sse_event(payload: Any) -> bytes:
    """One server-sent event: `data: <JSON>`, or a bare string such as `[DONE]`."""
    data = payload.encode("utf-8") if isinstance(payload, str) else _json_bytes(payload)
    return b"data: " + data + b"\n\n"


def sse_events(chunks: Iterable[dict[str, Any]]) -> list[bytes]:
    """A whole stream, event by event, closed by `data: [DONE]`."""
    return [*(sse_event(chunk) for chunk in chunks), sse_event("[DONE]")]


def too_long_completion(model: str | None, text: str) -> dict[str, Any]:
    return chat_completion(text, model or "unknown", finish_reason="length")


def too_long_stream(model: str | None, text: str) -> bytes:
    """The same answer as an SSE stream, for requests with `stream: true`."""
    return b"".join(
        sse_events(completion_chunks([text], model or "unknown", finish_reason="length"))
    )


async def send_too_long(
    send: Send, model: str | None, text: str, stream: bool, headers: list[tuple[bytes, bytes]]
) -> None:
    if stream:
        body = too_long_stream(model, text)
        await send_bytes(send, 200, body, b"text/event-stream; charset=utf-8", headers)
    else:
        body = _json_bytes(too_long_completion(model, text))
        await send_bytes(send, 200, body, b"application/json", headers)
