"""A delete against what runs beside it: a journal being appended to, another live
process's journal file, a read begun before it, a streamed exchange in flight."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from reservoir_middleware import Reservoir, hookimpl
from reservoir_middleware.context import RetrievalQuery
from reservoir_middleware.memory._journal import Journal, JournalEntry, _read_entries
from reservoir_middleware.store import MemoryStore
from tests.conftest import GatewayFactory, make_settings
from tests.test_deletion import files_holding
from tests.upstream import Reply

pytestmark = pytest.mark.timeout(180)


def read_entries(path: Path) -> list[JournalEntry]:
    """What a replay of the file would read now."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read_entries(path, fd)
    finally:
        os.close(fd)


def exchange(partition: str, text: str, began: float | None = None) -> dict[str, Any]:
    record = {"id": secrets.token_hex(8), "partition": partition, "instance": "i"}
    return {
        "scope": [partition, "i"],
        "began": time.time() if began is None else began,
        "trace_id": secrets.token_hex(8),
        "records": [{**record, "role": "user", "text": text}],
        "answer": None,
    }


def test_append_and_done_do_not_wait_for_a_purge(tmp_path: Path) -> None:
    """The journal lock (taken by `append` and `done` on the event loop) is not held
    while a purge reads, filters and writes a file: requests never wait for a delete."""
    journal = Journal(tmp_path / "journal")
    padding = "z" * 1000
    for n in range(1500):  # 1.5 MB of a scope being deleted
        journal.append(exchange("gone", f"gone {n} {padding}"))
    kept = journal.append(exchange("stays", "kept before"))
    purging, go = threading.Event(), threading.Event()

    def drop(payload: dict[str, Any]) -> bool:
        purging.set()  # the purge has read the file and is filtering it
        go.wait(60)
        return bool(payload["scope"][0] == "gone")

    removed: list[int] = []
    purge = threading.Thread(target=lambda: removed.append(journal.purge(drop)))
    purge.start()
    assert purging.wait(30)
    written = threading.Event()
    later: list[Any] = []

    def request() -> None:
        later.append(journal.append(exchange("stays", "appended during the purge")))
        journal.done(kept)
        written.set()

    threading.Thread(target=request, daemon=True).start()
    went_through = written.wait(10)
    go.set()
    purge.join(60)
    assert went_through, "append/done waited for the purge"
    assert removed == [1500]

    assert journal._current is not None
    path = journal._current.path
    raw = path.read_bytes()
    assert b"gone" not in raw
    entries = read_entries(path)  # what a crash now would replay
    assert [e.data["records"][0]["text"] for e in entries] == ["appended during the purge"]
    # the file that took the name is locked by its owner: nobody can adopt it
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    journal.append(exchange("stays", "after the purge"))  # goes to the new file
    assert [e.data["records"][0]["text"] for e in read_entries(path)][-1] == "after the purge"


async def test_a_delete_leaves_a_live_process_journal_alone_and_replay_drops_it(
    tmp_path: Path,
) -> None:
    """Another process's live journal file is not rewritten by a delete (it keeps
    appending to it); when that process dies, the replay leaves out what began before
    the delete, stores what began after it, and the deleted text leaves the disk."""
    marker = f"zebra-{secrets.token_hex(6)}"
    settings = make_settings(tmp_path, chroma_process="inline")
    other = Journal(settings.data_dir / "journal")  # a live worker's journal, locked
    other.append(exchange("gone", f"before the delete: {marker}"))
    other.append(exchange("stays", "a fact of another scope"))
    assert other._current is not None
    path = other._current.path
    before = (os.stat(path).st_ino, path.read_bytes())

    engine = Reservoir(settings)
    try:
        await engine.add("gone", "i", [{"role": "user", "content": f"stored: {marker}"}])
        assert await engine.delete("gone", "i") == 1
    finally:
        await engine.close()
    assert (os.stat(path).st_ino, path.read_bytes()) == before  # untouched
    other.append(exchange("gone", "said after the delete"))
    os.close(other._current.fd)  # the worker is SIGKILLed: its lock goes with it

    again = Reservoir(settings)
    try:
        await again.warm_up()
        await again.settle()
        assert [r.text for r in await again.recent("gone", "i")] == ["said after the delete"]
        assert [r.text for r in await again.recent("stays", "i")] == ["a fact of another scope"]
    finally:
        await again.close()
    assert files_holding(settings.data_dir, marker.encode()) == []


class PausedRead:
    """A retrieval plugin that holds one request's memory read until told to go on
    (the built-in reads of that request run meanwhile, before the delete)."""

    name = "paused-read"

    def __init__(self) -> None:
        self.armed = False
        self.reached = asyncio.Event()
        self.go = asyncio.Event()

    @hookimpl
    async def reservoir_retrieve(self, query: RetrievalQuery, store: MemoryStore) -> None:
        if self.armed:
            self.armed = False
            self.reached.set()
            await asyncio.wait_for(self.go.wait(), 60)


async def test_a_read_begun_before_a_delete_does_not_inject_deleted_messages(
    gateway_factory: GatewayFactory,
) -> None:
    marker = f"zebra-{secrets.token_hex(6)}"
    pause = PausedRead()
    async with gateway_factory(plugins=(pause,), chroma_process="inline") as gw:
        first = await gw.chat([{"role": "user", "content": f"my code word is {marker}"}])
        assert first.status_code == 200
        assert marker in json.dumps([r.to_dict() for r in await gw.stored()])
        pause.armed = True
        asking = asyncio.ensure_future(
            gw.chat([{"role": "user", "content": "what is my code word?"}])
        )
        await asyncio.wait_for(pause.reached.wait(), 60)  # its recent window is read
        assert await gw.reservoir.delete("p", "i") == 1
        pause.go.set()
        assert (await asyncio.wait_for(asking, 60)).status_code == 200
        assert marker not in gw.upstream.received[-1].text  # not injected after the delete
        again = await gw.chat([{"role": "user", "content": "and now?"}])
        assert again.status_code == 200
        assert marker not in gw.upstream.received[-1].text
        assert marker not in json.dumps([r.to_dict() for r in await gw.stored()])


ADMIN = "admin-key-for-deletes"


async def test_an_exchange_in_flight_during_a_delete_is_not_stored(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """A stream is in flight, `DELETE …/memory` answers, the stream ends: the scope
    holds neither the question nor the answer, not even after a restart."""
    marker = f"zebra-{secrets.token_hex(6)}"
    settings = make_settings(tmp_path, chroma_process="inline", admin_key=ADMIN)
    gate = asyncio.Event()
    async with gateway_factory(settings) as gw:
        base = gw.base("p", "i")
        said = await gw.chat([{"role": "user", "content": f"remember {marker}-one"}])
        assert said.status_code == 200
        gw.upstream.replies.append(Reply(gate=gate))
        body = {
            "model": "gpt-4o",
            "stream": True,
            "messages": [{"role": "user", "content": f"and {marker}-two"}],
        }
        async with (
            httpx.AsyncClient(timeout=60) as http,
            http.stream("POST", f"{base}/chat/completions", json=body) as stream,
        ):
            chunks = stream.aiter_bytes()
            assert b"data:" in await anext(chunks)  # the exchange is under way
            deleted = await http.delete(
                f"{base}/memory", headers={"Authorization": f"Bearer {ADMIN}"}
            )
            assert deleted.json() == {"deleted": 1}
            gate.set()
            rest = b"".join([chunk async for chunk in chunks])
        assert b"[DONE]" in rest
        await gw.reservoir.settle()
        await asyncio.sleep(0.3)  # past the write delay: anything queued has been written
        await gw.reservoir.settle()
        assert await gw.stored() == []
        after = await gw.chat([{"role": "user", "content": "a new beginning"}])
        assert after.status_code == 200
        assert marker not in gw.upstream.received[-1].text
        texts = [r.text for r in await gw.stored()]
        assert texts == ["a new beginning", "Echo: a new beginning"]
    assert files_holding(settings.data_dir, marker.encode()) == []

    again = Reservoir(settings)  # a restart replays nothing of it
    try:
        await again.warm_up()
        await again.settle()
        texts = [r.text for r in await again.recent("p", "i")]
        assert texts == ["a new beginning", "Echo: a new beginning"]
    finally:
        await again.close()


def test_deletion_records_are_compacted_once_no_journal_can_be_older(tmp_path: Path) -> None:
    from reservoir_middleware.memory._deletions import KEEP_S, Deletions

    old = time.time() - 2 * KEEP_S
    path = tmp_path / "deletions.jsonl"
    lines = [
        json.dumps({"id": str(n), "time": old, "partition": f"p{n}", "instance": "i"})
        for n in range(4000)  # past the size that starts a compaction
    ]
    path.write_text("\n".join(lines) + "\n")
    journal = tmp_path / "journal"
    journal.mkdir()
    older = journal / f"host-1-t{int((old - 10) * 1000)}-0123abcd.jsonl"  # a dead worker's
    older.write_bytes(b"")
    Deletions(tmp_path).record("fresh", "i")
    assert len(path.read_bytes().splitlines()) == 4001  # that file may hold deleted exchanges
    known = Deletions(tmp_path)
    known.refresh()
    assert known.covers("p7", "i", old - 1) and not known.covers("p7", "i", old + 1)

    older.unlink()
    Deletions(tmp_path).record("fresher", "i")
    learned = Deletions(tmp_path).refresh()
    assert [d.partition for d in learned] == ["fresh", "fresher"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"


async def test_a_partition_delete_covers_exchanges_in_flight_and_queued(tmp_path: Path) -> None:
    """Deleting a whole partition also covers instances the store does not have yet:
    an exchange in flight and a queued write of them are not stored after it."""
    from reservoir_middleware.records import Answer

    marker = f"zebra-{secrets.token_hex(6)}"
    settings = make_settings(tmp_path, chroma_process="inline", write_delay_ms=60_000)

    def chat(text: str) -> dict[str, Any]:
        return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}

    engine = Reservoir(settings)
    try:
        await engine.add("acme", "a", [{"role": "user", "content": f"stored {marker}"}])
        flying = await engine.enrich("acme", "b", chat(f"in flight {marker}"), store="with_answer")
        await engine.enrich("acme", "c", chat(f"queued {marker}"), store=True)
        assert await engine.delete("acme") == 1  # the one instance in the store
        engine.record_answer(flying, Answer(content=f"answer {marker}", finish_reason="stop"))
        await engine.settle()
        await engine.enrich("acme", "b", chat("said after the delete"), store=True)
        await engine.settle()
        stored = {i: [r.text for r in await engine.recent("acme", i)] for i in "abc"}
        assert stored == {"a": [], "b": ["said after the delete"], "c": []}
    finally:
        await engine.close()
    assert files_holding(settings.data_dir, marker.encode()) == []
