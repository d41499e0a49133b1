from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp

from reservoir_middleware import Reservoir, ReservoirMiddleware, ReservoirSettings
from tests.upstream import Upstream


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test reads the developer's own config file or RSV_* variables."""
    import os

    for name in list(os.environ):
        if name.startswith("RSV_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RSV_CONFIG_FILE", str(tmp_path / "no-config.toml"))
    yield


@contextlib.asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[str]:
    """A real uvicorn server on 127.0.0.1 (free port), in this event loop."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if not server.started:
        task.cancel()
        raise RuntimeError("uvicorn did not start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


def make_settings(tmp_path: Path, **overrides: Any) -> ReservoirSettings:
    return ReservoirSettings(**{"data_dir": tmp_path / "memory", **overrides})


@dataclass
class Gateway:
    url: str
    upstream: Upstream
    reservoir: Reservoir
    http: httpx.AsyncClient

    def base(self, partition: str = "p", instance: str = "i") -> str:
        return f"{self.url}/v1/partition/{partition}/instance/{instance}"

    async def chat(
        self,
        messages: list[dict[str, Any]],
        partition: str = "p",
        instance: str = "i",
        **extra: Any,
    ) -> httpx.Response:
        body = {"model": "gpt-4o", "messages": messages, **extra}
        response = await self.http.post(
            f"{self.base(partition, instance)}/chat/completions", json=body
        )
        await self.reservoir.settle()
        return response

    async def stored(self, partition: str = "p", instance: str = "i") -> list[Any]:
        await self.reservoir.settle()
        return await self.reservoir.recent(partition, instance, limit=1000)


GatewayFactory = Callable[..., contextlib.AbstractAsyncContextManager[Gateway]]


@pytest.fixture
def gateway_factory(tmp_path: Path) -> GatewayFactory:
    @contextlib.asynccontextmanager
    async def factory(
        settings: ReservoirSettings | None = None,
        plugins: tuple[object, ...] = (),
        **overrides: Any,
    ) -> AsyncIterator[Gateway]:
        upstream = Upstream()
        reservoir = Reservoir(settings or make_settings(tmp_path, **overrides), plugins)
        app = ReservoirMiddleware(upstream.app(), reservoir=reservoir)
        async with serve(app) as url, httpx.AsyncClient(timeout=30) as client:
            gateway = Gateway(url, upstream, reservoir, client)
            yield gateway
            await reservoir.settle(timeout=10)

    return factory


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> AsyncIterator[Gateway]:
    async with gateway_factory() as gw:
        yield gw
