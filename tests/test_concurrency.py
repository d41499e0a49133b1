"""Isolation under load: hundreds of conversations in dozens of scopes at once.

Everything is real except the model (the stand-in of `tests/upstream.py`): a
uvicorn server on 127.0.0.1, the middleware, embedded Chroma, the embedding
model, and the official `openai` client with bounded concurrency. Every
message carries a tag naming its scope, conversation and turn, so a message
that reaches another scope (in what is stored, or in what the model is sent)
is found by a regular expression.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote

import httpx
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from reservoir_middleware.context import without_memory
from tests.conftest import GatewayFactory

PARTITIONS = 12
INSTANCES = 3
CONVERSATIONS = 240
IN_FLIGHT = 32
SCOPE_HEADER = "x-test-scope"
TAG = re.compile(r"\b(P\d\dI\d)C(\d\d\d)T(\d)\b")

TOPICS = [
    "the garden needs watering before the heatwave",
    "my cello lesson moved to Thursday evening",
    "the quarterly report is due at the end of the month",
    "we are planning a hiking trip in the Alps",
    "the printer on the third floor keeps jamming",
    "my sister adopted a grey kitten called Pebble",
    "I am learning to bake sourdough bread",
    "the train to Lyon was cancelled again",
]


def scope_tag(partition: int, instance: int) -> str:
    return f"P{partition:02d}I{instance}"


@dataclass
class Conversation:
    number: int
    partition: str  # the route's names
    instance: str
    tag: str  # the scope's tag, e.g. P03I1
    turns: int
    stream: list[bool]
    stateful: bool  # re-sends the whole history (else only its newest message)
    sent: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    degraded: int = 0

    def text(self, turn: int) -> str:
        topic = TOPICS[(self.number + turn) % len(TOPICS)]
        return f"{self.tag}C{self.number:03d}T{turn} note: {topic}."


def plan(seed: int = 7) -> list[Conversation]:
    rng = random.Random(seed)
    conversations = []
    for number in range(CONVERSATIONS):
        p, i = number % PARTITIONS, (number // PARTITIONS) % INSTANCES
        turns = 2 + number % 2
        conversations.append(
            Conversation(
                number=number,
                partition=f"team-{p:02d}",
                instance=f"user {i}",  # a space: percent-encoded in the URL
                tag=scope_tag(p, i),
                turns=turns,
                stream=[rng.random() < 0.5 for _ in range(turns)],
                stateful=number % 3 != 0,
            )
        )
    rng.shuffle(conversations)
    return conversations


async def talk(client: AsyncOpenAI, conv: Conversation, slots: asyncio.Semaphore) -> None:
    history: list[ChatCompletionMessageParam] = []
    for turn in range(conv.turns):
        text = conv.text(turn)
        history.append({"role": "user", "content": text})
        messages = history if conv.stateful else [history[-1]]
        raw: Any  # the raw response of a stream or of a completion (two types)
        async with slots:
            if conv.stream[turn]:
                raw = await client.chat.completions.with_raw_response.create(
                    model="gpt-4o", messages=messages, stream=True
                )
                stream = raw.parse()
                chunks = [c.choices[0].delta.content or "" async for c in stream if c.choices]
                answer = "".join(chunks)
            else:
                raw = await client.chat.completions.with_raw_response.create(
                    model="gpt-4o", messages=messages
                )
                answer = raw.parse().choices[0].message.content or ""
        assert raw.status_code == 200
        conv.degraded += raw.headers.get("x-reservoir-status") == "degraded"
        assert answer == f"Echo: {text}", (conv.tag, conv.number, answer)
        conv.sent.append(text)
        conv.answers.append(answer)
        history.append({"role": "assistant", "content": answer})
        await asyncio.sleep(0)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_hundreds_of_conversations_stay_in_their_scopes(
    gateway_factory: GatewayFactory,
) -> None:
    conversations = plan()
    scopes = {(c.partition, c.instance): c.tag for c in conversations}
    assert len(scopes) == PARTITIONS * INSTANCES
    started = time.monotonic()
    async with gateway_factory() as gateway:
        await gateway.reservoir.warm_up()
        limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
        timeout = httpx.Timeout(60, connect=10)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
            clients = {
                key: AsyncOpenAI(
                    base_url=f"{gateway.url}/v1/partition/{quote(key[0], safe='')}"
                    f"/instance/{quote(key[1], safe='')}",
                    api_key="sk-test",
                    max_retries=0,
                    http_client=cast(Any, http),  # openai types it as its httpx2; httpx works
                    default_headers={SCOPE_HEADER: tag},
                )
                for key, tag in scopes.items()
            }
            slots = asyncio.Semaphore(IN_FLIGHT)
            await asyncio.wait_for(
                asyncio.gather(
                    *(talk(clients[(c.partition, c.instance)], c, slots) for c in conversations)
                ),
                timeout=150,
            )
        traffic_seconds = time.monotonic() - started
        await gateway.reservoir.settle(timeout=60)

        # Nothing went un-enriched: a degraded request is also one whose messages
        # were never stored.
        assert sum(c.degraded for c in conversations) == 0

        # What the model was sent: every request carried only its own scope's text.
        received = gateway.upstream.received
        assert len(received) == sum(c.turns for c in conversations)
        enriched = 0
        own_history_seen = 0
        stateless_later_turns = 0
        for request in received:
            tag = request.headers[SCOPE_HEADER]
            found = TAG.findall(request.text)
            assert found, request.text
            foreign = {f"{t}C{c}T{n}" for t, c, n in found if t != tag}
            assert not foreign, f"a request of {tag} was sent {sorted(foreign)}"
            last = TAG.search(without_memory(request.messages[-1]["content"]))
            assert last is not None and last.group(1) == tag
            number, turn = int(last.group(2)), int(last.group(3))
            others = {(int(c), int(n)) for _, c, n in found} - {(number, turn)}
            enriched += bool(others)
            if number % 3 == 0 and turn > 0:  # a stateless conversation's later turn
                stateless_later_turns += 1
                own_history_seen += (number, turn - 1) in others
        # Memory was at work (else the leak check above would prove nothing): most
        # requests got other messages of their scope, and a conversation that
        # sends only its newest message was reminded of its own previous turn.
        assert enriched >= 0.9 * (len(received) - len(scopes))
        assert stateless_later_turns > 0
        assert own_history_seen >= 0.9 * stateless_later_turns

        # What each scope holds: exactly its own messages, each once, in order.
        for (partition, instance), tag in scopes.items():
            stored = await gateway.reservoir.recent(partition, instance, limit=10_000)
            mine = [c for c in conversations if c.tag == tag]
            expected = Counter(
                (role, text)
                for c in mine
                for text, answer in zip(c.sent, c.answers, strict=True)
                for role, text in (("user", text), ("assistant", answer))
            )
            got = Counter((r.role, r.text) for r in stored)
            lost, extra = expected - got, got - expected
            assert not lost and not extra, f"{tag}: lost {sorted(lost)}, extra {sorted(extra)}"
            assert {(r.partition, r.instance) for r in stored} == {(partition, instance)}
            assert [r.seq for r in stored] == list(range(len(stored)))  # no gap, no twin
            assert len({r.id for r in stored}) == len(stored)
            # Within a conversation: question, its answer, the next question...
            position = {(r.role, r.text): r.seq for r in stored}
            for c in mine:
                order = [
                    position[(role, text)]
                    for question, answer in zip(c.sent, c.answers, strict=True)
                    for role, text in (("user", question), ("assistant", answer))
                ]
                assert order == sorted(order), (tag, c.number, order)
            # and each answer is linked to its own question by the trace id
            by_text = {r.text: r for r in stored}
            for c in mine:
                for question, answer in zip(c.sent, c.answers, strict=True):
                    assert by_text[question].trace_id == by_text[answer].trace_id

        # The semantic search of a scope never returns another scope's message.
        for (partition, instance), tag in list(scopes.items())[:6]:
            hits = await gateway.reservoir.search(partition, instance, "hiking trip", limit=20)
            assert hits
            assert all(TAG.search(h.record.text).group(1) == tag for h in hits)  # type: ignore[union-attr]
    print(
        f"\n{len(received)} requests in {traffic_seconds:.1f} s; {enriched} enriched with "
        f"other messages of their scope; {own_history_seen}/{stateless_later_turns} stateless "
        "later turns reminded of their previous turn"
    )
