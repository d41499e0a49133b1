"""Memory through real HTTP: uvicorn, the middleware, Chroma and the real embedding model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionToolParam

from reservoir_middleware.asgi._replies import completion_chunk
from tests.blocks import sections, unblocked
from tests.conftest import Gateway, GatewayFactory
from tests.upstream import Reply, sse

DOG = "My dog is called Biscuit and she loves swimming at the beach."
FILLER = [
    "I started learning the cello in March.",
    "The train to work was late again today.",
    "We repainted the kitchen a pale green colour.",
    "My sister is visiting from Toronto next month.",
    "I finally finished reading that long history of Rome.",
    "The printer at the office keeps jamming.",
    "I want to try baking sourdough bread this weekend.",
    "Our team switched to a four-day week.",
    "The garden tomatoes are finally turning red.",
    "I need to renew my passport before summer.",
]


@pytest.fixture
async def ai(gateway: Gateway) -> AsyncIterator[AsyncOpenAI]:
    """The official client, pointed at a memory base URL."""
    async with AsyncOpenAI(
        base_url=gateway.base(), api_key="sk-test", max_retries=0, timeout=30
    ) as openai_client:
        yield openai_client


async def test_openai_client_memory_recalled_without_history(
    gateway: Gateway, ai: AsyncOpenAI
) -> None:
    """A fact told once comes back semantically after many unrelated turns."""
    first = await ai.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": DOG}]
    )
    assert first.choices[0].message.content == f"Echo: {DOG}"
    for line in FILLER:  # push the fact out of the 15-message recent window
        await ai.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": line}]
        )
    await gateway.reservoir.settle()
    await ai.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "What is the name of my dog?"}]
    )
    sent = gateway.upstream.received[-1].messages
    shown = sections(sent[-1])
    assert shown["semantic"] and shown["recent"]
    assert f"user: {DOG}" in shown["semantic"]
    # the answer to the recalled message comes with it
    assert f"assistant: Echo: {DOG}" in shown["semantic"]
    assert unblocked(sent[-1]) == {"role": "user", "content": "What is the name of my dog?"}


async def test_streamed_answer_recorded_and_recalled(gateway: Gateway, ai: AsyncOpenAI) -> None:
    stream = await ai.chat.completions.create(
        model="gpt-4o", stream=True, messages=[{"role": "user", "content": DOG}]
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == f"Echo: {DOG}"
    stored = await gateway.stored()
    assert [(r.role, r.text, r.complete) for r in stored] == [
        ("user", DOG, True),
        ("assistant", f"Echo: {DOG}", True),
    ]
    assert stored[1].finish_reason == "stop"
    assert stored[0].trace_id == stored[1].trace_id
    await ai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert f"Echo: {DOG}" in gateway.upstream.received[-1].text


def awkward_stream(content: str) -> list[bytes]:
    """Keep-alive lines, CRLF, no [DONE], split inside multi-byte characters."""

    def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
        body = completion_chunk(delta, "gpt-4o", finish_reason=finish, completion_id="x", created=0)
        return sse(body)

    events = b": ping\r\n\r\n"
    events += chunk({"role": "assistant"})
    for piece in (content[:7], content[7:15], content[15:]):
        events += chunk({"content": piece}).replace(b"\n", b"\r\n") + b": keep-alive\n\n"
    events += chunk({}, "stop")
    raw = json.dumps(content, ensure_ascii=False).encode()
    assert raw  # cut every 5 bytes: lands inside "é" and "☕" and inside CRLF pairs
    return [events[i : i + 5] for i in range(0, len(events), 5)]


async def test_stream_split_at_awkward_boundaries_is_recorded(gateway: Gateway) -> None:
    content = "Café au lait ☕ with crème brûlée, naïvely délicieux."
    gateway.upstream.replies.append(Reply(raw=awkward_stream(content)))
    async with gateway.http.stream(
        "POST",
        f"{gateway.base()}/chat/completions",
        json={
            "model": "gpt-4o",
            "stream": True,
            "messages": [{"role": "user", "content": "Dessert?"}],
        },
    ) as response:
        received = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.status_code == 200
    assert received == b"".join(awkward_stream(content))  # forwarded byte for byte
    stored = await gateway.stored()
    assert [(r.role, r.text) for r in stored] == [("user", "Dessert?"), ("assistant", content)]


async def test_first_chunk_reaches_client_before_upstream_sends_second(gateway: Gateway) -> None:
    import asyncio

    gate = asyncio.Event()
    chunks = [
        sse({"choices": [{"index": 0, "delta": {"content": "first"}}]}),
        sse({"choices": [{"index": 0, "delta": {"content": " second"}}]}),
        sse("[DONE]"),
    ]
    gateway.upstream.replies.append(Reply(raw=chunks, gate=gate))
    async with gateway.http.stream(
        "POST",
        f"{gateway.base()}/chat/completions",
        json={"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "go"}]},
    ) as response:
        iterator = response.aiter_raw()
        first = await asyncio.wait_for(iterator.__anext__(), 5)  # upstream is still gated
        assert first == chunks[0]
        assert not gate.is_set()
        gate.set()
        rest = b"".join([c async for c in iterator])
    assert rest == chunks[1] + chunks[2]
    stored = await gateway.stored()
    assert stored[-1].text == "first second"


async def test_tool_calls_recorded_from_stream_and_json(gateway: Gateway, ai: AsyncOpenAI) -> None:

    def delta(d: dict[str, object], finish: str | None = None) -> bytes:
        body = completion_chunk(d, "gpt-4o", finish_reason=finish, completion_id="x", created=0)
        return sse(body)

    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    raw = [delta({"role": "assistant", "tool_calls": [call]})]
    for piece in ['{"ci', 'ty": "Pa', 'ris"}']:
        raw.append(delta({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
    raw += [delta({}, "tool_calls"), sse("[DONE]")]
    gateway.upstream.replies.append(Reply(raw=raw))
    tools: list[ChatCompletionToolParam] = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]
    stream = await ai.chat.completions.create(
        model="gpt-4o",
        stream=True,
        tools=tools,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    _ = [c async for c in stream]
    stored = await gateway.stored()
    answer = stored[-1]
    assert answer.role == "assistant" and answer.finish_reason == "tool_calls"
    assert answer.tool_calls == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]

    json_calls = [
        {
            "id": "call_2",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
        }
    ]
    gateway.upstream.replies.append(Reply(tool_calls=json_calls))
    result = await ai.chat.completions.create(
        model="gpt-4o",
        tools=tools,
        messages=[{"role": "user", "content": "Time in Paris?"}],
    )
    assert result.choices[0].message.tool_calls is not None
    stored = await gateway.stored()
    assert stored[-1].tool_calls == json_calls


async def test_resent_history_is_not_duplicated(gateway: Gateway) -> None:
    history = [{"role": "system", "content": "You are terse."}]
    for question in ["Hello there", "ok", "Tell me about Rome", "ok"]:
        history.append({"role": "user", "content": question})
        response = await gateway.chat(history)
        history.append(response.json()["choices"][0]["message"])
    stored = await gateway.stored()
    assert [(r.role, r.text) for r in stored] == [
        (m["role"], m["content"]) for m in history if m["role"] != "system"
    ]
    assert len({r.id for r in stored}) == 8  # the second "ok" is a new message
    assert [r.seq for r in stored] == list(range(8))


async def test_stateless_client_repeating_itself_keeps_each_turn(gateway: Gateway) -> None:
    for text in ["yes", "Are you sure?", "yes"]:
        await gateway.chat([{"role": "user", "content": text}])
    stored = await gateway.stored()
    assert [r.text for r in stored if r.role == "user"] == ["yes", "Are you sure?", "yes"]


@pytest.mark.parametrize(("partition", "instance"), [("other", "i"), ("p", "other"), ("P", "i")])
async def test_isolation_between_partitions_and_instances(
    gateway: Gateway, partition: str, instance: str
) -> None:
    await gateway.chat([{"role": "user", "content": DOG}])
    await gateway.chat([{"role": "user", "content": "What is my dog called?"}], partition, instance)
    leaked = gateway.upstream.received[-1]
    assert "Biscuit" not in leaked.text
    assert leaked.messages == [{"role": "user", "content": "What is my dog called?"}]
    assert [r.text for r in await gateway.stored(partition, instance)] == [
        "What is my dog called?",
        "Echo: What is my dog called?",
    ]


async def test_every_other_field_reaches_the_app_unchanged(gateway: Gateway) -> None:
    await gateway.chat([{"role": "user", "content": DOG}])
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Where does my dog swim?"}],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
                },
            }
        ],
        "tool_choice": "auto",
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}},
        "seed": 12345678901234567890,
        "temperature": 0.1,
        "top_p": 1e-7,
        "stream_options": {"include_usage": True},
        "metadata": {"ünïcode": "✓", "nested": [1, None, True, {"a": []}]},
        "x_vendor_field": {"keep": "me"},
    }
    response = await gateway.http.post(f"{gateway.base()}/chat/completions", json=body)
    assert response.status_code == 200
    received = gateway.upstream.received[-1]
    sent = received.json
    assert sent.pop("messages") != body["messages"]  # memory was injected...
    expected = {k: v for k, v in body.items() if k != "messages"}
    assert sent == expected  # ...and nothing else changed
    assert int(received.headers["content-length"]) == len(received.body)
    assert response.headers["x-reservoir-trace-id"]


async def test_other_routes_and_methods_pass_through(gateway: Gateway) -> None:
    http, url = gateway.http, gateway.url
    models = await http.get(f"{url}/v1/models")
    assert models.json()["data"][0]["id"] == "gpt-4o"
    raw = b'{"input": "not a chat", "model": "e"}'
    emb = await http.post(
        f"{url}/v1/embeddings", content=raw, headers={"content-type": "application/json"}
    )
    assert emb.content == raw and gateway.upstream.received[-1].body == raw
    get = await http.get(f"{gateway.base()}/chat/completions")
    assert get.headers["x-method"] == "GET"
    assert gateway.upstream.received[-1].path == "/v1/partition/p/instance/i/chat/completions"
    put_body = json.dumps({"model": "m", "messages": [{"role": "user", "content": DOG}]}).encode()
    put = await http.put(f"{url}/v1/chat/completions", content=put_body)
    assert put.status_code == 200 and gateway.upstream.received[-1].body == put_body
    assert await gateway.stored("default", "default") == []
    import websockets

    async with websockets.connect(url.replace("http", "ws") + "/ws", open_timeout=5) as ws:
        await ws.send("hello")
        assert await ws.recv() == "ws:hello"


async def test_bad_json_and_non_chat_bodies_pass_through(gateway: Gateway) -> None:
    for raw in [
        b'{"model": "gpt-4o", "messages": [',
        b"\xff\xfe",
        b'{"model": "m"}',
        b'{"messages": "hi"}',
        b"[]",
    ]:
        response = await gateway.http.post(
            f"{gateway.base()}/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400
        assert response.json()["error"]["message"] == "upstream: invalid JSON body"
        assert gateway.upstream.received[-1].body == raw
        assert gateway.upstream.received[-1].path == "/v1/chat/completions"
    assert await gateway.stored() == []


async def test_oversize_body_refused(gateway_factory: GatewayFactory) -> None:
    async with gateway_factory(max_body_bytes=4096) as gw:
        big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 5000}]}
        response = await gw.http.post(f"{gw.base()}/chat/completions", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "payload_too_large"

        # no content-length: the cap applies while reading
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b" " * 1000

        streamed = await gw.http.post(f"{gw.base()}/chat/completions", content=chunks())
        assert streamed.status_code == 413
        assert gw.upstream.received == []
        assert await gw.stored() == []


async def test_refused_or_failed_requests_store_nothing(gateway: Gateway) -> None:
    """Non-2xx or an error event: nothing is stored, so a client the app refuses
    writes no memory and a retried request is stored once."""
    gateway.upstream.replies.append(Reply(status=401))
    refused = await gateway.chat([{"role": "user", "content": "Vault code is 4711."}])
    assert refused.status_code == 401
    gateway.upstream.replies.append(Reply(status=500))
    failed = await gateway.chat([{"role": "user", "content": "first question"}])
    assert failed.status_code == 500
    err = [
        sse({"choices": [{"index": 0, "delta": {"content": "partial"}}]}),
        sse({"error": {"message": "rate limited", "type": "rate_limit"}}),
    ]
    gateway.upstream.replies.append(Reply(raw=err))
    streamed = await gateway.chat([{"role": "user", "content": "second question"}], stream=True)
    assert streamed.status_code == 200
    assert await gateway.stored() == []
    retried = await gateway.chat([{"role": "user", "content": "first question"}])
    assert retried.status_code == 200
    assert "Vault code" not in gateway.upstream.received[-1].text
    assert [(r.role, r.text) for r in await gateway.stored()] == [
        ("user", "first question"),
        ("assistant", "Echo: first question"),
    ]


async def test_client_disconnect_stores_partial_answer(gateway: Gateway) -> None:
    import asyncio

    gate = asyncio.Event()
    chunks = [
        sse({"choices": [{"index": 0, "delta": {"content": "The beginning"}}]}),
        sse({"choices": [{"index": 0, "delta": {"content": " and the rest"}}]}),
    ]
    gateway.upstream.replies.append(Reply(raw=chunks, gate=gate))
    async with (
        httpx.AsyncClient(timeout=10) as own,
        own.stream(
            "POST",
            f"{gateway.base()}/chat/completions",
            json={
                "model": "gpt-4o",
                "stream": True,
                "messages": [{"role": "user", "content": "tell me a long story"}],
            },
        ) as response,
    ):
        first = await response.aiter_raw().__anext__()
        assert b"The beginning" in first
        # leaving the block closes the connection mid-stream
    for _ in range(100):
        stored = await gateway.stored()
        if len(stored) == 2:
            break
        await asyncio.sleep(0.05)
    gate.set()
    assert [(r.role, r.text, r.complete) for r in stored] == [
        ("user", "tell me a long story", True),
        ("assistant", "The beginning", False),
    ]
