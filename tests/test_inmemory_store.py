"""What `InMemoryStore` adds to the contract (`test_store_contract.py`): its
records are its own, it takes writes from many threads, it refuses vectors
of another model, and the engine's maintenance runs on it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from reservoir_middleware import MessageRecord, Scope
from reservoir_middleware.cli._memory import stats_of
from reservoir_middleware.cli._transfer import import_lines
from reservoir_middleware.storage import maintenance
from reservoir_middleware.storage.inmemory import InMemoryStore
from reservoir_middleware.storage.transfer import export_lines
from reservoir_middleware.store import EmbeddingMismatch
from tests.memory_fixtures import memory_engine, messages, vectors

SCOPE = Scope("p", "i")


def record(n: int, text: str = "hello", model: str | None = None) -> MessageRecord:
    return MessageRecord(
        id=f"m{n}",
        partition="p",
        instance="i",
        role="user",
        text=text,
        seq=n,
        embedding_model=model,
    )


def test_records_read_are_copies() -> None:
    store = InMemoryStore()
    original = record(0)
    store.reservoir_store(SCOPE, [original], vectors(["hello"]))
    original.text = "changed after the write"
    (read,) = store.recent(SCOPE, 1)
    read.text = "changed by a reader"
    assert [r.text for r in store.get(SCOPE, ["m0"])] == ["hello"]


def test_writes_from_many_threads_all_land() -> None:
    store = InMemoryStore()
    (vector,) = vectors(["x"])
    errors: list[BaseException] = []

    def writer(first: int) -> None:
        try:
            for n in range(first, first + 50):
                store.reservoir_store(SCOPE, [record(n)], [vector])
                store.query(SCOPE, vector, 3)
        except BaseException as exc:  # pragma: no cover (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k * 50,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and store.count(SCOPE) == 200
    assert [r.seq for r in store.recent(SCOPE, 200)] == list(range(200))


def test_vectors_of_another_model_are_refused_by_name() -> None:
    store = InMemoryStore(embedding_model="model-a")
    with pytest.raises(EmbeddingMismatch, match=r"'model-b'.*'model-a'"):
        store.reservoir_store(SCOPE, [record(0, model="model-b")], vectors(["hello"]))
    assert store.scopes() == []
    store.reservoir_store(SCOPE, [record(0, model="model-a")], vectors(["hello"]))
    assert store.count(SCOPE) == 1


async def test_the_engine_registers_it_and_maintenance_runs_on_it(tmp_path: Path) -> None:
    store = InMemoryStore()
    engine = memory_engine(tmp_path, store=store)
    assert store.name in [name for name, _ in engine.hooks.describe()]
    await engine.warm_up()
    assert store.opened
    await engine.add("p", "i", messages())
    summary = stats_of(engine)
    assert summary["messages"] == 6 and summary["dead_letters"] == 0
    assert summary["scopes"] == [
        {"partition": "p", "instance": "i", "messages": 6, "embedding_model": store.embedding_model}
    ]
    lines = [line async for line in export_lines(store, [SCOPE], embeddings=True)]
    assert len(lines) == 6
    copy = memory_engine(tmp_path / "copy")
    report = await import_lines(copy, list(enumerate(lines, start=1)))
    assert (report.imported, report.existing, report.bad) == (6, 0, [])
    assert [r.to_dict() for r in await copy.recent("p", "i")] == [
        r.to_dict() for r in await engine.recent("p", "i")
    ]
    budget = "The quarterly budget review meeting is on Friday at 10."
    await engine.add("p", "i", [{"role": "user", "content": t} for t in (budget, budget + "!")])
    hits = await engine.search("p", "i", budget, limit=1)
    linked = await maintenance.linked(store, [hits[0].record])
    assert [r.text for r in linked] == [budget + "!" if hits[0].record.text == budget else budget]
    done = await maintenance.replay(store, engine.settings, "minilm")
    assert done == 0  # already embedded with that model
    await engine.close()
    assert not store.opened
