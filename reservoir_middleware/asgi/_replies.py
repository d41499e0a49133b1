"""Responses the middleware sends itself: error envelopes and the "too long" answer."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from starlette.types import Send

STATUS_HEADER = b"x-reservoir-status"
TRACE_HEADER = b"x-reservoir-trace-id"


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


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


def too_long_completion(model: str | None, text: str) -> dict[str, Any]:
    return {
        "id": _completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model or "unknown",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def too_long_stream(model: str | None, text: str) -> bytes:
    """The same answer as an SSE stream, for requests with `stream: true`."""
    base = {
        "id": _completion_id(),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model or "unknown",
    }
    deltas = [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
        {"index": 0, "delta": {"content": text}, "finish_reason": None},
        {"index": 0, "delta": {}, "finish_reason": "length"},
    ]
    events = [b"data: " + _json_bytes({**base, "choices": [d]}) + b"\n\n" for d in deltas]
    return b"".join(events) + b"data: [DONE]\n\n"


async def send_too_long(
    send: Send, model: str | None, text: str, stream: bool, headers: list[tuple[bytes, bytes]]
) -> None:
    if stream:
        body = too_long_stream(model, text)
        await send_bytes(send, 200, body, b"text/event-stream; charset=utf-8", headers)
    else:
        body = _json_bytes(too_long_completion(model, text))
        await send_bytes(send, 200, body, b"application/json", headers)
