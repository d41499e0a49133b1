"""Writes are retried while the store is at fault, set aside only when the exchange is,
and drained before the engine closes. Real Chroma, the real embedding model."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from reservoir_middleware import Reservoir, ReservoirMiddleware
from reservoir_middleware.storage.chroma import store_down
from tests.conftest import chroma_store, make_settings, serve
from tests.upstream import Upstream


def _body(text: str) -> dict[str, object]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}


@pytest.mark.parametrize("chroma_process", ["child", "inline"])
async def test_close_right_after_traffic_stores_the_queued_writes_and_logs_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, chroma_process: str
) -> None:
    settings = make_settings(tmp_path, chroma_process=chroma_process)
    engine = Reservoir(settings)
    await engine.warm_up()
    await engine.add("p", "i", [{"role": "user", "content": "the child is up"}])
    caplog.set_level(logging.INFO, logger="reservoir")
    texts = [f"question number {n}" for n in range(8)]
    for text in texts:  # queued, not written yet (write_delay_ms)
        await engine.enrich("p", "i", _body(text))
    await engine.close()
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert problems == [], [r.getMessage() for r in problems]
    server = chroma_store(engine).server
    assert server is None or not server.alive()

    again = Reservoir(settings)
    try:
        stored = [r.text for r in await again.recent("p", "i", limit=100)]
    finally:
        await again.close()
    assert stored == ["the child is up", *texts]


async def test_a_gateway_shut_down_right_after_traffic_stores_it_all_and_logs_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path)
    texts = [f"last words {n}" for n in range(12)]
    reservoir = Reservoir(settings)
    app = ReservoirMiddleware(Upstream().app(), reservoir=reservoir)
    caplog.set_level(logging.INFO, logger="reservoir")
    async with serve(app) as url, httpx.AsyncClient(timeout=30) as http:

        def base(text: str) -> str:
            return f"{url}/v1/partition/p/instance/{text.split()[-1]}/chat/completions"

        responses = await asyncio.gather(*(http.post(base(t), json=_body(t)) for t in texts))
        assert [r.status_code for r in responses] == [200] * len(texts)
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert problems == [], [r.getMessage() for r in problems]

    again = Reservoir(settings)
    try:
        await again.warm_up()
        await again.settle()
        for text in texts:
            stored = [r.text for r in await again.recent("p", text.split()[-1], limit=100)]
            assert stored == [text, f"Echo: {text}"]
    finally:
        await again.close()


def test_store_side_errors_are_an_outage_and_bad_content_is_not(tmp_path: Path) -> None:
    """Real errors of real Chroma (in a child process: inline Chroma hangs after a
    few failed writes): a full disk (RLIMIT_FSIZE, SQLite cannot grow the file)
    raises InternalError, the store's fault; a metadata value Chroma refuses is
    the exchange's."""
    run = subprocess.run(
        [sys.executable, "-c", CHROMA_ERRORS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.stdout.split() == ["ValueError", "False", "InternalError", "True"], run.stderr
    # SQLite busy, as a connection of ours (a maintenance job) sees it
    locker = sqlite3.connect(tmp_path / "chroma.sqlite3", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError) as busy:
            sqlite3.connect(tmp_path / "chroma.sqlite3", timeout=0.1).execute("BEGIN IMMEDIATE")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert store_down(busy.value)


CHROMA_ERRORS = """
import resource, signal, sys
import chromadb
from chromadb.config import Settings
from reservoir_middleware.storage.chroma import store_down

client = chromadb.PersistentClient(path=sys.argv[1], settings=Settings(anonymized_telemetry=False))
col = client.get_or_create_collection("errors", embedding_function=None)
col.upsert(ids=["a"], embeddings=[[1.0, 2.0]], documents=["room"])
try:
    col.upsert(ids=["b"], embeddings=[[1.0, 2.0]], metadatas=[{"bad": {"not": "scalar"}}])
except Exception as exc:
    print(type(exc).__name__, store_down(exc))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
size = (__import__("pathlib").Path(sys.argv[1]) / "chroma.sqlite3").stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    col.upsert(ids=["c"], embeddings=[[1.0, 2.0]], documents=["x" * 1_000_000])
except Exception as exc:
    print(type(exc).__name__, store_down(exc))
"""
