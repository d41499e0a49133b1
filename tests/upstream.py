"""A small stand-in model that speaks the OpenAI chat protocol (JSON and SSE).

It is the only stand-in the tests use: everything between the client and it
(uvicorn, the middleware, Chroma, the embedding model) is real. It records
every request it receives, so tests can look at what the model was sent.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from reservoir_middleware.asgi._replies import (
    chat_completion,
    completion_chunks,
    sse_event,
    sse_events,
)
from reservoir_middleware.context import MEMORY_OPEN, without_memory

COMPLETION_ID = "chatcmpl-standin"


@dataclass
class Reply:
    """How the stand-in answers the next chat request."""

    content: str | None = None  # default: "Echo: <last user text>"
    tool_calls: list[dict[str, Any]] | None = None
    status: int = 200
    raw: list[bytes] | None = None  # exact SSE bytes, chunk by chunk
    gate: asyncio.Event | None = None  # awaited after the first chunk
    delay: float = 0.0


@dataclass
class Received:
    path: str
    body: bytes
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.json["messages"])

    @property
    def text(self) -> str:
        """All message contents as one string, to look for recalled memory."""
        return "\n".join(str(m.get("content")) for m in self.messages)


@dataclass(repr=False)  # its received requests would make huge test reports
class Upstream:
    replies: deque[Reply] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    model_ids: list[str] = field(default_factory=lambda: ["gpt-4o"])
    model_list_calls: int = 0
    model_list_auth: str | None = None

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST", "PUT"]),
                Route("/chat/completions", self.chat, methods=["POST"]),
                Route("/api/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.echo_raw, methods=["POST"]),
                Route("/v1/embeddings", self.echo_raw, methods=["POST"]),
                Route(
                    "/v1/partition/{p}/instance/{i}/chat/completions",
                    self.echo_raw,
                    methods=["GET", "DELETE"],
                ),
                WebSocketRoute("/ws", self.websocket),
            ]
        )

    async def models(self, request: Request) -> Response:
        self.model_list_calls += 1
        self.model_list_auth = request.headers.get("authorization")
        data = [{"id": model, "object": "model"} for model in self.model_ids]
        return JSONResponse({"object": "list", "data": data})

    async def echo_raw(self, request: Request) -> Response:
        body = await request.body()
        self.received.append(Received(request.url.path, body, dict(request.headers)))
        return Response(
            body,
            media_type=request.headers.get("content-type"),
            headers={"x-method": request.method},
        )

    async def websocket(self, ws: WebSocket) -> None:
        await ws.accept()
        text = await ws.receive_text()
        await ws.send_text(f"ws:{text}")
        await ws.close()

    async def chat(self, request: Request) -> Response:
        body = await request.body()
        self.received.append(Received(request.url.path, body, dict(request.headers)))
        try:
            payload = json.loads(body)
            messages = payload["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return JSONResponse(
                {
                    "error": {
                        "message": "upstream: invalid JSON body",
                        "type": "invalid_request_error",
                    }
                },
                status_code=400,
            )
        reply = self.replies.popleft() if self.replies else Reply()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.status >= 400:
            return JSONResponse(
                {"error": {"message": "upstream failure", "type": "server_error"}},
                status_code=reply.status,
            )
        last_user: dict[str, Any] = next(
            (m for m in reversed(messages) if m.get("role") == "user"), {}
        )
        content = (  # a model answers the question, it does not repeat memory
            reply.content if reply.content is not None else f"Echo: {_question(last_user)}"
        )
        model = payload.get("model", "gpt-4o")
        if reply.raw is not None or payload.get("stream"):
            return StreamingResponse(
                self._stream(reply, model, content), media_type="text/event-stream"
            )
        if payload.get("x_plain_text"):
            return PlainTextResponse(content)
        completion = chat_completion(
            None if reply.tool_calls else content,
            model,
            finish_reason="tool_calls" if reply.tool_calls else "stop",
            completion_id=COMPLETION_ID,
            usage=(10, 5),
            tool_calls=reply.tool_calls,
        )
        return JSONResponse(completion)

    async def _stream(self, reply: Reply, model: str, content: str) -> AsyncIterator[bytes]:
        chunks = reply.raw if reply.raw is not None else stream_chunks(model, content)
        for index, chunk in enumerate(chunks):
            yield chunk
            if index == 0 and reply.gate is not None:
                await asyncio.wait_for(reply.gate.wait(), 10)


def sse(payload: Any) -> bytes:
    return sse_event(payload)


def stream_chunks(model: str, content: str, pieces: int = 4) -> list[bytes]:
    """An OpenAI-style stream: role chunk, content deltas, finish, [DONE]."""
    size = max(1, len(content) // pieces + 1)
    parts = [content[i : i + size] for i in range(0, len(content), size)]
    return sse_events(completion_chunks(parts, model, completion_id=COMPLETION_ID, created=0))


def _question(message: dict[str, Any]) -> Any:
    """The user's own words: a text without the memory block before it, parts without its part."""
    content = message.get("content")
    if isinstance(content, str):
        return without_memory(content)
    if isinstance(content, list) and content and isinstance(content[0], dict):
        first = content[0].get("text")
        if isinstance(first, str) and first.startswith(MEMORY_OPEN) and not without_memory(first):
            return content[1:]
    return content
