"""Answers over a cap or cut short, through the real middleware and uvicorn: the client
gets every byte; memory keeps the question and the answer's start, `complete=false`."""

from __future__ import annotations

import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI
from starlette.types import Receive, Scope, Send

from reservoir_middleware import Reservoir, ReservoirMiddleware
from reservoir_middleware.asgi._answer import (
    DEFAULT_MAX_BODY_BYTES,
    MAX_ANSWER_CHARS,
    MAX_TOOL_CALLS,
)
from reservoir_middleware.asgi._replies import chat_completion, completion_chunk
from tests.conftest import make_settings, serve

MiB = 1024 * 1024


def event(delta: dict[str, Any] | None = None, finish: str | None = None) -> bytes:
    chunk = completion_chunk(
        delta or {}, "gpt-4o", finish_reason=finish, completion_id="chatcmpl-c", created=0
    )
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
ROLE = event({"role": "assistant", "content": ""})


class Canned:
    """The stand-in model: answers each chat request with the next canned body, sent
    chunk by chunk as given (a body may end anywhere, as a broken upstream's does)."""

    def __init__(self) -> None:
        self.replies: deque[tuple[bytes, list[bytes]]] = deque()

    def add(self, content_type: bytes, chunks: list[bytes]) -> None:
        self.replies.append((content_type, chunks))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        while (await receive()).get("more_body"):
            pass
        content_type, chunks = self.replies.popleft()
        headers = [(b"content-type", content_type)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[str, Canned, Reservoir]]:
    canned = Canned()
    reservoir = Reservoir(make_settings(tmp_path, memory_timeout_ms=120_000))
    await reservoir.warm_up()
    async with serve(ReservoirMiddleware(canned, reservoir=reservoir)) as url:
        yield f"{url}/v1/partition/p/instance/i", canned, reservoir
        await reservoir.settle(timeout=30)


async def exchange(base: str, question: str, *, stream: bool = True) -> bytes:
    messages = [{"role": "user", "content": question}]
    body = {"model": "gpt-4o", "stream": stream, "messages": messages}
    async with (
        httpx.AsyncClient(timeout=120) as http,
        http.stream("POST", f"{base}/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        return b"".join([chunk async for chunk in response.aiter_raw()])


async def stored(reservoir: Reservoir) -> list[Any]:
    await reservoir.settle(timeout=60)
    return await reservoir.recent("p", "i", limit=100)


async def test_one_event_over_the_cap_keeps_the_first_4_mi_characters(tmp_path: Path) -> None:
    text = "0123456789abcdef" * (5 * MiB // 16)  # one SSE event of 5 MiB
    chunks = [ROLE, event({"content": text}), event(finish="stop"), DONE]
    async with gateway(tmp_path) as (base, canned, reservoir):
        canned.add(b"text/event-stream", chunks)
        assert await exchange(base, "write it all in one go") == b"".join(chunks)
        question, answer = await stored(reservoir)
    assert (question.role, question.text) == ("user", "write it all in one go")
    assert answer.role == "assistant" and answer.complete is False
    assert answer.text == text[:MAX_ANSWER_CHARS]


async def test_a_json_answer_over_16_mib_keeps_the_question_and_the_start(
    tmp_path: Path,
) -> None:
    text = "y" * (17 * MiB)
    completion = chat_completion(text, "gpt-4o", completion_id="chatcmpl-j")
    raw = json.dumps(completion).encode()
    async with gateway(tmp_path) as (base, canned, reservoir):
        canned.add(b"application/json", [raw[i : i + MiB] for i in range(0, len(raw), MiB)])
        assert await exchange(base, "a huge JSON answer", stream=False) == raw
        question, answer = await stored(reservoir)
    assert (question.role, question.text) == ("user", "a huge JSON answer")
    assert answer.role == "assistant" and answer.complete is False
    assert DEFAULT_MAX_BODY_BYTES - 1024 < len(answer.text) < DEFAULT_MAX_BODY_BYTES
    assert set(answer.text) == {"y"}


async def test_streams_cut_short_are_stored_incomplete(tmp_path: Path) -> None:
    start = [ROLE, event({"content": "The beginning"})]
    whole_event = event({"content": " and the rest"})
    cut_mid_event = whole_event[: whole_event.index(b"e rest")]  # no line end, JSON cut
    call = {"index": 0, "id": "call_1", "type": "function"}
    call_args_cut = [
        ROLE,
        event({"tool_calls": [{**call, "function": {"name": "weather", "arguments": ""}}]}),
        event({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Par'}}]}),
        event(finish="tool_calls"),
        DONE,
    ]
    cases = [
        ("cut mid-event", [*start, cut_mid_event], "The beginning and th", False),
        ("no [DONE], no finish_reason", start, "The beginning", False),
        ("finish_reason, no [DONE]", [*start, event(finish="stop")], "The beginning", True),
        ("whole", [*start, event(finish="stop"), DONE], "The beginning", True),
    ]
    async with gateway(tmp_path) as (base, canned, reservoir):
        for question, chunks, _, _ in cases:
            canned.add(b"text/event-stream", chunks)
            assert await exchange(base, question) == b"".join(chunks)
        canned.add(b"text/event-stream", call_args_cut)
        await exchange(base, "tool call cut")
        records = await stored(reservoir)
    pairs = zip(records[::2], records[1::2], strict=True)
    answers = {q.text: (a.text, a.complete) for q, a in pairs}
    for question, _, text, complete in cases:
        assert answers[question] == (text, complete), question
    # `finish_reason` came, but the arguments are not whole JSON
    tool_answer = records[-1]
    assert tool_answer.complete is False
    assert tool_answer.tool_calls[0]["function"]["arguments"] == '{"city": "Par'


async def test_tool_calls_past_the_cap_are_not_kept(tmp_path: Path) -> None:
    calls = [
        event(
            {
                "tool_calls": [
                    {
                        "index": n,
                        "id": f"call_{n}",
                        "type": "function",
                        "function": {"name": "ping", "arguments": "{}"},
                    }
                ]
            }
        )
        for n in range(MAX_TOOL_CALLS + 50)
    ]
    chunks = [ROLE, *calls, event(finish="tool_calls"), DONE]
    async with gateway(tmp_path) as (base, canned, reservoir):
        canned.add(b"text/event-stream", chunks)
        async with AsyncOpenAI(base_url=base, api_key="k", max_retries=0) as ai:
            stream = await ai.chat.completions.create(
                model="gpt-4o", stream=True, messages=[{"role": "user", "content": "ping all"}]
            )
            received = [c async for c in stream]
        assert len(received) == len(chunks) - 1  # every event reached the client
        question, answer = await stored(reservoir)
    assert question.text == "ping all"
    assert answer.complete is False
    assert len(answer.tool_calls) == MAX_TOOL_CALLS
    assert [c["id"] for c in answer.tool_calls] == [f"call_{n}" for n in range(MAX_TOOL_CALLS)]
