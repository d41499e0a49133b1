"""`reservoir serve`: routing, auth, errors, `auto`, pass-through, memory; in-process and as
the real console script."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from reservoir_middleware.gateway.app import create_app
from reservoir_middleware.gateway.providers import normalize_base_url
from tests.conftest import free_port, make_settings, running, serve
from tests.upstream import Reply, Upstream

PROVIDERS = ("openai", "mistral", "gemini", "ollama")


@dataclass
class Stack:
    url: str
    upstreams: dict[str, Upstream]
    http: httpx.AsyncClient

    async def chat(self, model: str, text: str = "hi", **extra: Any) -> httpx.Response:
        headers = extra.pop("headers", None) or {}
        body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
        return await self.http.post(f"{self.url}/v1/chat/completions", json=body, headers=headers)


@contextlib.asynccontextmanager
async def stack(
    tmp_path: Path, *, down: tuple[str, ...] = (), **overrides: Any
) -> AsyncIterator[Stack]:
    upstreams = {name: Upstream() for name in PROVIDERS}
    upstreams["openai"].model_ids = ["gpt-4o", "gpt-4o-mini"]
    upstreams["mistral"].model_ids = ["mistral-small-latest"]
    upstreams["gemini"].model_ids = ["gemini-2.0-flash"]
    upstreams["ollama"].model_ids = ["llama3.2:3b", "qwen2.5:7b"]
    async with contextlib.AsyncExitStack() as exits:
        urls = {}
        for name, upstream in upstreams.items():
            if name in down:
                urls[name] = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
            else:
                urls[name] = await exits.enter_async_context(serve(upstream.app())) + "/v1"
        settings = make_settings(
            tmp_path,
            openai_base_url=urls["openai"] + "/chat/completions",  # Reservoir's full form
            mistral_base_url=urls["mistral"],
            gemini_base_url=urls["gemini"] + "/",
            ollama_base_url=urls["ollama"],
            **overrides,
        )
        gateway = await exits.enter_async_context(serve(create_app(settings)))
        client = await exits.enter_async_context(httpx.AsyncClient(timeout=30))
        yield Stack(gateway, upstreams, client)


@pytest.fixture(autouse=True)
def _no_provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "MISTRAL_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_base_urls_accept_the_api_base_and_the_full_endpoint() -> None:
    assert normalize_base_url("https://api.openai.com/v1/chat/completions") == (
        "https://api.openai.com/v1"
    )
    assert normalize_base_url(" http://h:1/v1/ ") == "http://h:1/v1"
    assert normalize_base_url("http://h/api/v1/embeddings") == "http://h/api/v1"


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("gpt-4o", "openai"),
        ("o3-mini", "openai"),
        ("mistral-small-latest", "mistral"),
        ("gemini-2.0-flash", "gemini"),
        ("llama3.2", "ollama"),
        ("codellama", "ollama"),
        ("mistral:7b", "ollama"),
        ("qwen2.5:7b", "ollama"),
        ("gpt-oss:20b", "ollama"),
        ("codestral-latest", "mistral"),
    ],
)
async def test_models_are_routed_by_name(tmp_path: Path, model: str, provider: str) -> None:
    upstream_models = {"o3-mini": "openai"}
    async with stack(tmp_path) as s:
        if model in upstream_models:
            s.upstreams["openai"].model_ids.append(model)
        response = await s.chat(model)
        assert response.status_code == 200, response.text
        hit = [name for name, u in s.upstreams.items() if u.received]
        assert hit == [provider]
        assert s.upstreams[provider].received[-1].path == "/v1/chat/completions"


async def test_unknown_model_names(tmp_path: Path) -> None:
    async with stack(tmp_path) as s:
        unsupported = await s.chat("claude-3-opus")
        assert unsupported.status_code == 400
        assert unsupported.json()["error"]["type"] == "unsupported"
        assert "claude-3-opus" in unsupported.json()["error"]["message"]
        missing = await s.chat("gpt-5-imaginary")
        assert missing.status_code == 404
        message = missing.json()["error"]["message"]
        assert "gpt-5-imaginary" in message and "gpt-4o, gpt-4o-mini" in message
        await s.chat("gpt-4o")
        await s.chat("gpt-4o")
        assert s.upstreams["openai"].model_list_calls == 1  # cached
        assert all(u.received == [] for n, u in s.upstreams.items() if n != "openai")


async def test_authorization_forwarded_or_provider_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider")
    async with stack(tmp_path) as s:
        await s.chat("gpt-4o")
        assert s.upstreams["openai"].received[-1].headers["authorization"] == "Bearer sk-provider"
        await s.chat("gpt-4o", headers={"Authorization": "Bearer sk-client"})
        assert s.upstreams["openai"].received[-1].headers["authorization"] == "Bearer sk-client"
        await s.chat("llama3.2")
        assert "authorization" not in s.upstreams["ollama"].received[-1].headers


async def test_api_keys_guard_the_gateway_and_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider")
    async with stack(tmp_path, api_keys=["gw-key-1", "gw-key-2"]) as s:
        refused = await s.chat("gpt-4o", "remember this secret")
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "unauthorized"
        wrong = await s.chat("gpt-4o", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert s.upstreams["openai"].received == []
        ok = await s.chat("gpt-4o", headers={"Authorization": "Bearer gw-key-1"})
        assert ok.status_code == 200
        # the gateway's own key is not sent on: the provider key is
        assert s.upstreams["openai"].received[-1].headers["authorization"] == "Bearer sk-provider"
        ok = await s.chat("gpt-4o", "and now?", headers={"x-api-key": "gw-key-2"})
        assert ok.status_code == 200
        assert "remember this secret" not in s.upstreams["openai"].received[-1].text
        assert (await s.http.get(f"{s.url}/health")).status_code == 200
        models = await s.http.get(f"{s.url}/v1/models")
        assert models.status_code == 401


async def test_upstream_errors_pass_through_and_backend_failures(tmp_path: Path) -> None:
    async with stack(tmp_path, down=("mistral",), upstream_timeout_s=0.5) as s:
        s.upstreams["openai"].replies.append(Reply(status=500))
        failed = await s.chat("gpt-4o")
        assert failed.status_code == 500
        assert failed.json() == {"error": {"message": "upstream failure", "type": "server_error"}}
        unreachable = await s.chat("mistral-small-latest")
        assert unreachable.status_code == 502
        assert unreachable.json()["error"]["type"] == "backend_unreachable"
        s.upstreams["openai"].replies.append(Reply(delay=2))
        slow = await s.chat("gpt-4o")
        assert slow.status_code == 504
        assert slow.json()["error"]["type"] == "backend_timeout"
        bad = await s.http.post(f"{s.url}/v1/chat/completions", content=b"{not json")
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request"
        nomodel = await s.http.post(f"{s.url}/v1/chat/completions", json={"messages": []})
        assert nomodel.status_code == 400 and "model" in nomodel.json()["error"]["message"]


async def test_auto_prefers_local_ollama_then_a_cloud_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with stack(tmp_path) as s:
        response = await s.chat("auto")
        assert response.json()["model"] == "auto (selected: ollama:llama3.2:3b)"
        assert s.upstreams["ollama"].received[-1].json["model"] == "llama3.2:3b"
        streamed = await s.chat("auto", stream=True)
        events = [line for line in streamed.text.splitlines() if line.startswith("data: {")]
        assert events and all(
            json.loads(e[6:])["model"] == "auto (selected: ollama:llama3.2:3b)" for e in events
        )
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider")
    async with stack(tmp_path, down=("ollama",)) as s:
        response = await s.chat("auto")
        assert response.json()["model"] == "auto (selected: openai:gpt-4o-mini)"
    monkeypatch.delenv("OPENAI_API_KEY")
    async with stack(tmp_path, down=("ollama",)) as s:
        response = await s.chat("auto")
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "backend_unreachable"


async def test_models_completions_and_embeddings_pass_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider")
    async with stack(tmp_path) as s:
        s.upstreams["openai"].model_ids.append("text-embedding-3-small")
        models = (await s.http.get(f"{s.url}/v1/models")).json()
        ids = [m["id"] for m in models["data"]]
        assert ids[0] == "auto" and "gpt-4o-mini" in ids and "llama3.2:3b" in ids
        assert "mistral-small-latest" not in ids  # no MISTRAL_API_KEY
        for path, model in (
            ("/v1/completions", "gpt-4o"),
            ("/v1/embeddings", "gpt-4o"),
            ("/v1/embeddings", "text-embedding-3-small"),
        ):
            body = {"model": model, "input": "x", "prompt": "y"}
            response = await s.http.post(s.url + path, json=body)
            assert response.status_code == 200 and response.json() == body
            assert s.upstreams["openai"].received[-1].path == path


async def test_memory_through_the_gateway_with_the_openai_client(tmp_path: Path) -> None:
    async with stack(tmp_path) as s:
        base = f"{s.url}/v1/partition/home/instance/kitchen"
        async with AsyncOpenAI(base_url=base, api_key="unused", max_retries=0) as ai:
            stream = await ai.chat.completions.create(
                model="llama3.2",
                stream=True,
                messages=[{"role": "user", "content": "The spare key is under the blue pot."}],
            )
            _ = [c async for c in stream]
            await ai.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "Where is the key?"}]
            )
        received = s.upstreams["ollama"].received[-1].text
        assert "The spare key is under the blue pot." in received
        assert "Echo: The spare key is under the blue pot." in received


async def test_rate_limit(tmp_path: Path) -> None:
    async with stack(tmp_path, rate_limit_per_minute=2) as s:
        codes = [(await s.chat("llama3.2")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        limited = await s.chat("llama3.2")
        assert limited.json()["error"]["type"] == "rate_limit_exceeded"
        assert int(limited.headers["retry-after"]) >= 1


@pytest.mark.timeout(180)
async def test_console_script_serve_and_demo(tmp_path: Path) -> None:
    upstream = Upstream()
    async with serve(upstream.app()) as upstream_url:
        port = free_port()
        env = {
            **os.environ,
            "RSV_PORT": str(port),
            "RSV_DATA_DIR": str(tmp_path / "mem"),
            "RSV_OPENAI_BASE_URL": f"{upstream_url}/v1/chat/completions",
            "RSV_CONFIG_FILE": str(tmp_path / "none.toml"),
            "OPENAI_API_KEY": "sk-p",
        }
        script = Path(sys.executable).with_name("reservoir")
        base = f"http://127.0.0.1:{port}"
        async with running([str(script), "serve"], env, f"{base}/health") as process:
            async with AsyncOpenAI(
                base_url=f"{base}/v1/partition/p/instance/i", api_key="k", max_retries=0
            ) as ai:
                reply = await ai.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "ping"}]
                )
            assert reply.choices[0].message.content == "Echo: ping"
        assert "memory in" in process.output
        assert f"127.0.0.1:{port}/v1/partition/" in process.output
    env = {**os.environ, "OPENAI_API_KEY": "", "RSV_CONFIG_FILE": str(tmp_path / "none.toml")}
    demo = await asyncio.to_thread(
        subprocess.run, [str(script), "demo"], env=env, capture_output=True, text=True, timeout=120
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "STAND-IN" in demo.stdout
    assert "The second session's request carried what was said in the first." in demo.stdout
    shown = demo.stdout.split("Before your question, memory gave me:")[-1]  # the model's view
    assert "user: Hi! I'm Ada. I keep two beehives" in shown
    usage = await asyncio.to_thread(
        subprocess.run, [str(script), "serve", "--port", "x"], capture_output=True, text=True
    )
    assert usage.returncode == 2 and "invalid int value" in usage.stderr


async def test_config_file_adds_providers_and_routes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = Upstream()
    async with serve(extra.app()) as extra_url:
        config = tmp_path / "reservoir.toml"
        config.write_text(
            f'[providers.groq]\nbase_url = "{extra_url}/v1/chat/completions"\n'
            'api_key_env = "GROQ_API_KEY"\n\n[model_routes]\n"llama-3.3-*" = "groq"\n'
        )
        monkeypatch.setenv("RSV_CONFIG_FILE", str(config))
        monkeypatch.setenv("GROQ_API_KEY", "gsk-test")
        async with stack(tmp_path) as s:
            response = await s.chat("llama-3.3-70b")  # would be Ollama's without the route
            assert response.status_code == 200
            assert extra.received[-1].headers["authorization"] == "Bearer gsk-test"
            assert s.upstreams["ollama"].received == []
