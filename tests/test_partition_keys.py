"""Partition keys and the `reservoir_authorize` hook, through real HTTP.

uvicorn on 127.0.0.1, the middleware, embedded Chroma, the embedding model and
the official `openai` client are real; only the model is the local stand-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from reservoir_middleware import ReservoirSettings, Scope, hookimpl
from reservoir_middleware.cli._configfile import ConfigError, set_value
from reservoir_middleware.gateway.app import create_app
from tests.conftest import Gateway, GatewayFactory, make_settings, serve
from tests.upstream import Upstream

TEAM_A = "sk-team-a-7f3c"
TEAM_B = "sk-team-b-91d2"
KEYS = {TEAM_A: ["team-a", "shared-*"], TEAM_B: ["team-b", "default"]}
FACT = "Our deploy window is Thursday at 14:00 UTC."
QUESTION = "When is our deploy window?"


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


async def post(
    gw: Gateway,
    partition: str,
    text: str = "hello",
    headers: Mapping[str, str] | None = None,
    instance: str = "i",
) -> httpx.Response:
    body = {"model": "gpt-4o", "messages": user(text)}
    url = f"{gw.base(partition, instance)}/chat/completions"
    response = await gw.http.post(url, json=body, headers=dict(headers or {}))
    await gw.reservoir.settle()
    return response


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def scopes_of(gw: Gateway, partition: str) -> list[Scope]:
    """The scopes the store holds for a partition: a refused request creates none."""
    return await asyncio.to_thread(gw.reservoir.store.scopes, partition)


def assert_refused(response: httpx.Response, status: int, error_type: str, partition: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type
    assert repr(partition) in error["message"]
    assert TEAM_A not in response.text and TEAM_B not in response.text  # never echoed


@contextlib.asynccontextmanager
async def client(gw: Gateway, partition: str, key: str) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=gw.base(partition, "alice"), api_key=key, max_retries=0, timeout=30
    ) as ai:
        yield ai


# -- the table ---------------------------------------------------------------------------


async def test_a_key_reads_and_writes_the_partitions_it_grants(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(partition_keys=KEYS) as gw, client(gw, "team-a", TEAM_A) as ai:
        first = await ai.chat.completions.create(model="gpt-4o", messages=user(FACT))
        assert first.choices[0].message.content == f"Echo: {FACT}"
        await gw.reservoir.settle()
        await ai.chat.completions.create(model="gpt-4o", messages=user(QUESTION))
        assert FACT in gw.upstream.received[-1].text  # recalled from memory
        stored = await gw.stored("team-a", "alice")
        assert [r.text for r in stored][:2] == [FACT, f"Echo: {FACT}"]
        # the wrapped app gets the client's Authorization, never X-Reservoir-Key
        await post(gw, "shared-docs", headers={"X-Reservoir-Key": TEAM_A, **bearer("sk-x")})
        assert gw.upstream.received[-1].headers["authorization"] == "Bearer sk-x"
        assert "x-reservoir-key" not in gw.upstream.received[-1].headers


async def test_another_partition_is_refused_and_touches_no_memory(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(partition_keys=KEYS) as gw:
        assert (await post(gw, "team-b", FACT, bearer(TEAM_B))).status_code == 200
        before = len(gw.upstream.received)
        before_b = [r.id for r in await gw.stored("team-b")]

        refused = await post(gw, "team-b", "Tell me everything you know.", bearer(TEAM_A))
        assert_refused(refused, 403, "forbidden", "team-b")
        assert FACT not in refused.text
        refused = await post(gw, "team-c", "A new secret.", bearer(TEAM_A), instance="new")
        assert_refused(refused, 403, "forbidden", "team-c")
        async with client(gw, "team-b", TEAM_A) as ai:
            with pytest.raises(openai.PermissionDeniedError):
                await ai.chat.completions.create(model="gpt-4o", messages=user("hi"), stream=True)

        assert len(gw.upstream.received) == before  # the app was never called
        assert [r.id for r in await gw.stored("team-b")] == before_b
        assert await scopes_of(gw, "team-c") == []
        assert (await gw.reservoir.recent("team-b", "alice")) == []


async def test_a_refusal_comes_before_the_body_is_read(gateway_factory: GatewayFactory) -> None:
    async with gateway_factory(partition_keys=KEYS, max_body_bytes=4096) as gw:
        huge = "x" * 100_000
        assert_refused(await post(gw, "team-b", huge, bearer(TEAM_A)), 403, "forbidden", "team-b")
        assert (await post(gw, "team-a", huge, bearer(TEAM_A))).status_code == 413


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": f"Basic {TEAM_A}"},
        {"X-Reservoir-Key": ""},
        {"Authorization": "Bearer"},
    ],
    ids=["none", "basic", "blank-header", "blank-bearer"],
)
async def test_no_key_gets_401(gateway_factory: GatewayFactory, headers: dict[str, str]) -> None:
    async with gateway_factory(partition_keys=KEYS) as gw:
        refused = await post(gw, "team-a", FACT, headers)
        assert_refused(refused, 401, "unauthorized", "team-a")
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "X-Reservoir-Key" in refused.json()["error"]["message"]
        assert gw.upstream.received == []
        assert await scopes_of(gw, "team-a") == []


async def test_x_reservoir_key_comes_before_the_bearer_token(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(partition_keys=KEYS) as gw:
        both = {"X-Reservoir-Key": TEAM_B, **bearer(TEAM_A)}
        assert (await post(gw, "team-b", headers=both)).status_code == 200
        assert_refused(await post(gw, "team-a", headers=both), 403, "forbidden", "team-a")
        assert (await post(gw, "team-a", headers=bearer(TEAM_A))).status_code == 200
        unknown = {"X-Reservoir-Key": "sk-unknown", **bearer(TEAM_A)}
        assert_refused(await post(gw, "team-a", headers=unknown), 403, "forbidden", "team-a")


async def test_the_default_route_is_guarded_by_the_same_rule(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(partition_keys=KEYS) as gw:
        url = f"{gw.url}/v1/chat/completions"
        body = {"model": "gpt-4o", "messages": user(FACT)}
        refused = await gw.http.post(url, json=body, headers=bearer(TEAM_A))
        assert_refused(refused, 403, "forbidden", "default")
        assert (await gw.http.post(url, json=body, headers=bearer(TEAM_B))).status_code == 200
        named = {"X-Reservoir-Partition": "team-a", **bearer(TEAM_A)}
        assert (await gw.http.post(url, json=body, headers=named)).status_code == 200
        named = {"X-Reservoir-Partition": "team-a", **bearer(TEAM_B)}
        assert_refused(
            await gw.http.post(url, json=body, headers=named), 403, "forbidden", "team-a"
        )
        await gw.reservoir.settle()
        assert [r.text for r in await gw.stored("default", "default")][:1] == [FACT]
        assert [r.text for r in await gw.stored("team-a", "default")][:1] == [FACT]
        assert len(gw.upstream.received) == 2


@pytest.mark.parametrize(
    ("partition", "granted"),
    [
        ("shared-docs", True),
        ("shared-a%2Fb", True),  # the partition `shared-a/b`: `*` matches `/`
        ("shared", False),
        ("Shared-docs", False),  # case-sensitive
        ("proj-1", True),
        ("proj-12", False),
        ("lab[1]", True),  # a name equal to the entry, even with pattern characters
        ("lab1", True),  # and the entry as a pattern
        ("lab2", False),
    ],
)
async def test_glob_patterns(
    gateway_factory: GatewayFactory, partition: str, granted: bool
) -> None:
    keys = {TEAM_A: ["shared-*", "proj-?", "lab[1]"]}
    async with gateway_factory(partition_keys=keys) as gw:
        response = await post(gw, partition, headers=bearer(TEAM_A))
        assert response.status_code == (200 if granted else 403), response.text
        assert len(gw.upstream.received) == (1 if granted else 0)


# -- where the table comes from ------------------------------------------------------------


def test_the_env_var_and_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "reservoir.toml"
    config.write_text(f'[partition_keys]\n"{TEAM_A}" = ["team-a", "shared-*"]\n')
    monkeypatch.setenv("RSV_CONFIG_FILE", str(config))
    assert ReservoirSettings().partition_keys == {TEAM_A: ["team-a", "shared-*"]}
    # a table replaces a lower-precedence one whole: the file's TEAM_A is revoked
    monkeypatch.setenv("RSV_PARTITION_KEYS", json.dumps({TEAM_B: "team-b"}))
    assert ReservoirSettings().partition_keys == {TEAM_B: ["team-b"]}
    assert ReservoirSettings(partition_keys={}).partition_keys == {}
    monkeypatch.delenv("RSV_PARTITION_KEYS")

    written = tmp_path / "written.toml"
    set_value("partition-keys", f'{{"{TEAM_B}" = ["team-b", "ops-*"]}}', written)
    monkeypatch.setenv("RSV_CONFIG_FILE", str(written))
    assert ReservoirSettings().partition_keys == {TEAM_B: ["team-b", "ops-*"]}


@pytest.mark.parametrize(
    "value",
    ['{"sk-a" = 3}', '{"sk-a" = [""]}', '{" sk-a" = ["x"]}', '{"" = ["x"]}', '["sk-a"]'],
)
def test_the_config_file_refuses_a_bad_table_by_name(tmp_path: Path, value: str) -> None:
    path = tmp_path / "reservoir.toml"
    with pytest.raises(ConfigError, match="partition_keys") as refused:
        set_value("partition_keys", value, path)
    assert "sk-a" not in str(refused.value)  # a key is not repeated in errors
    assert not path.exists()


async def test_keys_from_the_env_var_are_enforced(
    gateway_factory: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RSV_PARTITION_KEYS", json.dumps({TEAM_A: ["team-*"]}))
    async with gateway_factory(settings=make_settings(tmp_path)) as gw:
        assert (await post(gw, "team-z", headers=bearer(TEAM_A))).status_code == 200
        assert_refused(await post(gw, "ops", headers=bearer(TEAM_A)), 403, "forbidden", "ops")
        assert_refused(await post(gw, "team-z"), 401, "unauthorized", "team-z")


async def test_nothing_changes_without_keys_or_plugins(gateway_factory: GatewayFactory) -> None:
    async with gateway_factory() as gw:
        for headers in ({}, bearer("anything"), {"X-Reservoir-Key": "whatever"}):
            assert (await post(gw, "team-a", FACT, headers)).status_code == 200
        assert len(gw.upstream.received) == 3
        names = dict(gw.reservoir.hooks.describe())
        assert names["partition-keys"] == ["reservoir_authorize"]


async def test_blocking_the_table_plugin_refuses_instead_of_opening(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(partition_keys=KEYS, disable_plugins="partition-keys") as gw:
        refused = await post(gw, "team-a", headers=bearer(TEAM_A))
        assert_refused(refused, 403, "forbidden", "team-a")
        assert gw.upstream.received == []


# -- the hook ------------------------------------------------------------------------------


class TeamHeader:
    """Grants the partition named by `X-Team`, vetoes `X-Blocked: yes`, else no opinion."""

    name = "team-header"

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []

    @hookimpl
    def reservoir_authorize(
        self, scope: Scope, key: str | None, headers: Mapping[str, str]
    ) -> bool | None:
        self.seen.append((scope.partition, scope.instance, key))
        if headers.get("x-blocked") == "yes":
            return False
        if headers.get("X-Team") == scope.partition:
            return True
        return None


async def test_an_authorize_plugin_alone_allows_denies_or_has_no_opinion(
    gateway_factory: GatewayFactory,
) -> None:
    plugin = TeamHeader()
    async with gateway_factory(plugins=(plugin,)) as gw:
        assert (await post(gw, "ops", headers=bearer("k1"))).status_code == 200  # None: as before
        assert (await post(gw, "ops", headers={"X-Team": "ops"})).status_code == 200
        blocked = await post(gw, "ops", FACT, {"X-Blocked": "yes", **bearer("k1")})
        assert_refused(blocked, 403, "forbidden", "ops")
        assert_refused(
            await post(gw, "ops", FACT, {"X-Blocked": "yes"}), 401, "unauthorized", "ops"
        )
        assert len(gw.upstream.received) == 2
        assert FACT not in [r.text for r in await gw.stored("ops")]
        assert plugin.seen[0] == ("ops", "i", "k1")
        assert plugin.seen[1] == ("ops", "i", None)


async def test_an_authorize_plugin_beside_the_table(gateway_factory: GatewayFactory) -> None:
    async with gateway_factory(partition_keys=KEYS, plugins=(TeamHeader(),)) as gw:
        # the plugin grants what the table does not
        granted = await post(gw, "ops", headers={"X-Team": "ops", **bearer(TEAM_A)})
        assert granted.status_code == 200
        assert (await post(gw, "ops", headers={"X-Team": "ops"})).status_code == 200
        # a False vetoes what the table grants
        vetoed = await post(gw, "team-a", headers={"X-Blocked": "yes", **bearer(TEAM_A)})
        assert_refused(vetoed, 403, "forbidden", "team-a")
        # no opinion: the table decides
        assert_refused(await post(gw, "ops", headers=bearer(TEAM_A)), 403, "forbidden", "ops")
        assert len(gw.upstream.received) == 2


class Broken:
    name = "broken-auth"

    def __init__(self, marker: str) -> None:
        self.marker = marker

    @hookimpl
    async def reservoir_authorize(self, scope: Scope) -> bool | None:
        raise RuntimeError(f"token service down {self.marker}")


class Sloppy:
    name = "sloppy-auth"

    @hookimpl
    def reservoir_authorize(self, key: str | None) -> Any:
        return "yes"  # not True: must not allow


class Slow:
    name = "slow-auth"

    @hookimpl
    async def reservoir_authorize(self, scope: Scope) -> bool | None:
        await asyncio.sleep(5)
        return True


class Blocking:
    name = "blocking-auth"

    def __init__(self) -> None:
        self.finished = threading.Event()

    @hookimpl
    def reservoir_authorize(self, scope: Scope) -> bool | None:
        time.sleep(1.5)  # in a worker thread, which a timeout cannot stop
        self.finished.set()
        return True


@pytest.mark.parametrize("kind", ["raises", "not-a-bool", "too-slow", "blocking"])
async def test_a_failing_authorize_plugin_denies(
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    marker = tmp_path.name  # unique: each distinct failure is logged once a minute
    blocking = Blocking()
    plugin = {"raises": Broken(marker), "not-a-bool": Sloppy(), "too-slow": Slow()}.get(kind)
    # nothing else would refuse: no table, and the plugin is the only other opinion
    async with gateway_factory(plugins=(plugin or blocking,), memory_timeout_ms=300) as gw:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="reservoir"):
            refused = await post(gw, marker, FACT, bearer(TEAM_A))
        assert time.monotonic() - started < 1.2  # memory_timeout_ms bounds the check
        assert_refused(refused, 503, "authorization_unavailable", marker)
        assert "denied" in refused.json()["error"]["message"]
        assert gw.upstream.received == []
        assert await scopes_of(gw, marker) == []
        logged = caplog.text
        if kind == "raises":
            assert "'broken-auth' failed in reservoir_authorize" in logged and marker in logged
        elif kind == "not-a-bool":
            assert "'sloppy-auth' failed in reservoir_authorize" in logged
        else:
            assert f"reservoir_authorize timed out for partition {marker!r}" in logged
        assert TEAM_A not in logged
        if plugin is None:  # let the abandoned thread end while its event loop runs
            assert await asyncio.to_thread(blocking.finished.wait, 5)


async def test_admin_endpoints_keep_needing_the_admin_key_only(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(partition_keys=KEYS, admin_key="adm-secret-9") as gw:
        assert (await post(gw, "team-a", FACT, bearer(TEAM_A))).status_code == 200
        recent = gw.base("team-a") + "/memory/recent"
        as_admin = await gw.http.get(recent, headers=bearer("adm-secret-9"))
        assert [m["text"] for m in as_admin.json()["messages"]][:1] == [FACT]
        assert (await gw.http.get(recent, headers=bearer(TEAM_A))).status_code == 401
        # the admin key is no partition key
        refused = await post(gw, "team-a", headers=bearer("adm-secret-9"))
        assert_refused(refused, 403, "forbidden", "team-a")
        # other routes are not memory: partition keys do not guard them
        assert (await gw.http.get(f"{gw.url}/v1/models")).status_code == 200


# -- `reservoir serve` ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve_stack(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[str, Upstream]]:
    upstream = Upstream()
    async with serve(upstream.app()) as model_url:
        settings = make_settings(tmp_path, openai_base_url=f"{model_url}/v1", **overrides)
        async with serve(create_app(settings)) as url:
            yield url, upstream


async def test_reservoir_serve_with_api_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider")
    async with (
        serve_stack(tmp_path, api_keys=[TEAM_A, "gw-only"], partition_keys=KEYS) as (url, model),
        httpx.AsyncClient(timeout=30) as http,
    ):
        base = f"{url}/v1/partition/team-a/instance/alice"
        # one key passes the gateway and grants the partition: the client only sets api_key
        async with AsyncOpenAI(base_url=base, api_key=TEAM_A, max_retries=0) as ai:
            await ai.chat.completions.create(model="gpt-4o", messages=user(FACT))
            await ai.chat.completions.create(model="gpt-4o", messages=user(QUESTION))
        assert FACT in model.received[-1].text
        assert model.received[-1].headers["authorization"] == "Bearer sk-provider"
        async with AsyncOpenAI(
            base_url=f"{url}/v1/partition/team-b/instance/alice", api_key=TEAM_A, max_retries=0
        ) as ai:
            with pytest.raises(openai.PermissionDeniedError):
                await ai.chat.completions.create(model="gpt-4o", messages=user(QUESTION))

        async def chat(headers: dict[str, str]) -> httpx.Response:
            body = {"model": "gpt-4o", "messages": user(QUESTION)}
            return await http.post(f"{base}/chat/completions", json=body, headers=headers)

        calls = len(model.received)
        # a gateway key that grants no partition
        assert_refused(await chat(bearer("gw-only")), 403, "forbidden", "team-a")
        # refused by the gateway's own check first
        assert (await chat({})).json()["error"]["message"].startswith("a valid API key")
        assert (await chat(bearer("sk-nope"))).status_code == 401
        assert len(model.received) == calls
        # the gateway key in Authorization, the partition key beside it
        ok = await chat({"X-Reservoir-Key": TEAM_A, **bearer("gw-only")})
        assert ok.status_code == 200 and FACT in model.received[-1].text
        assert "x-reservoir-key" not in model.received[-1].headers
        models = await http.get(f"{url}/v1/models", headers=bearer("gw-only"))
        assert models.status_code == 200


async def test_reservoir_serve_never_sends_a_partition_key_upstream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider")
    async with serve_stack(tmp_path, partition_keys=KEYS) as (url, model):
        base = f"{url}/v1/partition/team-a/instance/alice"
        async with AsyncOpenAI(base_url=base, api_key=TEAM_A, max_retries=0) as ai:
            answer = await ai.chat.completions.create(model="gpt-4o", messages=user(FACT))
        assert answer.choices[0].message.content == f"Echo: {FACT}"
        assert model.received[-1].headers["authorization"] == "Bearer sk-provider"
        async with AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-own", max_retries=0) as ai:
            with pytest.raises(openai.PermissionDeniedError):  # partition `default`: no grant
                await ai.chat.completions.create(model="gpt-4o", messages=user(FACT))
        assert len(model.received) == 1
