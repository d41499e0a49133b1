"""The opt-in admin endpoints of the middleware (RSV_ADMIN_KEY), through real HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import GatewayFactory, make_settings, serve

ADMIN = {"Authorization": "Bearer adm-secret-1"}
FACTS = ["I adopted a rescue greyhound named Comet.", "My sister teaches chemistry in Porto."]


async def test_admin_endpoints_do_not_exist_without_a_key(gateway_factory: GatewayFactory) -> None:
    async with gateway_factory() as gw:
        for method in ("GET", "DELETE"):
            for action in ("/memory/search?term=x", "/memory/recent", "/memory/export", "/memory"):
                response = await gw.http.request(method, gw.base() + action, headers=ADMIN)
                assert response.status_code in (404, 405), (method, action)


@pytest.mark.parametrize("storage", ["embedded", "server"])
async def test_admin_endpoints(
    gateway_factory: GatewayFactory, storage: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    extra = {"chroma_url": request.getfixturevalue("chroma_server")} if storage == "server" else {}
    p = f"admin-{tmp_path.name[-10:]}"  # the server is shared by the session
    async with gateway_factory(admin_key="adm-secret-1", **extra) as gw:
        for fact in FACTS:
            await gw.chat([{"role": "user", "content": fact}], partition=p)
        base = gw.base(p) + "/memory"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Reservoir-Admin-Key": "no"}):
            refused = await gw.http.get(base + "/recent", headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"]["type"] == "unauthorized"

        recent = await gw.http.get(base + "/recent?limit=2", headers=ADMIN)
        assert [m["text"] for m in recent.json()["messages"]] == [FACTS[1], f"Echo: {FACTS[1]}"]

        found = await gw.http.get(
            base + "/search",
            params={"term": "rescue greyhound"},
            headers={"X-Reservoir-Admin-Key": "adm-secret-1"},
        )
        results = found.json()["results"]
        assert results[0]["text"] == FACTS[0] and results[0]["score"] > 0
        semantic = await gw.http.get(
            base + "/search",
            params={"term": "Where does my sister work?", "semantic": "true", "limit": "1"},
            headers=ADMIN,
        )
        assert [r["text"] for r in semantic.json()["results"]] == [FACTS[1]]
        for bad in ("?limit=0", "?limit=abc", "?term="):
            response = await gw.http.get(base + "/search" + bad, headers=ADMIN)
            assert response.status_code == 400
            assert response.json()["error"]["type"] == "invalid_request"

        export = await gw.http.get(base + "/export", headers=ADMIN)
        assert export.headers["content-type"].startswith("application/x-ndjson")
        records = [json.loads(line) for line in export.text.splitlines()]
        assert [r["text"] for r in records] == [
            FACTS[0],
            f"Echo: {FACTS[0]}",
            FACTS[1],
            f"Echo: {FACTS[1]}",
        ]
        assert [r["seq"] for r in records] == [0, 1, 2, 3]

        deleted = await gw.http.delete(base, headers=ADMIN)
        assert deleted.json() == {"deleted": 1}
        assert (await gw.http.get(base + "/recent", headers=ADMIN)).json() == {"messages": []}
        await gw.chat([{"role": "user", "content": "What pet do I have?"}], partition=p)
        assert gw.upstream.received[-1].messages == [
            {"role": "user", "content": "What pet do I have?"}
        ]
        other = await gw.http.get(gw.base("other", "x") + "/memory/recent", headers=ADMIN)
        assert other.json() == {"messages": []}


async def test_admin_key_passes_the_gateway_keys_of_reservoir_serve(tmp_path: Path) -> None:
    from reservoir_middleware.gateway.app import create_app

    settings = make_settings(tmp_path, api_keys=["client-key"], admin_key="adm-secret-1")
    async with serve(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as http:
        base = f"{url}/v1/partition/p/instance/i/memory/recent"
        assert (await http.get(base)).status_code == 401
        client_only = await http.get(base, headers={"Authorization": "Bearer client-key"})
        assert client_only.status_code == 401  # a client key is not the admin key
        assert (await http.get(base, headers=ADMIN)).json() == {"messages": []}
