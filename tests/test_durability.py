"""Memory survives what production throws at it: a SIGKILLed gateway, a Chroma
server that goes away mid-traffic, several processes writing one scope."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from reservoir_middleware import Reservoir

from .conftest import CHROMA, free_port, make_settings, running, serve
from .upstream import Upstream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ADMIN = "admin-key-for-tests"


def serve_env(tmp_path: Path, upstream_url: str, port: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "RSV_PORT": str(port),
        "RSV_DATA_DIR": str(tmp_path / "mem"),
        "RSV_OPENAI_BASE_URL": f"{upstream_url}/v1",
        "RSV_CONFIG_FILE": str(tmp_path / "none.toml"),
        "RSV_ADMIN_KEY": ADMIN,
        "OPENAI_API_KEY": "sk-p",
        **extra,
    }


async def recent_texts(http: httpx.AsyncClient, base: str, scope: str) -> list[str]:
    response = await http.get(
        f"{base}/v1/partition/{scope}/instance/i/memory/recent?limit=500",
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert response.status_code == 200, response.text
    return [r["text"] for r in response.json()["messages"]]


async def test_sigkill_loses_no_answered_exchange(tmp_path: Path) -> None:
    """The gateway is killed while answered exchanges still wait to be written (its
    Chroma server is down, so every write fails and waits for a retry): after a
    restart, with the server back, every exchange whose response completed is in
    memory, once, replayed from the journal."""
    script = str(Path(sys.executable).with_name("reservoir"))
    upstream = Upstream()
    chroma_port = free_port()
    sent: dict[str, list[str]] = {"alpha": [], "beta": []}
    async with serve(upstream.app()) as upstream_url:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        chroma = f"http://127.0.0.1:{chroma_port}"
        env = serve_env(tmp_path, upstream_url, port, RSV_CHROMA_URL=chroma)
        async with running([script, "serve"], env, f"{base}/health") as process:
            for scope in sent:
                async with AsyncOpenAI(
                    base_url=f"{base}/v1/partition/{scope}/instance/i", api_key="k", max_retries=0
                ) as ai:
                    for n in range(3):
                        text = f"{scope} fact number {n}: the {scope} key is in drawer {n}"
                        messages: list[ChatCompletionMessageParam] = [
                            {"role": "user", "content": text}
                        ]
                        if (n + (scope == "beta")) % 2:
                            stream = await ai.chat.completions.create(
                                model="gpt-4o", messages=messages, stream=True
                            )
                            parts = [c.choices[0].delta.content or "" async for c in stream]
                            answer = "".join(parts)
                        else:
                            reply = await ai.chat.completions.create(
                                model="gpt-4o", messages=messages
                            )
                            answer = reply.choices[0].message.content or ""
                        assert answer == f"Echo: {text}"
                        sent[scope] += [text, answer]
            await asyncio.sleep(1.0)  # the writer tries (and fails) meanwhile
            process.popen.kill()
            await asyncio.to_thread(process.popen.wait, 30)
        assert "storing memory failed" in process.output  # the writes were tried, and failed
        assert list((tmp_path / "mem" / "journal").glob("*.jsonl")), "no journal left behind"

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = serve_env(tmp_path, upstream_url, port, RSV_CHROMA_URL=chroma)
        async with (
            chroma_process(tmp_path / "chroma", chroma_port),
            running([script, "serve"], env, f"{base}/health") as process,
            httpx.AsyncClient(timeout=10) as http,
        ):
            for _ in range(150):
                stored = {s: await recent_texts(http, base, s) for s in sent}
                if stored == sent:
                    break
                await asyncio.sleep(0.2)
        assert stored == sent, process.output[-3000:]
        assert "replaying 6 unsaved exchanges" in process.output


@contextlib.asynccontextmanager
async def chroma_process(path: Path, port: int) -> AsyncIterator[subprocess.Popen[bytes]]:
    log = (path.parent / f"chroma-{port}-{time.monotonic_ns()}.log").open("wb")
    argv = [CHROMA, "run", "--path", str(path), "--port", str(port), "--host", "127.0.0.1"]
    process = subprocess.Popen(argv, stdout=log, stderr=log)  # noqa: ASYNC220
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"http://127.0.0.1:{port}/api/v2/heartbeat")).is_success:
                        break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("chroma run did not start")
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            await asyncio.to_thread(process.wait, 20)
        log.close()


async def test_chroma_server_down_then_back(tmp_path: Path) -> None:
    """Chroma stops mid-traffic: requests keep flowing un-enriched (degraded), the
    answers wait and are stored when it returns, and enrichment resumes by itself."""
    from reservoir_middleware import ReservoirMiddleware

    port = free_port()
    data = tmp_path / "chroma"
    upstream = Upstream()
    reservoir = Reservoir(
        make_settings(tmp_path, chroma_url=f"http://127.0.0.1:{port}", memory_timeout_ms=3000)
    )
    app = ReservoirMiddleware(upstream.app(), reservoir=reservoir)
    sent: list[str] = []

    async def ask(http: httpx.AsyncClient, url: str, text: str) -> httpx.Response:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
        response = await http.post(f"{url}/v1/partition/p/instance/i/chat/completions", json=body)
        assert response.status_code == 200, response.text
        sent.extend([text, f"Echo: {text}"])
        return response

    async with serve(app) as url, httpx.AsyncClient(timeout=30) as http:
        async with chroma_process(data, port):
            first = await ask(http, url, "my bike is the red one in the garage")
            assert "x-reservoir-status" not in first.headers
            await reservoir.settle(timeout=30)
        down = [
            await ask(http, url, f"while down, note {n}: the shed code is {n}4{n}")
            for n in range(3)
        ]
        assert all(r.headers.get("x-reservoir-status") == "degraded" for r in down)
        async with chroma_process(data, port):
            back = await ask(http, url, "where is my bike?")
            assert "x-reservoir-status" not in back.headers
            received = json.dumps(upstream.received[-1].json["messages"])
            assert "red one in the garage" in received  # enriched again
            await reservoir.settle(timeout=90)
            stored = [r.text for r in await reservoir.recent("p", "i", limit=100)]
    assert stored == sent


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from reservoir_middleware import Reservoir, ReservoirSettings
    from reservoir_middleware.records import Answer

    async def main(worker, url, data, turns):
        r = Reservoir(ReservoirSettings(chroma_url=url, data_dir=Path(data), write_delay_ms=5))
        await r.warm_up()
        history = []
        for n in range(turns):
            history.append({"role": "user", "content": f"worker {worker} turn {n} says hello"})
            e = await r.enrich("shared", "scope", {"model": "gpt-4o", "messages": history},
                               store="with_answer")
            text = f"answer to worker {worker} turn {n}"
            r.record_answer(e, Answer(content=text, finish_reason="stop"))
            history.append({"role": "assistant", "content": text})
            await asyncio.sleep(0.01)
        await r.settle(timeout=60)

    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])))
    """
)


async def test_worker_processes_share_one_scope_on_a_server(
    tmp_path: Path, chroma_server: str
) -> None:
    """Several processes write the same scope at once through a Chroma server:
    sequence numbers stay unique and gap-free, each conversation keeps its order
    and its id chain, and every message links to the one stored before it."""
    workers, turns = 4, 12
    argv = [sys.executable, "-c", WRITER]
    procs = [
        await asyncio.create_subprocess_exec(
            *argv,
            str(w),
            chroma_server,
            str(tmp_path / "shared"),
            str(turns),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        for w in range(workers)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 180)
    for proc, (out, _) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out.decode()[-3000:]

    reader = Reservoir(make_settings(tmp_path / "reader", chroma_url=chroma_server))
    records = await reader.recent("shared", "scope", limit=500)
    assert len(records) == workers * turns * 2
    assert [r.seq for r in records] == list(range(len(records)))
    by_id = {r.id: r for r in records}
    for before, record in itertools.pairwise(records):
        assert record.before_id == before.id
    for w in range(workers):
        mine = [r for r in records if f"worker {w} " in r.text]
        expected = []
        for n in range(turns):
            expected += [f"worker {w} turn {n} says hello", f"answer to worker {w} turn {n}"]
        assert [r.text for r in mine] == expected
        for prev, record in itertools.pairwise(mine):
            assert record.prev_id == prev.id and by_id[record.prev_id] is prev
