"""LiteLLM's proxy with memory (examples/litellm/proxy.py), run as a user would run it.

The real LiteLLM proxy runs in its own process, started once for this module, in
front of the stand-in model; requests go through it with the official `openai`
client and LiteLLM's master key. Only that process imports LiteLLM: it warns at
import time, and this suite turns warnings into errors.

LiteLLM is set to write `: ping` keep-alive comments into a stream while the model
is silent for PING_INTERVAL seconds; the stand-in answers after SLOW seconds where
a test wants them on the wire.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import APIStatusError, AsyncOpenAI, OpenAI

from reservoir_middleware.asgi._replies import completion_chunk, sse_events
from tests.blocks import block_of, unblocked
from tests.conftest import free_port
from tests.servers import serve_in_thread
from tests.upstream import Reply, Upstream

ROOT = Path(__file__).resolve().parents[1]
PROXY = ROOT / "examples" / "litellm" / "proxy.py"
STARTUP_TIMEOUT = 90.0
# The parent and each worker import LiteLLM (~10 s of CPU each): on a busy 2-core
# machine, two workers take minutes to start.
WORKERS_STARTUP_TIMEOUT = 300.0
PING_INTERVAL = 0.2
SLOW = 1.0
UPSTREAM_KEY = "sk-upstream-" + secrets.token_hex(8)

CONFIG = f"""\
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_base: os.environ/UPSTREAM_BASE_URL
      api_key: os.environ/OPENAI_API_KEY
litellm_settings:
  num_retries: 0
  request_timeout: 30
  sse_keepalive_ping_interval_seconds: {PING_INTERVAL}
"""

# Keep the proxy off the network.
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # else fetched from GitHub at import (3 tries, ~7 s)
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_TELEMETRY_DISABLED": "True",
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
    "LITELLM_MODE": "PRODUCTION",  # no `.env` of the working directory
    "ORT_DISABLE_TELEMETRY": "1",  # onnxruntime (the embedding model) reports to Microsoft
}
# The developer's own memory settings, LiteLLM settings and database stay out.
FOREIGN_PREFIXES = ("RSV_", "LITELLM_", "OPENAI_", "REDIS_")
FOREIGN_NAMES = {"DATABASE_URL", "DIRECT_URL", "NUM_WORKERS", "DEBUG", "DETAILED_DEBUG"}
FOREIGN_NAMES.add("TIMEOUT_WORKER_HEALTHCHECK")  # read by `litellm --num_workers`


@dataclass
class Proxy:
    url: str
    key: str
    upstream: Upstream

    def client(
        self, partition: str | None = None, instance: str | None = None, key: str | None = None
    ) -> AsyncOpenAI:
        base = f"{self.url}/v1"
        if partition is not None:
            base = f"{base}/partition/{partition}/instance/{instance}"
        return AsyncOpenAI(base_url=base, api_key=key or self.key, max_retries=0, timeout=30)

    async def ask(self, partition: str, instance: str, text: str, **extra: Any) -> Any:
        async with self.client(partition, instance) as ai:
            return await ai.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": text}], **extra
            )


def proxy_env(tmp: Path, upstream_url: str, key: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(FOREIGN_PREFIXES) and k not in FOREIGN_NAMES
    }
    env.update(
        OFFLINE_ENV,
        LITELLM_MASTER_KEY=key,
        UPSTREAM_BASE_URL=f"{upstream_url}/v1",
        OPENAI_API_KEY=UPSTREAM_KEY,
        RSV_DATA_DIR=str(tmp / "memory"),
        RSV_CONFIG_FILE=str(tmp / "no-config.toml"),
        **extra,
    )
    return env


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("litellm")
    upstream = Upstream()
    with serve_in_thread(upstream.app()) as upstream_url:
        (tmp / "config.yaml").write_text(CONFIG)
        port, key = free_port(), "sk-" + secrets.token_hex(24)
        env = proxy_env(tmp, upstream_url, key)
        command = [sys.executable, str(PROXY), "--config", str(tmp / "config.yaml")]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        output = tmp / "proxy.log"
        with output.open("wb") as log:
            process = subprocess.Popen(command, env=env, cwd=tmp, stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_until_live(process, url, output)
            yield Proxy(url, key, upstream)
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _wait_until_live(
    process: subprocess.Popen[bytes], url: str, output: Path, timeout: float = STARTUP_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as http:
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                if http.get(f"{url}/health/liveliness").status_code == 200:
                    return
            time.sleep(0.1)
    if process.poll() is None:
        problem = f"did not answer /health/liveliness within {timeout:.0f} s"
    else:
        problem = f"exited with code {process.returncode}"
    tail = "\n".join(output.read_text(errors="replace").splitlines()[-60:])
    pytest.fail(f"the LiteLLM proxy {problem}; its output:\n{tail}", pytrace=False)


def data_events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def tool_call_stream(name: str, arguments: list[str]) -> list[bytes]:
    """An OpenAI-style stream of one tool call, its arguments in pieces."""
    call = {"index": 0, "id": "call_1", "type": "function"}
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": None, "tool_calls": [{**call, "function": {"name": name}}]}
    ]
    deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": a}}]} for a in arguments]
    deltas.append({})
    last = len(deltas) - 1
    chunks = [
        completion_chunk(
            d,
            "gpt-4o",
            finish_reason="tool_calls" if i == last else None,
            completion_id="chatcmpl-tool",
            created=0,
        )
        for i, d in enumerate(deltas)
    ]
    return sse_events(chunks)


async def test_memory_is_recalled_and_isolated(proxy: Proxy) -> None:
    answer = await proxy.ask("acme", "alice", "My cat is named Turnip.")
    assert answer.choices[0].message.content == "Echo: My cat is named Turnip."
    assert proxy.upstream.received[-1].path == "/v1/chat/completions"

    # a later request that sends no history: the model is sent the earlier exchange
    await proxy.ask("acme", "alice", "What is my cat called?")
    received = proxy.upstream.received[-1]
    assert "My cat is named Turnip." in received.text
    assert "Echo: My cat is named Turnip." in received.text
    assert unblocked(received.messages[-1]) == {"role": "user", "content": "What is my cat called?"}
    # LiteLLM calls the model with its own key: the master key stays in the proxy
    assert received.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"

    for partition, instance in [("acme", "bob"), ("other", "alice")]:
        await proxy.ask(partition, instance, "What is my cat called?")
        assert "Turnip" not in proxy.upstream.received[-1].text


async def test_each_request_starts_with_the_previous_one_through_the_proxy(proxy: Proxy) -> None:
    """The provider's prompt cache: a client re-sending its history sends, through
    LiteLLM, what it sent before plus the new turns; memory stays in place."""
    await proxy.ask("cache", "dora", "My brother Theo repairs old Vespas in Turin.")
    history: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."}]
    start = len(proxy.upstream.received)
    async with proxy.client("cache", "dora") as ai:
        for text in ("What does my brother do?", "Where is his workshop?", "Thanks!"):
            history.append({"role": "user", "content": text})
            reply = await ai.chat.completions.create(model="gpt-4o", messages=history)  # type: ignore[arg-type]
            history.append({"role": "assistant", "content": reply.choices[0].message.content})
    sent = [r.messages for r in proxy.upstream.received[start:]]
    block = block_of(sent[0][-1])
    assert "Theo repairs old Vespas" in block  # memory, on the first turn, with its date
    assert re.search(r"\n\d{1,2} [A-Z][a-z]{2} \d{4}:\nuser: My brother Theo", block)
    for before, after in itertools.pairwise(sent):
        assert after[: len(before)] == before  # the whole previous request, byte for byte


async def test_streamed_answer_is_recorded(proxy: Proxy) -> None:
    # the model is slow to answer, so LiteLLM sends `: ping` comments first
    text = "Fredville is the capital of Freedonia, on the Silver river."
    proxy.upstream.replies.append(Reply(content=text, delay=SLOW))
    async with proxy.client("geo", "carol") as ai:
        stream = await ai.chat.completions.create(
            model="gpt-4o",
            stream=True,
            messages=[{"role": "user", "content": "Which city is the capital of Freedonia?"}],
        )
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(pieces) == text

    await proxy.ask("geo", "carol", "Remind me: which river was it on?")
    assert text in proxy.upstream.received[-1].text


async def test_streamed_tool_call_is_recorded(proxy: Proxy) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    raw = tool_call_stream("get_weather", ['{"city', '": "Ly', 'on"}'])
    proxy.upstream.replies.append(Reply(raw=raw, delay=SLOW))
    async with (
        proxy.client("travel", "dave") as ai,
        ai.chat.completions.with_streaming_response.create(
            model="gpt-4o",
            stream=True,
            tools=tools,  # type: ignore[arg-type]
            messages=[{"role": "user", "content": "Is it raining in Lyon?"}],
        ) as response,
    ):
        lines = [line async for line in response.iter_lines() if line]
    assert proxy.upstream.received[-1].json["tools"][0]["function"]["name"] == "get_weather"
    assert ": ping" in lines  # LiteLLM's keep-alive while the model was silent
    assert lines[-1] == "data: [DONE]"
    calls = [
        call
        for event in data_events(lines)
        for choice in event["choices"]
        for call in choice["delta"].get("tool_calls") or []
    ]
    assert calls[0]["function"]["name"] == "get_weather"
    assert "".join(c["function"].get("arguments") or "" for c in calls) == '{"city": "Lyon"}'

    await proxy.ask("travel", "dave", "Thanks. What did you look up for me?")
    assert '[called tools] get_weather({"city": "Lyon"})' in proxy.upstream.received[-1].text


async def test_error_event_in_a_stream_stores_nothing(proxy: Proxy) -> None:
    # the model fails after LiteLLM has sent its first ping, hence its 200 status line:
    # the failure arrives as a `data: {"error": ...}` event
    proxy.upstream.replies.append(Reply(status=500, delay=SLOW))
    count = len(proxy.upstream.received)
    async with (
        proxy.client("ops", "erin") as ai,
        ai.chat.completions.with_streaming_response.create(
            model="gpt-4o",
            stream=True,
            messages=[{"role": "user", "content": "Has the nightly deploy finished?"}],
        ) as response,
    ):
        assert response.status_code == 200
        lines = [line async for line in response.iter_lines() if line]
        assert lines[0] == ": ping"
    assert "error" in data_events(lines)[-1]
    assert len(proxy.upstream.received) == count + 1  # LiteLLM did not retry

    await proxy.ask("ops", "erin", "And the backup?")
    received = proxy.upstream.received[-1]  # a failed exchange left no memory behind
    assert received.messages == [{"role": "user", "content": "And the backup?"}]


async def test_litellm_routes_and_auth_still_work(proxy: Proxy) -> None:
    async with proxy.client() as ai:
        models = await ai.models.list()
    assert "gpt-4o" in [model.id for model in models.data]
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(f"{proxy.url}/health/liveliness")).status_code == 200

    count = len(proxy.upstream.received)
    async with proxy.client("vault", "mallory", key="sk-not-the-master-key") as ai:
        with pytest.raises(APIStatusError):
            await ai.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "Hello?"}]
            )
    async with httpx.AsyncClient(timeout=10) as http:
        refused = await http.post(
            f"{proxy.url}/v1/partition/vault/instance/mallory/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello?"}]},
        )
    # LiteLLM imports `prisma` (not part of litellm[proxy]) to classify the error
    assert refused.status_code == (401 if importlib.util.find_spec("prisma") else 500)
    assert len(proxy.upstream.received) == count


async def test_refused_request_stores_nothing(proxy: Proxy) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        refused = await http.post(
            f"{proxy.url}/v1/partition/bank/instance/trent/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "Vault code 4711."}]},
        )
    assert refused.status_code >= 400
    await proxy.ask("bank", "trent", "What is the vault code?")
    assert "4711" not in proxy.upstream.received[-1].text


async def test_memory_header_through_litellm(proxy: Proxy) -> None:
    """`X-Reservoir-Memory` is read by the middleware in front of LiteLLM, never
    forwarded; the response says what memory did."""

    async def ask(text: str, mode: str) -> str | None:
        async with proxy.client("desk", "frank") as ai:
            raw = await ai.chat.completions.with_raw_response.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": text}],
                extra_headers={"X-Reservoir-Memory": mode},
            )
        assert "x-reservoir-memory" not in proxy.upstream.received[-1].headers
        return raw.headers.get("x-reservoir-status")

    await proxy.ask("desk", "frank", "My locker is number 31.")
    assert await ask("The safe code is 9090.", "off") == "memory=off"
    assert proxy.upstream.received[-1].messages[0]["content"] == "The safe code is 9090."
    assert await ask("Which locker is mine?", "read") == "memory=read"
    assert "My locker is number 31." in proxy.upstream.received[-1].text
    await proxy.ask("desk", "frank", "What did I tell you?")
    later = proxy.upstream.received[-1].text
    assert "My locker is number 31." in later
    assert "9090" not in later and "Which locker is mine?" not in later  # neither was kept
    async with proxy.client("desk", "frank") as ai:
        with pytest.raises(APIStatusError) as refused:
            await ai.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "Hello?"}],
                extra_headers={"X-Reservoir-Memory": "maybe"},
            )
    assert refused.value.status_code == 400


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def memory_loaded(pid: int) -> bool:
    """The process has the embedding model (onnxruntime) loaded, as the middleware
    does at start-up; LiteLLM alone does not load it."""
    try:
        return "onnxruntime" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_workers_without_a_chroma_server_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG)
    env = proxy_env(tmp_path, "http://127.0.0.1:9", "sk-" + secrets.token_hex(24))
    command = [sys.executable, str(PROXY), "--config", str(tmp_path / "config.yaml")]
    done = subprocess.run(
        [*command, "--num_workers", "2"], env=env, cwd=tmp_path, capture_output=True, timeout=120
    )
    assert done.returncode != 0
    assert b"need a Chroma server" in done.stderr and b"RSV_CHROMA_URL" in done.stderr


def test_a_spawned_worker_runs_the_script_without_importing_litellm() -> None:
    """uvicorn spawns its workers: each first runs proxy.py again as `__mp_main__`
    and answers the supervisor's health checks only after that. Importing LiteLLM
    there took longer than the 5 s the supervisor waits on a busy machine, and it
    killed and replaced the workers before they started."""
    code = (
        "import multiprocessing.spawn, sys\n"
        "multiprocessing.spawn.import_main_path(sys.argv[1])\n"
        "heavy = ('litellm', 'chromadb', 'onnxruntime', 'reservoir_middleware')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_PREFIXES)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(PROXY)], env=env, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.decode().strip() == "[]"


@pytest.mark.slow
@pytest.mark.timeout(WORKERS_STARTUP_TIMEOUT + 300)
def test_uvicorn_workers_under_litellm_all_have_memory(tmp_path: Path, chroma_server: str) -> None:
    """`--num_workers 2`: each worker adds the middleware to its own app, and they
    share memory through the Chroma server."""
    from .test_workers import children, server_side_owner

    upstream = Upstream()
    partition = f"lw{secrets.token_hex(5)}"  # the Chroma server is shared by the session
    with serve_in_thread(upstream.app()) as upstream_url:
        (tmp_path / "config.yaml").write_text(CONFIG)
        port, key = free_port(), "sk-" + secrets.token_hex(24)
        # Every answer must come with memory: on a busy machine the first requests to a
        # worker took over the 5 s memory budget, and were forwarded without it.
        env = proxy_env(
            tmp_path, upstream_url, key, RSV_CHROMA_URL=chroma_server, RSV_MEMORY_TIMEOUT_MS="60000"
        )
        command = [sys.executable, str(PROXY), "--config", str(tmp_path / "config.yaml")]
        command += ["--port", str(port), "--num_workers", "2"]
        output = tmp_path / "proxy.log"
        with output.open("wb") as log:
            process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_until_live(process, url, output, WORKERS_STARTUP_TIMEOUT)
            served: set[int] = set()

            def remember_and_recall(n: int) -> None:  # on a connection of its own
                base = f"{url}/v1/partition/{partition}/instance/u{n}"
                with OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60) as ai:
                    for text in (f"My badge number is {7000 + n}.", "What is my badge number?"):
                        raw = ai.chat.completions.with_raw_response.create(
                            model="gpt-4o", messages=[{"role": "user", "content": text}]
                        )
                        assert "x-reservoir-trace-id" in raw.headers  # this worker has memory
                        stream = raw.http_response.extensions["network_stream"]
                        client_port = stream.get_extra_info("client_addr")[1]
                        served.add(server_side_owner(port, client_port, children(process.pid)))

            with ThreadPoolExecutor(6) as pool:
                list(pool.map(remember_and_recall, range(16)))
            questions = [r for r in upstream.received if "What is my badge" in r.body.decode()]
            for received in questions:
                messages = received.json["messages"]
                asked = json.dumps(messages)
                badge = [m for m in messages if "My badge number is" in str(m.get("content"))]
                assert badge, f"the fact was not recalled: {asked}"
            # Which worker accepts a connection is the kernel's choice (often always the
            # same one), so show instead that every worker loaded the memory at start-up
            # (uvicorn may replace a worker that starts slowly: look at the live ones).
            deadline = time.monotonic() + WORKERS_STARTUP_TIMEOUT
            while True:
                spawned = {p for p in children(process.pid) if "spawn_main" in cmdline(p)}
                loaded = {p for p in spawned if memory_loaded(p)}
                if (len(loaded) >= 2 and loaded == spawned) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert len(loaded) == 2 and loaded == spawned, (spawned, loaded)
            logged = output.read_text(errors="replace")
            assert " died" not in logged, f"uvicorn replaced a worker as hung:\n{logged[-3000:]}"
            assert served <= loaded | {p for p in served if not Path(f"/proc/{p}").exists()}
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
