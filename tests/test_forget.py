"""Forgetting one message: no byte of its text under the data directory, never
returned again, the scope's other messages untouched; also while an exchange
that holds it is in flight, through the admin endpoint and the CLI."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from reservoir_middleware import Reservoir
from reservoir_middleware.records import Answer
from reservoir_middleware.storage.inmemory import InMemoryStore
from tests.conftest import GatewayFactory, make_settings
from tests.test_cli_memory import FACTS as CLI_FACTS
from tests.test_cli_memory import env as env  # (the fixture: embedded, server)
from tests.test_cli_memory import ingest_facts, partition, run
from tests.test_deletion import files_holding
from tests.test_passages import LONG_ANSWER

FACTS = [
    "I adopted a rescue greyhound named Comet.",
    "My sister Ines teaches chemistry in Porto.",
    "The sourdough starter needs feeding every twelve hours.",
]


def secret_text(marker: str) -> str:
    """A long message (it has passages) holding a code word."""
    return f"My locker code word is {marker}. {LONG_ANSWER}"


async def fill(engine: Reservoir, partition: str, marker: str) -> str:
    """The facts around a secret; returns the secret's id as keyword search gives it."""
    messages = [{"role": "user", "content": text} for text in FACTS]
    messages.insert(1, {"role": "user", "content": secret_text(marker)})
    await engine.add(partition, "i", messages)
    (hit,) = await engine.search(partition, "i", marker, semantic=False, limit=1)
    assert marker in hit.record.text
    return hit.record.id


async def check_forgotten(engine: Reservoir, partition: str, marker: str) -> None:
    """Never returned again; the others all there, found by keyword and by meaning."""
    recent = await engine.recent(partition, "i", limit=100)
    assert [r.text for r in recent] == FACTS
    for semantic in (True, False):
        hits = await engine.search(partition, "i", f"locker code word {marker}", semantic=semantic)
        assert all(marker not in h.record.text for h in hits)
    for fact, word in zip(FACTS, ("greyhound", "chemistry", "sourdough"), strict=True):
        (hit,) = await engine.search(partition, "i", word, semantic=False, limit=1)
        assert hit.record.text == fact
    (near,) = await engine.search(partition, "i", "Where does my sister work?", limit=1)
    assert near.record.text == FACTS[1]
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "my locker code word?"}]}
    enriched = await engine.enrich(partition, "i", body, store=False)
    assert marker not in str(enriched.body)


@pytest.mark.parametrize("chroma_process", ["child", "inline"])
async def test_a_forgotten_message_is_nowhere_under_the_data_dir(
    tmp_path: Path, chroma_process: str
) -> None:
    marker = f"zebra{secrets.token_hex(6)}"
    settings = make_settings(tmp_path, chroma_process=chroma_process)
    engine = Reservoir(settings)
    try:
        await engine.warm_up()
        message_id = await fill(engine, "p", marker)
        # what the request path keeps in memory: the scope's copy, its BM25 index
        await engine.preload("p", "i")
        assert files_holding(settings.data_dir, marker.encode())  # it was on disk
        forgotten = await engine.forget("p", "i", message_id)
        assert forgotten is not None and forgotten.id == message_id
        assert marker in forgotten.text
        assert files_holding(settings.data_dir, marker.encode()) == []
        await check_forgotten(engine, "p", marker)
        assert await engine.forget("p", "i", message_id) is None  # gone: unknown now
        assert await engine.forget("p", "nobody", message_id) is None
    finally:
        await engine.close()
    assert files_holding(settings.data_dir, marker.encode()) == []
    again = Reservoir(settings)  # a restart replays the journals
    try:
        await again.warm_up()
        await again.settle()
        await check_forgotten(again, "p", marker)
    finally:
        await again.close()
    assert files_holding(settings.data_dir, marker.encode()) == []


async def test_forget_on_a_chroma_server(tmp_path: Path, chroma_server: str) -> None:
    marker = f"zebra{secrets.token_hex(6)}"
    partition = f"fg{tmp_path.name[-10:]}".replace("-", "")  # the server is shared
    engine = Reservoir(make_settings(tmp_path, chroma_url=chroma_server))
    try:
        message_id = await fill(engine, partition, marker)
        assert await engine.forget(partition, "i", message_id) is not None
        await check_forgotten(engine, partition, marker)
    finally:
        await engine.close()


async def test_forget_in_memory_store(tmp_path: Path) -> None:
    marker = f"zebra{secrets.token_hex(6)}"
    engine = Reservoir(make_settings(tmp_path), store=InMemoryStore())
    try:
        message_id = await fill(engine, "p", marker)
        assert await engine.forget("p", "i", message_id) is not None
        await check_forgotten(engine, "p", marker)
    finally:
        await engine.close()


async def test_an_exchange_in_flight_does_not_store_it_again(tmp_path: Path) -> None:
    """A request that re-sends the message began before the forget: its write (and
    its journal entry) leave the message out; the exchange's new messages are kept."""
    marker = f"zebra{secrets.token_hex(6)}"
    settings = make_settings(tmp_path)
    engine = Reservoir(settings)
    try:
        first = [{"role": "user", "content": f"Remember the code word {marker}."}]
        await engine.add("p", "i", [*first, {"role": "assistant", "content": "Noted."}])
        (hit,) = await engine.search("p", "i", marker, semantic=False, limit=1)
        body: dict[str, Any] = {
            "model": "gpt-4o",
            "messages": [
                *first,
                {"role": "assistant", "content": "Noted."},
                {"role": "user", "content": "What is the capital of Peru?"},
            ],
        }
        enriched = await engine.enrich("p", "i", body, store="with_answer")
        assert await engine.forget("p", "i", hit.record.id) is not None
        stored = engine.record_answer(enriched, Answer(content="Lima."))
        await engine.settle()
        await stored
        texts = [r.text for r in await engine.recent("p", "i", limit=100)]
        assert texts == ["Noted.", "What is the capital of Peru?", "Lima."]
        assert files_holding(settings.data_dir, marker.encode()) == []
    finally:
        await engine.close()
    assert files_holding(settings.data_dir, marker.encode()) == []


ADMIN = {"Authorization": "Bearer adm-secret-1"}


async def test_the_admin_endpoint_forgets_one_message(gateway_factory: GatewayFactory) -> None:
    async with gateway_factory(admin_key="adm-secret-1") as gw:
        for fact in FACTS:
            await gw.chat([{"role": "user", "content": fact}])
        base = gw.base() + "/memory"
        found = await gw.http.get(base + "/search", params={"term": "greyhound"}, headers=ADMIN)
        target = found.json()["results"][0]
        assert target["text"] == FACTS[0]
        refused = await gw.http.delete(f"{base}/messages/{target['id']}")
        assert refused.status_code == 401

        gone = await gw.http.delete(f"{base}/messages/{target['id']}", headers=ADMIN)
        assert gone.status_code == 200
        assert gone.json()["forgotten"]["id"] == target["id"]
        assert gone.json()["forgotten"]["text"] == FACTS[0]
        again = await gw.http.delete(f"{base}/messages/{target['id']}", headers=ADMIN)
        assert again.status_code == 404
        assert target["id"] in again.json()["error"]["message"]

        recent = await gw.http.get(base + "/recent?limit=100", headers=ADMIN)
        texts = [m["text"] for m in recent.json()["messages"]]
        assert FACTS[0] not in texts and f"Echo: {FACTS[0]}" in texts and FACTS[2] in texts
        found = await gw.http.get(base + "/search", params={"term": "greyhound"}, headers=ADMIN)
        (echo,) = found.json()["results"]
        assert echo["text"] == f"Echo: {FACTS[0]}"  # (the stand-in model repeats it)
        gone = await gw.http.delete(f"{base}/messages/{echo['id']}", headers=ADMIN)
        assert gone.status_code == 200
        found = await gw.http.get(base + "/search", params={"term": "greyhound"}, headers=ADMIN)
        assert found.json()["results"] == []
        assert files_holding(gw.reservoir.settings.data_dir, b"rescue greyhound named") == []
        recent = await gw.http.get(base + "/recent?limit=100", headers=ADMIN)
        assert [m["text"] for m in recent.json()["messages"]] == [
            text for fact in FACTS[1:] for text in (fact, f"Echo: {fact}")
        ]


def test_the_cli_forgets_one_message(env: dict[str, str]) -> None:
    """`reservoir forget ID` with the id `reservoir search --json` gives, on embedded
    Chroma and on a `chroma run` server."""
    ingest_facts(env)
    p = partition(env)
    found = run(env, "search", "rescue greyhound", "-p", p, "-i", "alice", "--json").stdout
    target = json.loads(found.splitlines()[0])
    assert target["text"] == CLI_FACTS[0][1]
    done = run(env, "forget", target["id"], "-p", p, "-i", "alice")
    assert done.returncode == 0, done.stderr
    assert "forgot 1 message" in done.stdout and CLI_FACTS[0][1] in done.stdout
    again = run(env, "forget", target["id"], "-p", p, "-i", "alice")
    assert again.returncode == 1 and f"holds no message {target['id']}" in again.stderr
    view = run(env, "view", "10", "-p", p, "-i", "alice").stdout.splitlines()
    assert len(view) == 3 and not any(CLI_FACTS[0][1] in line for line in view)
    left = run(env, "search", "greyhound", "-p", p, "-i", "alice", "--json").stdout
    assert [json.loads(line)["text"] for line in left.splitlines()] == [CLI_FACTS[1][1]]
    if "RSV_CHROMA_URL" not in env:
        assert files_holding(Path(env["RSV_DATA_DIR"]), CLI_FACTS[0][1].encode()) == []


async def test_another_process_on_a_chroma_server_does_not_store_it_again(
    tmp_path: Path, chroma_server: str
) -> None:
    """Two engines (as two gateway workers) share a data directory and a Chroma
    server: one forgets a message that an exchange in flight at the other re-sends."""
    marker = f"zebra{secrets.token_hex(6)}"
    partition = f"fw{tmp_path.name[-10:]}".replace("-", "")
    settings = make_settings(tmp_path, chroma_url=chroma_server)
    worker, admin = Reservoir(settings), Reservoir(settings)
    try:
        first = [
            {"role": "user", "content": f"Remember the code word {marker}."},
            {"role": "assistant", "content": "Noted."},
        ]
        await worker.add(partition, "i", first)
        body = {
            "model": "gpt-4o",
            "messages": [*first, {"role": "user", "content": "What is the capital of Peru?"}],
        }
        enriched = await worker.enrich(partition, "i", body, store="with_answer")
        (hit,) = await admin.search(partition, "i", marker, semantic=False, limit=1)
        assert await admin.forget(partition, "i", hit.record.id) is not None
        stored = worker.record_answer(enriched, Answer(content="Lima."))
        await worker.settle()
        await stored
        for engine in (worker, admin):
            texts = [r.text for r in await engine.recent(partition, "i", limit=100)]
            assert texts == ["Noted.", "What is the capital of Peru?", "Lima."]
            hits = await engine.search(partition, "i", marker, semantic=False)
            assert all(marker not in h.record.text for h in hits)
        assert files_holding(settings.data_dir, marker.encode()) == []  # (its journal)
    finally:
        await worker.close()
        await admin.close()
