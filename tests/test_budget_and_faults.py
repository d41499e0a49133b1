"""Token budget, the "too long" answer, routes, and failing memory, through real HTTP."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI

from reservoir_middleware import hookimpl
from reservoir_middleware.context import Candidate, RetrievalQuery
from reservoir_middleware.memory.tokens import count_messages, count_text
from reservoir_middleware.store import MemoryStore
from tests.blocks import block_of, memory_of, own_text, sections, texts
from tests.conftest import Gateway, GatewayFactory, make_settings

TINY = {"tiny": 1000}  # window 1000, reserve min(1024, 1000 // 4) = 250 -> 750 prompt tokens
SENTENCE = "The quick brown fox jumps over the lazy dog near the old mill by the river. "


async def test_too_long_message_gets_a_length_reply_and_nothing_stored(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(model_limits=TINY) as gw:
        long_text = SENTENCE * 60
        async with AsyncOpenAI(base_url=gw.base(), api_key="k", max_retries=0) as ai:
            reply = await ai.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": long_text}]
            )
            choice = reply.choices[0]
            assert choice.finish_reason == "length"
            assert choice.message.content is not None
            assert choice.message.content.startswith(
                "Your last message is too long. It contains approximately "
            )
            assert "exceeds the maximum limit of 750. Please shorten your message." in (
                choice.message.content
            )
            stream = await ai.chat.completions.create(
                model="tiny", stream=True, messages=[{"role": "user", "content": long_text}]
            )
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == choice.message.content
            assert chunks[-1].choices[0].finish_reason == "length"
        assert gw.upstream.received == []
        assert await gw.stored() == []


async def remember(gw: Gateway) -> None:
    """Twelve short facts and their acknowledgements in scope p/i."""
    for n in range(12):
        await gw.reservoir.add(
            "p",
            "i",
            [
                {"role": "user", "content": f"Memory number {n}: {SENTENCE}"},
                {"role": "assistant", "content": f"Noted fact {n}."},
            ],
        )


def long_history() -> list[dict[str, Any]]:
    """Ten long turns a client re-sends: too many for a small window."""
    turns: list[dict[str, Any]] = []
    for n in range(10):
        turns += [
            {"role": "user", "content": f"Old question {n}: {SENTENCE * 4}"},
            {"role": "assistant", "content": f"Old answer {n}."},
        ]
    return turns


async def test_truncation_keeps_system_and_last_message_under_a_small_limit(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(model_limits=TINY) as gw:
        await remember(gw)
        system = {"role": "system", "content": "You are a careful assistant."}
        turns = long_history()
        last = {"role": "user", "content": "And what about the fox?"}
        response = await gw.chat([system, *turns, last], model="tiny")
        assert response.status_code == 200
        sent = gw.upstream.received[-1].messages
        assert sent[0] == system and sent[-1] == last
        assert count_messages(sent, "tiny") <= 750
        # the client's own turns were needed, so every memory message went first
        assert not any(block_of(m) for m in sent)
        kept = sent[1:-1]
        assert kept and kept == turns[-len(kept) :]  # the newest turns survive

        # with a short request, memory fits partly: recent first, then the best semantic
        before = [r.text for r in await gw.reservoir.recent("p", "i", limit=15)]
        response = await gw.chat([system, last], model="tiny")
        sent = gw.upstream.received[-1].messages
        assert count_messages(sent, "tiny") <= 750
        assert len(sent) == 2 and sent[0] == system and own_text(sent[-1]) == last["content"]
        shown = sections(sent[-1])
        recent = texts(shown["recent"])
        assert recent
        window = [text for text in before if text != last["content"]]
        assert recent == window[-len(recent) :]  # oldest recent messages dropped first
        if shown["semantic"]:  # semantic memory only survives if the window is whole
            assert recent == window


async def test_context_token_budget_caps_injected_memory(tmp_path: Path) -> None:
    from reservoir_middleware import Reservoir

    reservoir = Reservoir(make_settings(tmp_path, context_token_budget=120))
    for n in range(20):
        await reservoir.add("p", "i", [{"role": "user", "content": f"Fact {n}: {SENTENCE}"}])
    result = await reservoir.enrich(
        "p",
        "i",
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "fox?"}]},
        store=False,
    )
    assert result.semantic.tokens + result.recent.tokens > 0
    [question] = result.body["messages"]
    block = block_of(question)
    assert count_text(block + "\n\n", "gpt-4o") == result.memory_tokens
    assert result.memory_tokens <= 120  # the budget, frame, notes and dates included
    assert len(memory_of([question])) == len(result.semantic.messages) + len(result.recent.messages)


async def test_merge_into_one_system_message(gateway_factory: GatewayFactory) -> None:
    async with gateway_factory(merge_system_messages=True) as gw:
        await gw.chat([{"role": "user", "content": "I live in a lighthouse."}])
        await gw.chat(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Where do I live?"},
            ]
        )
        sent = gw.upstream.received[-1].messages
        assert [m["role"] for m in sent] == ["system", "user"]
        assert sent[0]["content"] == "Be brief."  # memory never speaks as the system
        assert "user: I live in a lighthouse." in sections(sent[1])["recent"]


@pytest.mark.parametrize(
    ("path", "headers", "scope", "seen"),
    [
        (
            "/partition/old/instance/shape/v1/chat/completions",
            {},
            ("old", "shape"),
            "/v1/chat/completions",
        ),
        (
            "/v1/chat/completions",
            {"X-Reservoir-Partition": "team", "X-Reservoir-Instance": "bob"},
            ("team", "bob"),
            "/v1/chat/completions",
        ),
        ("/chat/completions", {}, ("default", "default"), "/chat/completions"),
        (
            "/api/v1/partition/p/instance/i/chat/completions",
            {},
            ("p", "i"),
            "/api/v1/chat/completions",
        ),
        (
            "/v1/partition/a%2Fb/instance/%C3%A9t%C3%A9/chat/completions",
            {},
            ("a/b", "été"),
            "/v1/chat/completions",
        ),
    ],
)
async def test_route_shapes(
    gateway_factory: GatewayFactory,
    path: str,
    headers: dict[str, str],
    scope: tuple[str, str],
    seen: str,
) -> None:
    async with gateway_factory() as gw:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "route me"}]}
        response = await gw.http.post(gw.url + path, json=body, headers=headers)
        assert response.status_code == 200
        assert gw.upstream.received[-1].path == seen
        assert [r.text for r in await gw.stored(*scope)] == ["route me", "Echo: route me"]


@pytest.mark.parametrize("bad", ["%2E%2E", "%00x", "x" * 300, "%FF"])
async def test_invalid_names_are_refused(gateway_factory: GatewayFactory, bad: str) -> None:
    async with gateway_factory() as gw:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        response = await gw.http.post(
            f"{gw.url}/v1/partition/{bad}/instance/i/chat/completions", json=body
        )
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request"
        assert gw.upstream.received == []


def broken_data_dir(tmp_path: Path) -> Path:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data directory should be")
    return blocker / "memory"


async def test_fail_open_with_a_broken_store(
    gateway_factory: GatewayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, data_dir=broken_data_dir(tmp_path))
    async with gateway_factory(settings=settings) as gw:
        messages = [{"role": "user", "content": "Still there?"}]
        response = await gw.chat(messages)
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == "Echo: Still there?"
        assert response.headers["x-reservoir-status"] == "degraded"
        assert gw.upstream.received[-1].messages == messages
    assert any(r.name == "reservoir" and r.levelno >= logging.WARNING for r in caplog.records)


async def test_fail_open_with_a_dead_chroma_server(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, chroma_url="http://127.0.0.1:9")
    async with gateway_factory(settings=settings) as gw:
        response = await gw.chat([{"role": "user", "content": "hello"}], stream=True)
        assert response.status_code == 200
        assert response.headers["x-reservoir-status"] == "degraded"
        assert response.content.endswith(b"data: [DONE]\n\n")


async def test_fail_closed_gives_503(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, data_dir=broken_data_dir(tmp_path), fail_open=False)
    async with gateway_factory(settings=settings) as gw:
        response = await gw.chat([{"role": "user", "content": "hello"}])
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "memory_unavailable"
        assert gw.upstream.received == []


class BrokenRetrieval:
    name = "broken-retrieval"

    @hookimpl
    def reservoir_retrieve(self, query: RetrievalQuery, store: MemoryStore) -> list[Candidate]:
        raise RuntimeError("index corrupted")


async def test_failing_plugin_is_skipped_and_logged(
    gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with gateway_factory(plugins=(BrokenRetrieval(),)) as gw:
        await gw.chat([{"role": "user", "content": "I collect vintage postcards."}])
        response = await gw.chat([{"role": "user", "content": "What do I collect?"}])
        assert response.status_code == 200
        assert response.headers["x-reservoir-status"] == "degraded"
        assert "vintage postcards" in gw.upstream.received[-1].text  # built-ins still worked
    assert any(
        "broken-retrieval" in r.getMessage() and "index corrupted" in r.getMessage()
        for r in caplog.records
    )


class SlowRetrieval:
    name = "slow"

    @hookimpl
    async def reservoir_retrieve(self, query: RetrievalQuery, store: MemoryStore) -> None:
        await asyncio.sleep(5)


async def test_memory_timeout_lets_the_request_go_on(gateway_factory: GatewayFactory) -> None:
    async with gateway_factory(plugins=(SlowRetrieval(),), memory_timeout_ms=300) as gw:
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await gw.http.post(
            f"{gw.base()}/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "quick?"}]},
        )
        assert loop.time() - started < 3
        assert response.status_code == 200
        assert response.headers["x-reservoir-status"] == "degraded"
        assert gw.upstream.received[-1].messages == [{"role": "user", "content": "quick?"}]
