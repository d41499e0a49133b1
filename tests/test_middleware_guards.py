"""The middleware added twice (two `add_middleware` calls, a shared app factory):
the outer copy enriches and records, the inner one passes everything through;
and a request's failures are logged with its trace id."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from reservoir_middleware import Reservoir, ReservoirMiddleware, ReservoirSettings, hookimpl
from reservoir_middleware.context import RetrievalQuery
from reservoir_middleware.store import MemoryStore
from tests.blocks import block_of, memory_of
from tests.blocks import texts as line_texts
from tests.conftest import GatewayFactory, serve
from tests.upstream import Upstream

FACT = "My sister Ada lives in Lisbon and keeps bees."


class Retrievals:
    """Counts the retrievals of the memory (one per enriched request)."""

    def __init__(self) -> None:
        self.count = 0

    @hookimpl
    def reservoir_retrieve(self, query: RetrievalQuery, store: MemoryStore) -> None:
        self.count += 1


async def test_added_twice_it_enriches_and_stores_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="reservoir")
    settings = ReservoirSettings(data_dir=tmp_path / "memory")
    upstream = Upstream()
    app = upstream.app()
    retrievals = Retrievals()
    app.add_middleware(ReservoirMiddleware, settings=settings, plugins=[retrievals])
    app.add_middleware(ReservoirMiddleware, settings=settings, plugins=[retrievals])
    async with serve(app) as url, httpx.AsyncClient(timeout=60) as http:
        chat = f"{url}/v1/partition/p/instance/i/chat/completions"
        first = await http.post(
            chat, json={"model": "gpt-4o", "messages": [{"role": "user", "content": FACT}]}
        )
        assert first.status_code == 200
        question = {"role": "user", "content": "Where does my sister live?"}
        second = await http.post(chat, json={"model": "gpt-4o", "messages": [question]})
        assert second.status_code == 200
        assert second.headers.get("x-reservoir-status") != "degraded"
        assert len(second.headers.get_list("x-reservoir-trace-id")) == 1
    assert retrievals.count == 2  # one per request, not one per copy
    sent = upstream.received[-1].messages
    shown = line_texts(memory_of(sent))
    assert shown.count(FACT) == 1, shown  # recalled, once
    assert sum(bool(block_of(m)) for m in sent) == 1  # one block, not one per copy
    # stored once each: the question, the fact and the two answers
    reader = Reservoir(ReservoirSettings(data_dir=tmp_path / "memory", chroma_process="inline"))
    texts = [r.text for r in await reader.recent("p", "i", limit=50)]
    assert texts.count(FACT) == 1 and texts.count(question["content"]) == 1, texts
    assert len(texts) == 4, texts
    problems = [r.getMessage() for r in caplog.records if r.name == "reservoir"]
    assert problems == []


class FailingRetrieval:
    @hookimpl
    def reservoir_retrieve(self, query: RetrievalQuery, store: MemoryStore) -> None:
        raise RuntimeError("retrieval plugin broke")


async def test_a_failure_is_logged_with_the_trace_id_the_client_got(
    gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="reservoir")
    async with gateway_factory(plugins=(FailingRetrieval(),)) as gw:
        response = await gw.chat([{"role": "user", "content": "hello there"}])
    assert response.status_code == 200
    assert response.headers["x-reservoir-status"] == "degraded"
    trace = response.headers["x-reservoir-trace-id"]
    failures = [
        r.getMessage() for r in caplog.records if "retrieval plugin broke" in r.getMessage()
    ]
    assert failures and all(f"[trace {trace}]" in f for f in failures), failures
