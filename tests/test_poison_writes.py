"""No single exchange can stop a scope's memory, and streamed answers are capped.

Each case once jammed its scope on main: the write failed on every retry, the
scope's later exchanges queued behind it, and the journal replayed it after a
restart. Everything here is real (uvicorn, the middleware, Chroma, the
embedding model); only the model is the stand-in of tests/upstream.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import httpx
import openai

from reservoir_middleware import MessageRecord, hookimpl
from reservoir_middleware.asgi._answer import MAX_ANSWER_CHARS
from reservoir_middleware.asgi._replies import completion_chunk
from reservoir_middleware.memory._deadletter import DeadLetters
from reservoir_middleware.memory._deletions import now
from reservoir_middleware.memory._lane import MAX_ATTEMPTS
from tests.conftest import GatewayFactory
from tests.upstream import Reply, sse, stream_chunks

STATUS = "x-reservoir-status"


async def _later_exchange_stored(gw: Any, text: str) -> None:
    response = await gw.chat([{"role": "user", "content": text}])
    assert response.status_code == 200
    assert response.headers.get(STATUS) != "degraded"
    texts = [r.text for r in await gw.stored()]
    assert text in texts
    assert f"Echo: {text}" in texts


async def test_a_6000_message_transcript_is_stored_and_the_scope_goes_on(
    gateway_factory: GatewayFactory,
) -> None:
    # a long agent transcript: more messages than Chroma takes in one batch (5,461)
    steps = ["run the tests", "3 failed", "fix the import", "all green"]
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": steps[i % len(steps)]}
        for i in range(6000)
    ]
    messages.append({"role": "user", "content": "summarise the transcript"})
    async with gateway_factory() as gw:
        response = await gw.chat(messages)
        assert response.status_code == 200
        stored = await gw.stored()
        assert len([r for r in await gw.reservoir.recent("p", "i", limit=10_000)]) >= 6002
        assert stored[-1].text == "Echo: summarise the transcript"
        await _later_exchange_stored(gw, "what is next?")
        assert gw.reservoir.dead_letters.count() == 0


async def test_a_lone_surrogate_in_history_does_not_jam_the_scope(
    gateway_factory: GatewayFactory,
) -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "user", "content": "broken \ud800 text"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "go on"},
        ],
    }
    async with gateway_factory() as gw:
        raw = json.dumps(body).encode()  # the escape "\ud800", as a lenient client sends it
        response = await gw.http.post(
            f"{gw.base()}/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 200
        await gw.reservoir.settle()
        texts = [r.text for r in await gw.stored()]
        assert "broken \ufffd text" in texts  # cleaned at the record boundary
        await _later_exchange_stored(gw, "still there?")
        assert gw.reservoir.dead_letters.count() == 0


async def test_odd_tool_calls_do_not_jam_the_scope_nor_degrade_later_requests(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory() as gw:
        for calls in ([{"function": None}], ["x"]):
            response = await gw.chat(
                [
                    {"role": "user", "content": f"call a tool {calls!r}"},
                    {"role": "assistant", "content": None, "tool_calls": calls},
                    {"role": "user", "content": f"and then? {calls!r}"},
                ]
            )
            assert response.status_code == 200
        await _later_exchange_stored(gw, "anything else?")
        texts = [r.text for r in await gw.stored()]
        assert "call a tool ['x']" in texts
        assert gw.reservoir.dead_letters.count() == 0


class PoisonRecords:
    """A buggy record filter: for one message it returns a record Chroma refuses."""

    @hookimpl
    def reservoir_prepare_record(self, record: MessageRecord) -> MessageRecord | None:
        if "POISON" in record.text:
            record.model = {"not": "a scalar"}  # type: ignore[assignment]
            return record
        return None


async def test_a_job_the_store_keeps_refusing_is_set_aside_and_counted(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(plugins=(PoisonRecords(),)) as gw:
        response = await gw.chat([{"role": "user", "content": "POISON pill"}])
        assert response.status_code == 200
        trace = response.headers["x-reservoir-trace-id"]
        response = await gw.chat([{"role": "user", "content": "after the poison"}])
        assert response.status_code == 200
        for _ in range(600):  # about 8 s of backoff before the poison is set aside
            if gw.reservoir.dead_letters.count():
                break
            await asyncio.sleep(0.1)
        texts = [r.text for r in await gw.stored()]
        assert "POISON pill" not in texts
        assert "after the poison" in texts  # the scope went on
        assert gw.reservoir.dead_letters.count() == 1
        await _later_exchange_stored(gw, "and later still")
        path = gw.reservoir.dead_letters.path
        assert path.stat().st_mode & 0o777 == 0o600
        (letter,) = [json.loads(line) for line in path.read_text().splitlines()]
        assert letter["trace_id"] == trace
        assert letter["attempts"] == MAX_ATTEMPTS
        assert letter["scope"] == ["p", "i"]
        assert "POISON pill" in [r["text"] for r in letter["records"]]
        # set aside, not in the journal any more: a restart does not replay it
        journal = gw.reservoir.settings.data_dir / "journal"
        pending = [
            json.loads(line)
            for file in journal.glob("*.jsonl")
            for line in file.read_text().splitlines()
        ]
        entries = {p["entry"] for p in pending if "entry" in p and p.get("trace_id") == trace}
        assert entries <= {p["done"] for p in pending if "done" in p}
        from reservoir_middleware.cli._memory import stats_of

        assert stats_of(gw.reservoir)["dead_letters"] == 1
        await gw.reservoir.delete("p", "i")  # a deleted scope leaves nothing set aside
        assert gw.reservoir.dead_letters.count() == 0
        assert b"POISON pill" not in path.read_bytes()


async def test_a_streamed_answer_over_the_cap_reaches_the_client_whole_and_is_stored_capped(
    gateway_factory: GatewayFactory,
) -> None:
    piece = "0123456789abcdef" * 4096  # 64 KiB of text a chunk
    pieces = MAX_ANSWER_CHARS // len(piece) + 8
    content = completion_chunk({"content": piece}, "gpt-4o", completion_id="c", created=0)
    chunks = stream_chunks("gpt-4o", "")[:1]
    chunks += [sse(content)] * pieces
    chunks += stream_chunks("gpt-4o", "")[-2:]
    async with gateway_factory() as gw:
        gw.upstream.replies.append(Reply(raw=chunks))
        body = {
            "model": "gpt-4o",
            "stream": True,
            "messages": [{"role": "user", "content": "write a lot"}],
        }
        async with gw.http.stream("POST", f"{gw.base()}/chat/completions", json=body) as r:
            received = b"".join([chunk async for chunk in r.aiter_raw()])
        assert received == b"".join(chunks)  # forwarded byte for byte
        stored = await gw.stored()
        answer = stored[-1]
        assert answer.role == "assistant"
        assert len(answer.text) == MAX_ANSWER_CHARS
        assert answer.text == (piece * pieces)[:MAX_ANSWER_CHARS]
        assert answer.complete is False
        # the official client reads the same stream in full
        client = openai.AsyncOpenAI(
            base_url=gw.base(),
            api_key="sk-test",
            # openai types it as its httpx2 client; an httpx one works as well
            http_client=cast(Any, httpx.AsyncClient(timeout=60)),
        )
        gw.upstream.replies.append(Reply(raw=chunks))
        text = []
        async with client:
            stream = await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "again"}], stream=True
            )
            async for event in stream:
                if event.choices and event.choices[0].delta.content:
                    text.append(event.choices[0].delta.content)
        assert "".join(text) == piece * pieces


def _journal_open(data_dir: Path, trace: str) -> bool:
    """Whether the journal still holds the exchange (an entry not marked done)."""
    lines = [
        json.loads(line)
        for file in (data_dir / "journal").glob("*.jsonl")
        for line in file.read_text().splitlines()
    ]
    entries = {p["entry"] for p in lines if "entry" in p and p.get("trace_id") == trace}
    return bool(entries - {p["done"] for p in lines if "done" in p})


async def test_a_dead_letter_file_that_cannot_be_written_keeps_the_exchange_queued(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(plugins=(PoisonRecords(),)) as gw:
        path = gw.reservoir.dead_letters.path
        response = await gw.chat([{"role": "user", "content": "POISON kept"}])
        trace = response.headers["x-reservoir-trace-id"]
        path.mkdir()  # not a file: appending to it fails (it is tried after 8 s)
        lane = gw.reservoir._lane()
        for _ in range(200):  # about 8 s of tries before it would be set aside
            job = next(iter(lane.jobs()), None)
            if job is not None and job.failures >= MAX_ATTEMPTS:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert [job.trace_id for job in lane.jobs()] == [trace]  # still queued
        assert _journal_open(gw.reservoir.settings.data_dir, trace)  # and journalled
        path.rmdir()
        for _ in range(100):
            await gw.reservoir.settle()  # retried now
            if not lane.jobs():
                break
            await asyncio.sleep(0.1)
        assert gw.reservoir.dead_letters.count() == 1
        (letter,) = [json.loads(line) for line in path.read_text().splitlines()]
        assert letter["trace_id"] == trace
        assert not _journal_open(gw.reservoir.settings.data_dir, trace)


def test_a_job_set_aside_after_its_scope_was_deleted_is_not_written(tmp_path: Path) -> None:
    letters = DeadLetters(tmp_path)
    data = {"scope": ["p", "i"], "trace_id": "t", "records": [], "answer": None}
    queued = now()  # the job began, then its scope was deleted
    letters.purge("p", "i")
    assert letters.add(data, ValueError("bad"), 5, queued) is False
    letters.purge("q")  # a whole partition
    assert letters.add({**data, "scope": ["q", "x"]}, ValueError("bad"), 5, queued) is False
    assert letters.count() == 0
    assert letters.add(data, ValueError("bad"), 5, now()) is True  # began after
    assert letters.count() == 1
