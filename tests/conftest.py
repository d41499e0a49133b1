from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from reservoir_middleware import Reservoir, ReservoirMiddleware, ReservoirSettings
from reservoir_middleware.cli._demo import served
from reservoir_middleware.storage.chroma import ChromaStore
from tests.upstream import Upstream

# Modules whose tests share a module-scoped server that takes long to start (the
# LiteLLM proxy): pytest-xdist sends each of them to one worker as a whole, so that
# the server starts once. (xdist's own `xdist_group` mark does not group on pytest 9:
# it rewrites an attribute of the test's node id that pytest 9 no longer reads.)
SHARED_SERVER_MODULES = frozenset({"tests/test_litellm_proxy.py"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first: spread over the workers from the start, they do not
    leave one worker running the last of them alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist load`, except that a module of SHARED_SERVER_MODULES is one unit."""
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):  # type: ignore[misc]  # xdist is untyped
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in SHARED_SERVER_MODULES else nodeid

    return Scheduling(config, log)


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test reads the developer's own config file or RSV_* variables."""
    import os

    for name in list(os.environ):
        if name.startswith("RSV_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RSV_CONFIG_FILE", str(tmp_path / "no-config.toml"))
    yield


CHROMA = str(Path(sys.executable).with_name("chroma"))

serve = served  # a real uvicorn server on 127.0.0.1, in the test's event loop


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    output: str = ""


@contextlib.asynccontextmanager
async def running(
    argv: list[str], env: dict[str, str], ready_url: str, timeout: float = 60
) -> AsyncIterator[Process]:
    """A server process of ours, started for the block once `ready_url` answers 200.
    Its output goes to a file (a pipe nobody reads could fill up and stall it)."""
    with tempfile.TemporaryFile() as log:
        popen = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: ASYNC220
        process = Process(popen)
        ready = False
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                for _ in range(int(timeout * 10)):
                    if popen.poll() is not None:
                        break
                    with contextlib.suppress(httpx.TransportError):
                        ready = (await http.get(ready_url)).status_code == 200
                    if ready:
                        break
                    await asyncio.sleep(0.1)
            if ready:
                yield process
        finally:
            if popen.poll() is None:
                popen.terminate()
            await asyncio.to_thread(popen.wait, 30)
            log.seek(0)
            process.output = log.read().decode(errors="replace")
        if not ready:
            raise RuntimeError(f"{argv} did not serve {ready_url}:\n{process.output[-3000:]}")


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Chroma server (`chroma run`) on loopback, shared by the session:
    tests using it pick their own partition names."""
    port = free_port()
    path = tmp_path_factory.mktemp("chroma-server")
    log = (path / "server.log").open("wb")
    process = subprocess.Popen(
        [CHROMA, "run", "--path", str(path / "data"), "--port", str(port), "--host", "127.0.0.1"],
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/api/v2/heartbeat", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail("chroma run did not start: " + (path / "server.log").read_text()[-2000:])
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def chroma_store(reservoir: Reservoir) -> ChromaStore:
    """The engine's store as the Chroma implementation, for tests about Chroma's parts
    (the engine is typed against the `Storage` protocol)."""
    return cast(ChromaStore, reservoir.store)


def make_settings(tmp_path: Path, **overrides: Any) -> ReservoirSettings:
    """Settings on a data directory of the test's own, with Chroma inline.

    Starting the Chroma child (the default) takes seconds: a Python process that
    imports Chroma and loads the embedding model, most of such a test's time.
    The tests about the child ask for it (`chroma_process="child"`, or settings
    of their own), and `reservoir serve` started as a command keeps its default."""
    defaults: dict[str, Any] = {"data_dir": tmp_path / "memory", "chroma_process": "inline"}
    return ReservoirSettings(**{**defaults, **overrides})


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
