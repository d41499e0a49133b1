"""`reservoir serve` under `"model": "auto"` when the provider's 200 answer is no JSON
answer at all: the error envelope (never a 500 text/plain), the upstream closed."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from reservoir_middleware.gateway.app import create_app
from tests.conftest import make_settings, serve


class Provider:
    """A local provider stand-in: lists one model, answers chats with `body` (200 JSON);
    `stall`: sends part of the body, then waits for the gateway to hang up."""

    def __init__(self) -> None:
        self.body = b""
        self.stall = False
        self.hung_up = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"application/json")]
        if scope["path"].endswith("/models"):
            body = json.dumps({"object": "list", "data": [{"id": "local-model"}]}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if not self.stall:
            await send({"type": "http.response.body", "body": self.body})
            return
        await send({"type": "http.response.body", "body": b'{"id": "x", ', "more_body": True})
        with contextlib.suppress(TimeoutError):
            message = await asyncio.wait_for(receive(), 20)
            if message["type"] == "http.disconnect":
                self.hung_up.set()


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[str, Provider]]:
    provider = Provider()
    async with serve(provider) as provider_url:
        settings = make_settings(
            tmp_path,
            providers={"local": {"base_url": provider_url + "/v1"}},
            auto_models=["local:*"],
            upstream_timeout_s=1.0,
        )
        async with serve(create_app(settings)) as url:
            yield url, provider


@pytest.mark.parametrize("body", [b"", b"<html>502 Bad Gateway</html>", b'{"choices": ['])
async def test_auto_with_a_200_that_is_not_json_gets_the_error_envelope(
    tmp_path: Path, body: bytes
) -> None:
    async with gateway(tmp_path) as (url, provider), httpx.AsyncClient(timeout=30) as http:
        provider.body = body
        chat = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
        response = await http.post(f"{url}/v1/chat/completions", json=chat)
        assert response.status_code == 502
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["type"] == "backend_error"
        assert "local answered 200 with" in error["message"]
        # the gateway still serves the next request on the same upstream connection pool
        provider.body = json.dumps({"choices": [], "model": "local-model"}).encode()
        response = await http.post(f"{url}/v1/chat/completions", json=chat)
        assert response.status_code == 200
        assert response.json()["model"] == "auto (selected: local:local-model)"


async def test_auto_with_a_body_that_stalls_times_out_and_closes_the_upstream(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path) as (url, provider), httpx.AsyncClient(timeout=30) as http:
        provider.stall = True
        chat = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
        response = await http.post(f"{url}/v1/chat/completions", json=chat)
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "backend_timeout"
        # the gateway let go of the upstream response: the provider sees it hang up
        await asyncio.wait_for(provider.hung_up.wait(), 10)
