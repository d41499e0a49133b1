"""`reservoir demo`: memory at work across two separate sessions, end to end.

Runs the real stack (`reservoir serve`'s gateway, the middleware, embedded
Chroma, the embedding model) on 127.0.0.1. With `OPENAI_API_KEY` set it talks
to OpenAI; otherwise to a small local stand-in model, clearly labelled, that
answers with what it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from reservoir_middleware.asgi._replies import chat_completion
from reservoir_middleware.context import without_memory
from reservoir_middleware.gateway.app import create_app
from reservoir_middleware.records import content_text
from reservoir_middleware.settings import ProviderSettings, ReservoirSettings

STANDIN_MODEL = "demo-standin"
FIRST = "Hi! I'm Ada. I keep two beehives on my roof in Lyon and I'm learning the cello."
SECOND = "What do you remember about me?"


def standin_app() -> Starlette:
    """A stand-in model: it only reports which messages it received."""

    async def chat(request: Request) -> Response:
        payload = await request.json()
        messages = payload.get("messages", [])
        question = content_text(messages[-1].get("content")) if messages else ""
        memory = question[: len(question) - len(without_memory(question))].strip()
        lines = [f"  {line}" for line in memory.splitlines()]
        text = f"[stand-in model, not an LLM] I was sent {len(messages)} message(s)."
        if lines:
            text += " Before your question, memory gave me:\n" + "\n".join(lines)
        return JSONResponse(chat_completion(text, STANDIN_MODEL, completion_id="chatcmpl-demo"))

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": STANDIN_MODEL, "object": "model"}]})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )


@contextlib.asynccontextmanager
async def served(app: ASGIApp) -> AsyncIterator[str]:
    """Serve an app with uvicorn on a free loopback port for the block's duration."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    for _ in range(600):
        if server.started or task.done():
            break
        await asyncio.sleep(0.05)
    if not server.started:
        task.cancel()
        raise RuntimeError("could not start a server on 127.0.0.1")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def _say(title: str, body: str = "") -> None:
    print(f"\n== {title}")
    if body:
        print(textwrap.indent(body, "   "))


async def run_demo(data_dir: Path | None = None, *, offline: bool = False) -> int:
    real = bool(os.environ.get("OPENAI_API_KEY")) and not offline
    seen: list[dict[str, Any]] = []

    def observe(endpoint: str, payload: dict[str, Any]) -> None:
        seen.append(payload)

    async with contextlib.AsyncExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rsv-demo-")))
        if real:
            model = os.environ.get("RSV_DEMO_MODEL", "gpt-4o-mini")
            settings = ReservoirSettings(data_dir=data_dir)
            print(f"DEMO with the real OpenAI API (model {model}).")
        else:
            model = STANDIN_MODEL
            standin = await stack.enter_async_context(served(standin_app()))
            settings = ReservoirSettings(
                data_dir=data_dir,
                providers={"demo": ProviderSettings(base_url=f"{standin}/v1")},
                model_routes={"demo-*": "demo"},
            )
            print(
                "DEMO with a local STAND-IN model (no provider key set: OPENAI_API_KEY is "
                "empty).\nThe stand-in is not an LLM: it answers with the messages it was "
                "sent, so you can see what memory added."
            )
        gateway = await stack.enter_async_context(served(create_app(settings, observer=observe)))
        user = f"ada-{uuid.uuid4().hex[:6]}"
        base = f"{gateway}/v1/partition/demo/instance/{user}"
        print(f"Memory: embedded Chroma in {data_dir}\nClient base URL: {base}")
        for number, text in ((1, FIRST), (2, SECOND)):
            async with httpx.AsyncClient(timeout=120) as session:  # a new session each time
                response = await session.post(
                    f"{base}/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": text}]},
                )
            _say(f"Session {number}: the client sends only", text)
            if response.status_code != 200:
                _say(f"The gateway answered {response.status_code}", response.text)
                return 1
            if number == 2:
                sent = json.dumps(seen[-1]["messages"], indent=2, ensure_ascii=False)
                _say("Session 2: the request as the model received it", sent)
            answer = response.json()["choices"][0]["message"]["content"]
            _say(f"Session {number}: the model answered", answer)
    remembered = FIRST in json.dumps(seen[-1]["messages"], ensure_ascii=False)
    _say(
        "Result",
        "The second session's request carried what was said in the first."
        if remembered
        else "Memory was NOT injected: see the log above.",
    )
    return 0 if remembered else 1
