"""Every shape of `content` the OpenAI chat API allows, through real HTTP.

Plain strings, lists of text parts, image / audio / file parts, assistant
messages with `content: null` and `tool_calls`, `tool` messages, refusals and
`name` fields: what memory stores (read back with the engine API), what the
wrapped app is forwarded (the client's own messages untouched) and what a later
request gets injected (always messages a provider accepts).
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any

from openai import AsyncOpenAI

from reservoir_middleware.asgi._replies import completion_chunk, sse_events
from tests.blocks import as_messages, memory_of, unblocked
from tests.conftest import Gateway, GatewayFactory
from tests.upstream import Reply

OPENAI_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def blob(size: int) -> str:
    """`size` random bytes as base64: no text of it may end up in memory."""
    return base64.b64encode(os.urandom(size)).decode("ascii")


def injected(forwarded: list[dict[str, Any]], sent: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The memory messages of a forwarded request (the lines of its memory block),
    which ends with the client's own messages `sent`, untouched but for the block."""
    own = [m for m in sent if m.get("role") != "system"]
    assert [unblocked(m) for m in forwarded[len(forwarded) - len(own) :]] == own
    return as_messages(memory_of(forwarded))


def assert_valid_for_openai(messages: list[dict[str, Any]]) -> None:
    """The rules the OpenAI API enforces on a messages list (it answers 400 otherwise)."""
    open_calls: set[str] = set()  # calls of the last assistant message awaiting results
    for index, message in enumerate(messages):
        role = message.get("role")
        assert role in ("system", "developer", "user", "assistant", "tool"), message
        content = message.get("content")
        if role == "tool":
            assert message.get("tool_call_id") in open_calls, (
                f"message {index}: a tool result without its call: {message}"
            )
            open_calls.discard(message["tool_call_id"])
            continue
        assert not open_calls, f"message {index}: tool calls {open_calls} got no result"
        if role == "assistant" and message.get("tool_calls"):
            open_calls = {c["id"] for c in message["tool_calls"]}
        elif role == "assistant":
            assert isinstance(content, str | list) or message.get("refusal"), message
        else:
            assert isinstance(content, str | list), message
        if "name" in message:
            assert OPENAI_NAME.match(message["name"]), message
    assert not open_calls, f"tool calls {open_calls} got no result"


async def post(gateway: Gateway, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    response = await gateway.chat(messages, **extra)
    assert response.status_code == 200, response.text
    assert response.headers.get("x-reservoir-status") != "degraded"
    return dict(response.json())


async def test_text_parts_are_stored_as_their_text_and_injected_as_a_string(
    gateway: Gateway,
) -> None:
    one = {"role": "user", "content": [{"type": "text", "text": "My bike is a blue Bianchi."}]}
    several = {
        "role": "user",
        "content": [
            {"type": "text", "text": "I keep the bike in the garage."},
            {"type": "text", "text": "The lock code is 4711."},
        ],
    }
    gateway.upstream.replies.extend([Reply(content="Nice bike."), Reply(content="Noted.")])
    await post(gateway, [one])
    history: list[dict[str, Any]] = [one, {"role": "assistant", "content": "Nice bike."}, several]
    await post(gateway, history)
    assert gateway.upstream.received[-1].messages[-3:] == history  # forwarded as sent

    stored = await gateway.stored()
    assert [(r.role, r.text) for r in stored] == [
        ("user", "My bike is a blue Bianchi."),
        ("assistant", "Nice bike."),
        ("user", "I keep the bike in the garage.\nThe lock code is 4711."),
        ("assistant", "Noted."),
    ]
    hits = await gateway.reservoir.search("p", "i", "what is the code of my bike lock?", limit=1)
    assert hits[0].record.text == "I keep the bike in the garage.\nThe lock code is 4711."

    ask = [{"role": "user", "content": "Where do I keep my bike?"}]
    await post(gateway, ask)
    memory = injected(gateway.upstream.received[-1].messages, ask)
    stored_parts = "I keep the bike in the garage.\nThe lock code is 4711."
    assert {"role": "user", "content": stored_parts} in memory
    assert {"role": "user", "content": "My bike is a blue Bianchi."} in memory
    assert all(isinstance(m["content"], str) for m in memory)
    assert len(await gateway.stored()) == 6  # the re-sent parts were not stored twice


async def test_image_is_forwarded_untouched_but_memory_keeps_only_the_text(
    gateway: Gateway,
) -> None:
    data = blob(600_000)  # 800 kB of base64: far beyond the model's window as text
    photo = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
    link = {
        "type": "image_url",
        "image_url": {"url": "https://example.com/rex.jpg", "detail": "low"},
    }
    question = {
        "role": "user",
        "content": [{"type": "text", "text": "This is my dog Rex. What breed is he?"}, photo],
    }
    gateway.upstream.replies.append(Reply(content="Rex looks like a border collie."))
    answer = await post(gateway, [question])
    # the stand-in answered: the image did not count as ~600k tokens of text
    assert answer["choices"][0]["message"]["content"] == "Rex looks like a border collie."
    sent = gateway.upstream.received[-1]
    assert sent.messages[-1] == question  # the image reached the model byte for byte
    assert data in sent.body.decode()

    second = {
        "role": "user",
        "content": [link, {"type": "text", "text": "And here he is at the beach."}],
    }
    gateway.upstream.replies.append(Reply(content="He seems to love the sea."))
    await post(gateway, [second])
    assert unblocked(gateway.upstream.received[-1].messages[-1]) == second

    stored = await gateway.stored()
    texts = [(r.role, r.text) for r in stored]
    assert texts == [
        ("user", "This is my dog Rex. What breed is he?\n[image]"),
        ("assistant", "Rex looks like a border collie."),
        ("user", "[image]\nAnd here he is at the beach."),
        ("assistant", "He seems to love the sea."),
    ]
    hits = await gateway.reservoir.search("p", "i", "which breed is my dog Rex", limit=1)
    assert hits[0].record.text.startswith("This is my dog Rex.")

    ask = [{"role": "user", "content": "What is the name of my dog?"}]
    await post(gateway, ask)
    later = gateway.upstream.received[-1]
    assert data[:64] not in later.body.decode() and "example.com" not in later.body.decode()
    memory = injected(later.messages, ask)
    assert {"role": "user", "content": "This is my dog Rex. What breed is he?\n[image]"} in memory
    assert_valid_for_openai(later.messages)


async def test_audio_and_file_parts_leave_a_short_marker(gateway: Gateway) -> None:
    audio = {"type": "input_audio", "input_audio": {"data": blob(50_000), "format": "wav"}}
    pdf = {
        "type": "file",
        "file": {
            "filename": "lease.pdf",
            "file_data": f"data:application/pdf;base64,{blob(50_000)}",
        },
    }
    uploaded = {"type": "file", "file": {"file_id": "file-abc123"}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "Transcribe my voice memo."}, audio]},
        {"role": "assistant", "content": "It says: buy oat milk."},
        {"role": "user", "content": [pdf, {"type": "text", "text": "When does my lease end?"}]},
        {"role": "assistant", "content": "Your lease ends in June."},
        {"role": "user", "content": [uploaded, {"type": "text", "text": "And this one?"}]},
    ]
    gateway.upstream.replies.append(Reply(content="That is the same lease."))
    await post(gateway, messages)
    assert gateway.upstream.received[-1].messages[-5:] == messages
    stored = await gateway.stored()
    assert [r.text for r in stored] == [
        "Transcribe my voice memo.\n[audio]",
        "It says: buy oat milk.",
        "[file: lease.pdf]\nWhen does my lease end?",
        "Your lease ends in June.",
        "[file]\nAnd this one?",
        "That is the same lease.",
    ]
    assert all(len(r.text) < 100 for r in stored)


def weather_call(call_id: str, city: str) -> dict[str, Any]:
    arguments = json.dumps({"city": city})
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


async def test_tool_calls_and_results_stored_once_and_injected_as_valid_messages(
    gateway: Gateway,
) -> None:
    client = AsyncOpenAI(base_url=gateway.base(), api_key="sk-test", max_retries=0, timeout=30)
    async with client as ai:
        question = {"role": "user", "content": "What is the weather in Lyon and in Oslo?"}
        calls = [weather_call("call_lyon", "Lyon"), weather_call("call_oslo", "Oslo")]
        gateway.upstream.replies.append(Reply(tool_calls=calls))
        first = await ai.chat.completions.create(
            model="gpt-4o",
            messages=[question],  # type: ignore[list-item]
            tools=TOOLS,  # type: ignore[arg-type]
        )
        call_message = first.choices[0].message.model_dump(exclude_none=True)
        assert call_message.get("content") is None and len(call_message["tool_calls"]) == 2
        results = [
            {"role": "tool", "tool_call_id": "call_lyon", "content": "Lyon: 18°C, sunny"},
            {  # a tool result given as text parts
                "role": "tool",
                "tool_call_id": "call_oslo",
                "content": [{"type": "text", "text": "Oslo: 4°C, sleet"}],
            },
        ]
        history = [question, {"role": "assistant", "content": None, "tool_calls": calls}, *results]
        gateway.upstream.replies.append(Reply(content="Sunny in Lyon, sleet in Oslo."))
        second = await ai.chat.completions.create(
            model="gpt-4o",
            messages=history,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
        )
        assert second.choices[0].message.content == "Sunny in Lyon, sleet in Oslo."
        forwarded = gateway.upstream.received[-1].messages
        assert forwarded[-4:] == history  # the client's own tool traffic reaches the model as is
        assert_valid_for_openai(forwarded)
        await gateway.reservoir.settle()

        stored = await gateway.stored()
        assert [(r.role, r.text, r.tool_call_id) for r in stored] == [
            ("user", question["content"], None),
            ("assistant", "", None),
            ("tool", "Lyon: 18°C, sunny", "call_lyon"),
            ("tool", "Oslo: 4°C, sleet", "call_oslo"),
            ("assistant", "Sunny in Lyon, sleet in Oslo.", None),
        ]
        assert stored[1].tool_calls == calls  # the call message was stored once, from the answer
        assert stored[1].source == "response"
        assert len({r.trace_id for r in stored[:2]}) == 1

        # A new session: the tool exchange comes back as messages any provider accepts.
        ask = [{"role": "user", "content": "Do I need an umbrella in Oslo?"}]
        await ai.chat.completions.create(model="gpt-4o", messages=ask)  # type: ignore[arg-type]
        later = gateway.upstream.received[-1].messages
        assert_valid_for_openai(later)
        memory = injected(later, ask)
        assert all(
            m["role"] in ("user", "assistant") and isinstance(m["content"], str) for m in memory
        )
        text = "\n".join(m["content"] for m in memory)
        assert '[called tools] get_weather({"city": "Lyon"}); get_weather({"city": "Oslo"})' in text
        assert "[tool result] Oslo: 4°C, sleet" in text
        assert "Sunny in Lyon, sleet in Oslo." in text


async def test_stored_tool_calls_are_recalled_while_the_request_has_its_own(
    gateway: Gateway,
) -> None:
    paris: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [weather_call("call_p", "Paris")]},
        {"role": "tool", "tool_call_id": "call_p", "content": "Paris: 12°C"},
    ]
    await post(gateway, paris)
    lyon: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Lyon?"},
        {"role": "assistant", "content": None, "tool_calls": [weather_call("call_l", "Lyon")]},
        {"role": "tool", "tool_call_id": "call_l", "content": "Lyon: 18°C"},
    ]
    await post(gateway, lyon)
    sent = gateway.upstream.received[-1].messages
    assert_valid_for_openai(sent)
    memory = [m["content"] for m in injected(sent, lyon)]
    assert "[tool result] Paris: 12°C" in memory
    assert '[called tools] get_weather({"city": "Paris"})' in memory  # the call with its result


async def test_injected_tool_traffic_is_valid_with_merged_system_messages(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(merge_system_messages=True) as gateway:
        calls = [weather_call("call_1", "Lyon")]
        history: list[dict[str, Any]] = [
            {"role": "user", "content": "Weather in Lyon?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "call_1", "content": "18°C"},
        ]
        await post(gateway, history)
        await post(gateway, [{"role": "user", "content": "And tomorrow in Lyon?"}])
        sent = gateway.upstream.received[-1].messages
        assert_valid_for_openai(sent)
        assert [m["role"] for m in sent] == ["user"]  # no system message of memory's own
        shown = "\n".join(memory_of(sent))
        assert '[called tools] get_weather({"city": "Lyon"})' in shown
        assert "[tool result] 18°C" in shown


def refusal_stream(text: str) -> list[bytes]:
    deltas: list[tuple[dict[str, Any], str | None]] = [
        ({"role": "assistant", "content": None, "refusal": ""}, None),
        ({"refusal": text[:10]}, None),
        ({"refusal": text[10:]}, None),
        ({}, "stop"),
    ]
    chunks = [
        completion_chunk(d, "gpt-4o", finish_reason=f, completion_id="x", created=0)
        for d, f in deltas
    ]
    return sse_events(chunks)


async def stream_refusal(gateway: Gateway, question: dict[str, Any], refusal: str) -> None:
    gateway.upstream.replies.append(Reply(raw=refusal_stream(refusal)))
    async with gateway.http.stream(
        "POST",
        f"{gateway.base()}/chat/completions",
        json={"model": "gpt-4o", "stream": True, "messages": [question]},
    ) as response:
        assert response.status_code == 200
        _ = [chunk async for chunk in response.aiter_raw()]


async def test_refusals_are_stored_and_injected_as_text(gateway: Gateway) -> None:
    refusal = "I can't help with picking locks."
    question = {"role": "user", "content": "How do I pick the lock of my neighbour's shed?"}
    await stream_refusal(gateway, question, refusal)
    stored = await gateway.stored()
    assert [(r.role, r.text) for r in stored] == [
        ("user", question["content"]),
        ("assistant", refusal),
    ]

    # A client history where a refusal comes as a content part.
    parts_refusal = "I won't write angry letters."
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "Can you write my neighbour an angry letter?"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": parts_refusal}]},
        {"role": "user", "content": "Ok, thanks."},
    ]
    await post(gateway, history)
    assert [unblocked(m) for m in gateway.upstream.received[-1].messages[-3:]] == history
    stored = await gateway.stored()
    assert [(r.role, r.text) for r in stored][2:] == [
        ("user", "Can you write my neighbour an angry letter?"),
        ("assistant", parts_refusal),
        ("user", "Ok, thanks."),
        ("assistant", "Echo: Ok, thanks."),
    ]

    ask = [{"role": "user", "content": "What did you refuse to do for me?"}]
    await post(gateway, ask)
    later = gateway.upstream.received[-1].messages
    assert_valid_for_openai(later)
    memory = injected(later, ask)
    assert {"role": "assistant", "content": refusal} in memory
    assert {"role": "assistant", "content": parts_refusal} in memory


async def test_a_refusal_sent_back_in_the_history_is_not_stored_twice(gateway: Gateway) -> None:
    """The API gives a refusal as `content: null, refusal: ...`; a client re-sends it so."""
    refusal = "I can't help with picking locks."
    question = {"role": "user", "content": "How do I pick the lock of my neighbour's shed?"}
    await stream_refusal(gateway, question, refusal)
    history: list[dict[str, Any]] = [
        question,
        {"role": "assistant", "content": None, "refusal": refusal},
        {"role": "user", "content": "Fine. How do I oil a squeaky hinge?"},
    ]
    gateway.upstream.replies.append(Reply(content="A drop of oil on the pin."))
    await post(gateway, history)
    assert gateway.upstream.received[-1].messages[-3:] == history
    stored = await gateway.stored()
    assert [(r.role, r.text) for r in stored] == [
        ("user", question["content"]),
        ("assistant", refusal),
        ("user", "Fine. How do I oil a squeaky hinge?"),
        ("assistant", "A drop of oil on the pin."),
    ]


async def test_names_are_kept_and_injected(gateway: Gateway) -> None:
    group = [
        {"role": "system", "content": "A family chat.", "name": "setup"},
        {"role": "user", "name": "alice", "content": "I will bring the lasagne on Sunday."},
        {"role": "user", "name": "bob", "content": "I will bring a chocolate cake."},
        {"role": "user", "name": "Ana Lima", "content": "I will bring the lemonade."},
    ]
    await post(gateway, group)
    assert gateway.upstream.received[-1].messages == group  # nothing stored yet to inject
    stored = await gateway.stored()
    assert [(r.role, r.name, r.text) for r in stored] == [
        ("user", "alice", "I will bring the lasagne on Sunday."),
        ("user", "bob", "I will bring a chocolate cake."),
        ("user", "Ana Lima", "I will bring the lemonade."),  # kept as the client sent it
        ("assistant", None, "Echo: I will bring the lemonade."),
    ]  # the system prompt is not memory

    ask = [{"role": "user", "name": "carol", "content": "Who brings the cake?"}]
    await post(gateway, ask)
    later = gateway.upstream.received[-1].messages
    assert_valid_for_openai(later)
    memory = injected(later, ask)
    assert {"role": "user", "name": "bob", "content": "I will bring a chocolate cake."} in memory
    assert {
        "role": "user",
        "name": "alice",
        "content": "I will bring the lasagne on Sunday.",
    } in memory
    # a name another provider allowed is injected in the form OpenAI accepts
    assert {"role": "user", "name": "Ana_Lima", "content": "I will bring the lemonade."} in memory
    assert unblocked(later[-1]) == {
        "role": "user",
        "name": "carol",
        "content": "Who brings the cake?",
    }


async def test_names_with_merged_system_messages(gateway_factory: GatewayFactory) -> None:
    async with gateway_factory(merge_system_messages=True) as gateway:
        await post(gateway, [{"role": "user", "name": "bob", "content": "I bring the cake."}])
        await post(gateway, [{"role": "user", "name": "carol", "content": "Who brings cake?"}])
        sent = gateway.upstream.received[-1].messages
        assert [m["role"] for m in sent] == ["user"]
        assert "user (bob): I bring the cake." in memory_of(sent)
        assert "assistant: Echo: I bring the cake." in memory_of(sent)
