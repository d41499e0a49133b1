"""Memory keeps the provider's prompt cache: what the model receives on turn k+1
starts with what it received on turn k, while memory is still injected.

A client that re-sends its history is played through `reservoir serve` (and
the middleware) with the official `openai` client; the stand-in model records
what it receives. Each turn's memory block goes with the user message it was
retrieved for, and comes back with it, byte for byte, on later turns: across a
restart of the gateway too, since the store is the only state.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI

from reservoir_middleware import Reservoir
from reservoir_middleware.cli._transfer import import_lines
from reservoir_middleware.context import MEMORY_OPEN
from reservoir_middleware.gateway.app import create_app
from reservoir_middleware.memory.tokens import get_encoding
from reservoir_middleware.records import content_text
from tests.blocks import block_of
from tests.conftest import GatewayFactory, make_settings, serve
from tests.upstream import Reply, Upstream

MAY_25 = datetime(2023, 5, 25, 18, 30, tzinfo=timezone.utc)
JUNE_2 = datetime(2023, 6, 2, 9, 0, tzinfo=timezone.utc)
SISTER = "My sister Clara moved to Porto in March to teach violin at the conservatory."
BIKE = "My bike is a green Bianchi road bike that I keep in the basement."
FILLER = [
    "I tried a new sourdough recipe with rye flour last weekend.",
    "The quarterly planning meeting moved to Thursday afternoon.",
    "We are thinking about repainting the kitchen a warm yellow.",
    "My favourite podcast this month is about the history of maps.",
]
QUESTIONS = [
    "Where did my sister move to?",
    "What does she teach there?",
    "And what colour is my bike?",
    "Thanks. Anything else about her move?",
]


async def seed(memory: Reservoir) -> None:
    await memory.add(
        "p",
        "i",
        [{"role": "user", "content": SISTER}, {"role": "assistant", "content": "Porto, lovely!"}],
        timestamp=MAY_25,
    )
    for text in FILLER:
        await memory.add("p", "i", [{"role": "user", "content": text}], timestamp=MAY_25)
    await memory.add("p", "i", [{"role": "user", "content": BIKE}], timestamp=JUNE_2)


def token_ids(messages: list[dict[str, Any]]) -> list[int]:
    encoding = get_encoding("o200k_base")
    out: list[int] = []
    for m in messages:
        out += encoding.encode_ordinary(m["role"]) + encoding.encode_ordinary(
            content_text(m.get("content"))
        )
        out.append(-1)
    return out


def prefix_share(requests: list[list[dict[str, Any]]]) -> float:
    """Tokens that are a prefix of an earlier request, over all tokens (as bench/cache.py)."""
    seqs = [token_ids(r) for r in requests]
    cached = total = 0
    for k, seq in enumerate(seqs):
        best = 0
        for earlier in seqs[:k]:
            n = 0
            while n < min(len(seq), len(earlier)) and seq[n] == earlier[n]:
                n += 1
            best = max(best, n)
        cached += best
        total += len(seq)
    return cached / total


def has_memory(messages: list[dict[str, Any]]) -> bool:
    return any(MEMORY_OPEN in content_text(m.get("content")) for m in messages)


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, upstream_url: str, **overrides: Any) -> AsyncIterator[str]:
    settings = make_settings(
        tmp_path, openai_base_url=upstream_url + "/v1", auto_models=[], **overrides
    )
    async with serve(create_app(settings)) as url:
        yield url


async def play(url: str, history: list[dict[str, Any]], question: str, answer: str) -> None:
    history.append({"role": "user", "content": question})
    async with AsyncOpenAI(
        base_url=f"{url}/v1/partition/p/instance/i", api_key="sk-test", max_retries=0, timeout=30
    ) as client:
        reply = await client.chat.completions.create(model="gpt-4o", messages=history)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == answer
    history.append({"role": "assistant", "content": answer})


async def test_each_request_starts_with_the_previous_one_through_reservoir_serve(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, context_token_budget=220, recent_context_size=0)
    memory = Reservoir(settings)
    await seed(memory)
    await memory.close()
    upstream = Upstream()
    answers = [f"Answer {n}." for n in range(len(QUESTIONS))]
    upstream.replies.extend(Reply(a) for a in answers)
    history: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."}]
    async with serve(upstream.app()) as upstream_url:
        # turns 1-2 on one gateway, turns 3-4 on a new one: a restart or another replica
        for start, stop in ((0, 2), (2, 4)):
            async with gateway(
                tmp_path, upstream_url, context_token_budget=220, recent_context_size=0
            ) as url:
                for n in range(start, stop):
                    await play(url, history, QUESTIONS[n], answers[n])
    sent = [r.messages for r in upstream.received]
    assert len(sent) == 4
    for before, after in itertools.pairwise(sent):
        assert after[: len(before)] == before  # the whole previous request, byte for byte
    assert all(has_memory(r) for r in sent)
    first = content_text(sent[0][-1]["content"])
    assert SISTER in first and "25 May 2023:" in first  # the fact, with the day it was said
    # the bike comes up on turn 3: it goes with that turn's message, dated
    third = content_text(sent[2][-1]["content"])
    assert BIKE in third and "\n2 Jun:\nuser: " + BIKE in third and BIKE not in first
    assert third.endswith(QUESTIONS[2])
    without = [history[: 2 * k + 2] for k in range(4)]  # as the client sent them
    assert prefix_share(sent) >= 0.9 * prefix_share(without)


async def test_a_tool_step_keeps_its_turn_s_memory_without_searching_again(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(recent_context_size=0) as gw:
        await seed(gw.reservoir)
        question = {"role": "user", "content": "Where did my sister move to?"}
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "lookup", "arguments": '{"city": "Porto"}'},
        }
        gw.upstream.replies.append(Reply(tool_calls=[call]))
        await gw.chat([question])
        step: list[dict[str, Any]] = [
            question,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Porto: 24 C, sunny"},
        ]
        await gw.chat(step)
    first, second = (r.messages for r in gw.upstream.received)
    assert SISTER in content_text(first[-1]["content"])
    assert second[: len(first)] == first
    assert sum(has_memory([m]) for m in second) == 1  # no new block for the tool step


async def test_a_retry_gets_the_same_bytes_and_old_first_words_get_fresh_memory(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(recent_context_size=0) as gw:
        await seed(gw.reservoir)
        question = [{"role": "user", "content": "Where did my sister move to?"}]
        await gw.chat(question)
        news = "Clara now also plays in a jazz trio in Porto on Fridays."
        await gw.reservoir.add("p", "i", [{"role": "user", "content": news}])
        await gw.chat(question)  # a retry: the block it got stands, nothing is searched
        first, retry = (r.messages for r in gw.upstream.received)
        assert retry == first and news not in str(retry)
        # the same first words, said long ago (stored without a block): a fresh block
        old = [{"role": "user", "content": "Tell me about my sister."}]
        await gw.reservoir.add("p", "i", old, timestamp=MAY_25)
        await gw.chat(old)
        fresh = content_text(gw.upstream.received[-1].messages[-1]["content"])
        assert MEMORY_OPEN in fresh and news in fresh


@pytest.mark.parametrize("merge", [False, True])
async def test_the_block_goes_into_the_last_user_message_of_any_shape(
    gateway_factory: GatewayFactory, merge: bool
) -> None:
    async with gateway_factory(merge_system_messages=merge) as gw:
        await seed(gw.reservoir)
        parts = [{"type": "text", "text": "Where did my sister move to?"}]
        await gw.chat(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "system", "content": "Answer in English."},
                {"role": "user", "content": parts},
            ]
        )
    sent = gw.upstream.received[-1].messages
    system = [m for m in sent if m["role"] == "system"]
    assert len(system) == (1 if merge else 2)
    assert all(MEMORY_OPEN not in content_text(m["content"]) for m in system)
    last = sent[-1]["content"]
    assert isinstance(last, list) and last[1:] == parts
    assert last[0]["type"] == "text" and SISTER in last[0]["text"]


async def test_imported_messages_keep_their_dates_in_memory(tmp_path: Path) -> None:
    memory = Reservoir(make_settings(tmp_path))
    try:
        said = datetime(2021, 3, 14, 12, 0, tzinfo=timezone.utc).timestamp()
        line = {
            "id": f"{7:032x}",
            "partition": "p",
            "instance": "i",
            "role": "user",
            "text": "I planted three apple trees behind the barn.",
            "timestamp": said,
        }
        report = await import_lines(memory, [(1, json.dumps(line))])
        assert report.imported == 1
        question = {"role": "user", "content": "When did I plant the apple trees?"}
        result = await memory.enrich("p", "i", {"model": "gpt-4o", "messages": [question]})
        block = content_text(result.body["messages"][-1]["content"])
        assert "14 Mar 2021:\nuser: I planted three apple trees behind the barn." in block
    finally:
        await memory.close()


async def test_a_forgotten_message_leaves_the_blocks_that_showed_it(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(recent_context_size=0) as gw:
        await seed(gw.reservoir)
        history: list[dict[str, Any]] = [{"role": "user", "content": "Where did my sister move?"}]
        await gw.chat(history)
        assert SISTER in block_of(gw.upstream.received[-1].messages[-1])
        [hit] = [h for h in await gw.reservoir.search("p", "i", SISTER) if h.record.text == SISTER]
        assert await gw.reservoir.forget("p", "i", hit.record.id) is not None
        history += [{"role": "assistant", "content": "Echo."}, {"role": "user", "content": "Ok."}]
        await gw.chat(history)
        sent = gw.upstream.received[-1].messages
        assert SISTER not in str(sent)  # gone from the block of the first turn too
        stored = [r for r in await gw.stored() if r.memory]
        assert stored and all(hit.record.id not in str(r.memory) for r in stored)
