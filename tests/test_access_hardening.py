"""Keys and paths an attacker controls: the admin key, our own headers, encoded paths,
non-ASCII keys. Real uvicorn servers on 127.0.0.1, the real middleware, `reservoir serve`
and the FastAPI example; only the model is the stand-in, which records what it was sent."""

from __future__ import annotations

import contextlib
import json
import runpy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from fastapi import FastAPI, Request, WebSocket
from openai import AsyncOpenAI

from reservoir_middleware import ReservoirMiddleware
from reservoir_middleware.gateway.app import create_app
from tests.conftest import GatewayFactory, make_settings, serve
from tests.upstream import Upstream

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "adm-7c1e-secret"
TEAM_KEY = "sk-team-4b2a"
KEYS = {TEAM_KEY: ["team"]}
OUR_HEADERS = {
    "X-Reservoir-Key": TEAM_KEY,
    "X-Reservoir-Admin-Key": ADMIN_KEY,
    "X-Reservoir-Partition": "team",
    "X-Reservoir-Instance": "bob",
    "X-Reservoir-Anything": "ours",
}


def chat_body(text: str = "hello") -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}


def bearer(key: str | bytes) -> dict[str, Any]:
    """A header of raw bytes (httpx sends them as they are; its types want str or bytes keys)."""
    raw = key if isinstance(key, bytes) else key.encode()
    return {"Authorization": b"Bearer " + raw}


def leaked(upstream: Upstream) -> list[tuple[str, str, str]]:
    """Every header the model was sent that carries one of our keys or is one of ours."""
    found = [
        (received.path, name, value)
        for received in upstream.received
        for name, value in received.headers.items()
        if name.startswith("x-reservoir-") or ADMIN_KEY in value or TEAM_KEY in value
    ]
    if upstream.model_list_auth is not None and ADMIN_KEY in upstream.model_list_auth:
        found.append(("/v1/models", "authorization", upstream.model_list_auth))
    return found


@contextlib.asynccontextmanager
async def serve_stack(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[str, Upstream]]:
    """`reservoir serve` (create_app) in front of the stand-in, as its OpenAI provider."""
    upstream = Upstream()
    upstream.model_ids = ["gpt-4o", "text-embedding-3-small"]
    async with serve(upstream.app()) as model_url:
        settings = make_settings(tmp_path, openai_base_url=f"{model_url}/v1", **overrides)
        async with serve(create_app(settings)) as url:
            yield url, upstream


@pytest.fixture
def provider_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider")
    return "Bearer sk-provider"


# -- item 4: the admin key opens the admin endpoints only -----------------------------------


async def test_reservoir_serve_never_sends_the_admin_key_upstream(
    tmp_path: Path, provider_key: str
) -> None:
    async with (
        serve_stack(tmp_path, admin_key=ADMIN_KEY) as (url, model),
        httpx.AsyncClient(timeout=30) as http,
    ):
        scoped = f"{url}/v1/partition/p/instance/i"
        calls = [
            (f"{url}/v1/chat/completions", chat_body()),
            (f"{scoped}/chat/completions", chat_body()),
            (f"{url}/v1/completions", {"model": "gpt-4o", "prompt": "x"}),
            (f"{url}/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}),
        ]
        for target, body in calls:
            for headers in (bearer(ADMIN_KEY), {"X-Reservoir-Admin-Key": ADMIN_KEY}):
                response = await http.post(target, json=body, headers=headers)
                assert response.status_code == 200, (target, response.text)
                assert model.received[-1].headers["authorization"] == provider_key
        models = await http.get(f"{url}/v1/models", headers=bearer(ADMIN_KEY))
        assert models.status_code == 200
        # the admin key still opens the admin endpoints
        recent = await http.get(f"{scoped}/memory/recent", headers=bearer(ADMIN_KEY))
        assert recent.status_code == 200 and recent.json()["messages"]
        assert len(model.received) == 8
        assert model.model_list_calls >= 1
        assert leaked(model) == []


async def test_the_admin_key_does_not_pass_the_api_keys_of_reservoir_serve(
    tmp_path: Path, provider_key: str
) -> None:
    async with (
        serve_stack(tmp_path, api_keys=["gw-key"], admin_key=ADMIN_KEY) as (url, model),
        httpx.AsyncClient(timeout=30) as http,
    ):
        for headers in (bearer(ADMIN_KEY), {"X-Reservoir-Admin-Key": ADMIN_KEY}):
            chat = await http.post(f"{url}/v1/chat/completions", json=chat_body(), headers=headers)
            assert chat.status_code == 401, chat.text
            assert chat.json()["error"]["type"] == "unauthorized"
            models = await http.get(f"{url}/v1/models", headers=headers)
            assert models.status_code == 401
            embeddings = await http.post(
                f"{url}/v1/embeddings", json={"model": "gpt-4o", "input": "x"}, headers=headers
            )
            assert embeddings.status_code == 401
        assert model.received == []
        admin = f"{url}/v1/partition/p/instance/i/memory/recent"
        assert (await http.get(admin, headers=bearer(ADMIN_KEY))).status_code == 200
        assert (await http.get(admin, headers=bearer("gw-key"))).status_code == 401


async def test_the_admin_key_does_not_pass_the_rate_limit(
    tmp_path: Path, provider_key: str
) -> None:
    async with (
        serve_stack(tmp_path, rate_limit_per_minute=2, admin_key=ADMIN_KEY) as (url, model),
        httpx.AsyncClient(timeout=30) as http,
    ):
        codes = []
        for _ in range(3):
            response = await http.post(
                f"{url}/v1/chat/completions", json=chat_body(), headers=bearer(ADMIN_KEY)
            )
            codes.append(response.status_code)
        assert codes == [200, 200, 429]
        assert len(model.received) == 2
        # the admin endpoints themselves are not limited for the admin
        admin = f"{url}/v1/partition/p/instance/i/memory/recent"
        for _ in range(3):
            assert (await http.get(admin, headers=bearer(ADMIN_KEY))).status_code == 200


async def test_our_headers_and_the_admin_key_never_reach_the_app(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(partition_keys=KEYS, admin_key=ADMIN_KEY) as gw:
        sent = {**OUR_HEADERS, "Authorization": "Bearer sk-client"}
        # a chat route with the partition from the headers: read, then removed
        chat = await gw.http.post(f"{gw.url}/v1/chat/completions", json=chat_body(), headers=sent)
        assert chat.status_code == 200, chat.text
        assert [r.text for r in await gw.stored("team", "bob")] == ["hello", "Echo: hello"]
        assert gw.upstream.received[-1].headers["authorization"] == "Bearer sk-client"
        scoped = await gw.http.post(
            f"{gw.base('team', 'x')}/chat/completions", json=chat_body(), headers=sent
        )
        assert scoped.status_code == 200
        # every other route of the app
        for path in ("/v1/completions", "/v1/embeddings"):
            response = await gw.http.post(gw.url + path, json={"input": "x"}, headers=sent)
            assert response.status_code == 200
        for method in ("GET", "DELETE"):
            response = await gw.http.request(
                method, f"{gw.base('team', 'x')}/chat/completions", headers=sent
            )
            assert response.status_code == 200
        # the admin key as the client's Authorization is removed before the app
        for path in ("/v1/completions", "/v1/embeddings"):
            response = await gw.http.post(
                gw.url + path, json={"input": "x"}, headers=bearer(ADMIN_KEY)
            )
            assert response.status_code == 200
            assert "authorization" not in gw.upstream.received[-1].headers
        assert (await gw.http.get(f"{gw.url}/v1/models", headers=bearer(ADMIN_KEY))).is_success
        assert gw.upstream.model_list_auth is None
        assert len(gw.upstream.received) == 8
        assert leaked(gw.upstream) == []


def header_echo() -> FastAPI:
    """A FastAPI app that answers with the request headers it was given, on any route."""
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def anything(request: Request) -> dict[str, str]:
        return dict(request.headers)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json(dict(websocket.headers))
        await websocket.close()

    return app


async def test_no_route_of_a_fastapi_app_sees_our_headers(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, admin_key=ADMIN_KEY)
    app = ReservoirMiddleware(header_echo(), settings=settings)
    sent = {**OUR_HEADERS, "x-api-key": ADMIN_KEY, "X-Client": "kept"}
    async with serve(app) as url, httpx.AsyncClient(timeout=30) as http:
        seen = []
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/embeddings"),
            ("PUT", "/v1/chat/completions"),
            ("DELETE", "/v1/partition/p/instance/i/chat/completions"),
            ("GET", "/v1/partition/p/instance/i/memory/%2Frecent"),
        ):
            for auth in ({"Authorization": f"Bearer {ADMIN_KEY}"}, {"Authorization": ADMIN_KEY}):
                response = await http.request(method, url + path, headers={**sent, **auth})
                assert response.status_code == 200, (method, path, response.text)
                seen.append(response.json())
        async with websockets.connect(
            url.replace("http", "ws") + "/ws", additional_headers=sent, open_timeout=5
        ) as ws:
            seen.append(json.loads(await ws.recv()))
    assert all(headers["x-client"] == "kept" for headers in seen)
    found = [
        (name, value)
        for headers in seen
        for name, value in headers.items()
        if name.startswith("x-reservoir-") or ADMIN_KEY in value
    ]
    assert found == []


async def test_the_fastapi_example_never_sends_the_admin_key_to_the_provider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = Upstream()
    async with serve(upstream.app()) as upstream_url:
        monkeypatch.setenv("UPSTREAM_BASE_URL", f"{upstream_url}/v1")
        monkeypatch.setenv("RSV_DATA_DIR", str(tmp_path / "memory"))
        monkeypatch.setenv("RSV_ADMIN_KEY", ADMIN_KEY)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-from-gateway")
        example = runpy.run_path(str(ROOT / "examples/fastapi/gateway.py"))
        async with serve(example["app"]) as url, httpx.AsyncClient(timeout=30) as http:
            base = f"{url}/v1/partition/team/instance/alice"
            # the admin key as the OpenAI client's api_key: the gateway's own key goes on
            async with AsyncOpenAI(base_url=base, api_key=ADMIN_KEY, max_retries=0) as ai:
                answer = await ai.chat.completions.create(**chat_body("My bike is red."))
            assert answer.choices[0].message.content == "Echo: My bike is red."
            assert upstream.received[-1].headers["authorization"] == "Bearer sk-from-gateway"
            await http.post(f"{base}/chat/completions", json=chat_body(), headers=OUR_HEADERS)
            await http.get(f"{url}/v1/models", headers=bearer(ADMIN_KEY))
            assert upstream.model_list_auth == "Bearer sk-from-gateway"
            recent = await http.get(f"{base}/memory/recent", headers=bearer(ADMIN_KEY))
            assert "My bike is red." in [m["text"] for m in recent.json()["messages"]]
        assert len(upstream.received) == 2
        assert leaked(upstream) == []


# -- item 5: encoded chat paths ------------------------------------------------------------


ENCODED_CHAT = [
    "/v1/chat/%63ompletions",
    "/v1/%63hat/completions",
]
AMBIGUOUS_CHAT = [
    "/v1%2Fchat%2Fcompletions",
    "/v1/chat%2Fcompletions",
    "/v1/chat/completions%0A",
    "/v1/partition/team/instance/i%2Fchat%2Fcompletions",
]


@pytest.mark.parametrize("path", ENCODED_CHAT + AMBIGUOUS_CHAT)
async def test_encoded_chat_paths_do_not_pass_partition_keys(
    gateway_factory: GatewayFactory, path: str
) -> None:
    async with gateway_factory(partition_keys=KEYS) as gw:
        assert httpx.URL(gw.url + path).raw_path.decode() == path  # sent as written
        response = await gw.http.post(gw.url + path, json=chat_body())
        expected = 400 if path in AMBIGUOUS_CHAT else 401
        assert response.status_code == expected, response.text
        assert response.json()["error"]["type"] in ("invalid_request", "unauthorized")
        assert gw.upstream.received == []


@pytest.mark.parametrize("path", ENCODED_CHAT)
async def test_an_encoded_chat_path_is_a_memory_route(
    gateway_factory: GatewayFactory, path: str
) -> None:
    async with gateway_factory(partition_keys=KEYS) as gw:
        headers = {"X-Reservoir-Partition": "team", **bearer(TEAM_KEY)}
        response = await gw.http.post(gw.url + path, json=chat_body(), headers=headers)
        assert response.status_code == 200, response.text
        assert [r.text for r in await gw.stored("team", "default")] == ["hello", "Echo: hello"]


@pytest.mark.parametrize("path", ["/v1/partition/te%61m/instance/%69/%63hat/completions"])
async def test_an_encoded_scoped_chat_path_is_matched(
    gateway_factory: GatewayFactory, path: str
) -> None:
    async with gateway_factory(partition_keys=KEYS) as gw:
        refused = await gw.http.post(gw.url + path, json=chat_body())
        assert refused.status_code == 401
        response = await gw.http.post(gw.url + path, json=chat_body(), headers=bearer(TEAM_KEY))
        assert response.status_code == 200, response.text
        assert gw.upstream.received[-1].path == "/v1/chat/completions"
        assert [r.text for r in await gw.stored("team", "i")] == ["hello", "Echo: hello"]


async def test_encoded_chat_paths_through_the_fastapi_example_and_reservoir_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, provider_key: str
) -> None:
    upstream = Upstream()
    async with serve(upstream.app()) as upstream_url:
        monkeypatch.setenv("UPSTREAM_BASE_URL", f"{upstream_url}/v1")
        monkeypatch.setenv("RSV_DATA_DIR", str(tmp_path / "example"))
        monkeypatch.setenv("RSV_PARTITION_KEYS", f'{{"{TEAM_KEY}": ["team"]}}')
        example = runpy.run_path(str(ROOT / "examples/fastapi/gateway.py"))
        async with serve(example["app"]) as url, httpx.AsyncClient(timeout=30) as http:
            for path in ENCODED_CHAT + AMBIGUOUS_CHAT:
                response = await http.post(url + path, json=chat_body())
                assert response.status_code in (400, 401), (path, response.text)
        assert upstream.received == []
    monkeypatch.delenv("RSV_PARTITION_KEYS")
    async with (
        serve_stack(tmp_path, partition_keys=KEYS) as (url, model),
        httpx.AsyncClient(timeout=30) as http,
    ):
        for path in ENCODED_CHAT + AMBIGUOUS_CHAT:
            response = await http.post(url + path, json=chat_body())
            assert response.status_code in (400, 401), (path, response.text)
        assert model.received == []


# -- item 6: non-ASCII keys ---------------------------------------------------------------


UTF8_KEY = "clé-équipe-☂"


async def test_a_non_ascii_partition_key_is_checked_not_a_500(
    tmp_path: Path, provider_key: str
) -> None:
    keys = {UTF8_KEY: ["team"]}
    async with (
        serve_stack(tmp_path, partition_keys=keys) as (url, model),
        httpx.AsyncClient(timeout=30) as http,
    ):
        chat = f"{url}/v1/partition/team/instance/i/chat/completions"
        ok = await http.post(chat, json=chat_body(), headers=bearer(UTF8_KEY.encode()))
        assert ok.status_code == 200, ok.text
        assert model.received[-1].headers["authorization"] == provider_key
        other = f"{url}/v1/partition/other/instance/i/chat/completions"
        refused = await http.post(other, json=chat_body(), headers=bearer(UTF8_KEY.encode()))
        assert refused.status_code == 403
        for wrong in ("clé-fausse".encode(), "clé".encode("latin-1"), b"\xff\xfe"):
            response = await http.post(chat, json=chat_body(), headers=bearer(wrong))
            assert response.status_code == 403, response.text
            assert response.json()["error"]["type"] == "forbidden"
            # no partition check on these routes: the gateway refuses what it cannot send
            for path, body in (
                ("/v1/embeddings", {"model": "gpt-4o", "input": "x"}),
                ("/v1/completions", {"model": "gpt-4o", "prompt": "x"}),
                ("/v1/chat/completions", chat_body()),
            ):
                response = await http.post(url + path, json=body, headers=bearer(wrong))
                assert response.status_code in (401, 403), (path, response.text)
                assert response.json()["error"]["type"] in ("unauthorized", "forbidden")
        assert len(model.received) == 1


async def test_non_ascii_api_keys_of_reservoir_serve(tmp_path: Path, provider_key: str) -> None:
    async with (
        serve_stack(tmp_path, api_keys=[UTF8_KEY]) as (url, model),
        httpx.AsyncClient(timeout=30) as http,
    ):
        target = f"{url}/v1/chat/completions"
        ok = await http.post(target, json=chat_body(), headers=bearer(UTF8_KEY.encode()))
        assert ok.status_code == 200, ok.text
        assert model.received[-1].headers["authorization"] == provider_key
        for wrong in ("clé".encode(), "clé".encode("latin-1"), b"\xff\xfe"):
            response = await http.post(target, json=chat_body(), headers=bearer(wrong))
            assert response.status_code == 401, response.text
        assert len(model.received) == 1
