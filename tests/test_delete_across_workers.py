"""A delete across worker processes sharing a data directory and a Chroma server: it
never rewrites another live worker's journal, an exchange that worker began before the
delete is not stored after it, and when that worker is SIGKILLed everything it
acknowledged is replayed while nothing deleted comes back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI

from tests.conftest import free_port, running, serve
from tests.test_deletion import files_holding
from tests.test_durability import ADMIN, chroma_process, recent_texts, serve_env
from tests.upstream import Reply, Upstream

pytestmark = pytest.mark.slow

SCRIPT = str(Path(sys.executable).with_name("reservoir"))


async def ask(base: str, scope: str, text: str) -> list[str]:
    """One acknowledged exchange (the whole answer received)."""
    url = f"{base}/v1/partition/{scope}/instance/i"
    async with AsyncOpenAI(base_url=url, api_key="k", max_retries=0, timeout=60) as ai:
        reply = await ai.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": text}]
        )
    assert reply.choices[0].message.content == f"Echo: {text}"
    return [text, f"Echo: {text}"]


async def until(http: httpx.AsyncClient, base: str, wanted: dict[str, list[str]]) -> None:
    """Wait (bounded) until the scopes hold exactly these texts."""
    stored: dict[str, list[str]] = {}
    for _ in range(300):
        stored = {scope: await recent_texts(http, base, scope) for scope in wanted}
        if stored == wanted:
            return
        await asyncio.sleep(0.2)
    assert stored == wanted


def journal_of(data_dir: Path, pid: int) -> Path:
    found = list((data_dir / "journal").glob(f"*-{pid}-*.jsonl"))
    assert len(found) == 1, found
    return found[0]


async def wait_for_bytes_gone(path: Path, marker: bytes) -> None:
    for _ in range(300):
        if marker not in await asyncio.to_thread(path.read_bytes):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} still holds the deleted text")


@pytest.mark.timeout(600)
async def test_a_delete_in_one_worker_and_a_sigkill_of_the_other(tmp_path: Path) -> None:
    marker = f"zebra-{secrets.token_hex(6)}"
    data_dir = tmp_path / "mem"
    upstream = Upstream()
    chroma_port = free_port()
    chroma = f"http://127.0.0.1:{chroma_port}"
    expected: dict[str, list[str]] = {"gone": [], "stays": [], "other": []}
    async with (
        serve(upstream.app()) as upstream_url,
        httpx.AsyncClient(timeout=30) as http,
        contextlib.AsyncExitStack() as first_server,
    ):
        await first_server.enter_async_context(chroma_process(tmp_path / "chroma", chroma_port))
        port_a, port_b = free_port(), free_port()
        base_a, base_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
        env_a = serve_env(tmp_path, upstream_url, port_a, RSV_CHROMA_URL=chroma)
        env_b = serve_env(tmp_path, upstream_url, port_b, RSV_CHROMA_URL=chroma)
        async with (
            running([SCRIPT, "serve"], env_a, f"{base_a}/health", timeout=180),
            running([SCRIPT, "serve"], env_b, f"{base_b}/health", timeout=180) as worker_b,
        ):
            await ask(base_a, "gone", f"A heard {marker}-a")
            await ask(base_b, "gone", f"B heard {marker}-b")
            expected["stays"] += await ask(base_b, "stays", "B keeps the blue kettle")
            journal_b = journal_of(data_dir, worker_b.popen.pid)
            await until(http, base_a, {"stays": expected["stays"]})
            assert marker.encode() in journal_b.read_bytes()

            # B streams an answer in the scope; A deletes the scope meanwhile
            gate = asyncio.Event()
            upstream.replies.append(Reply(gate=gate))
            body = {
                "model": "gpt-4o",
                "stream": True,
                "messages": [{"role": "user", "content": f"in flight {marker}-flight"}],
            }
            url_b = f"{base_b}/v1/partition/gone/instance/i/chat/completions"
            inode = os.stat(journal_b).st_ino
            async with http.stream("POST", url_b, json=body) as stream:
                chunks = stream.aiter_bytes()
                assert b"data:" in await anext(chunks)
                deleted = await http.delete(
                    f"{base_a}/v1/partition/gone/instance/i/memory",
                    headers={"Authorization": f"Bearer {ADMIN}"},
                )
                assert deleted.json() == {"deleted": 1}
                # A did not rewrite the file B holds and appends to
                assert os.stat(journal_b).st_ino == inode
                gate.set()
                assert b"[DONE]" in b"".join([chunk async for chunk in chunks])
            # B learns of the delete at its next write and purges its own file
            await wait_for_bytes_gone(journal_b, marker.encode())
            await until(http, base_a, {"gone": [], "stays": expected["stays"]})

            # the Chroma server goes away: what B acknowledges now waits in its journal
            await first_server.aclose()
            for n in range(3):
                expected["stays"] += await ask(base_b, "stays", f"stays fact {n}: drawer {n}")
                expected["other"] += await ask(base_b, "other", f"other fact {n}: shelf {n}")
            expected["gone"] += await ask(base_b, "gone", "said after the delete")
            await asyncio.sleep(1.0)  # the writer tries, and fails
            worker_b.popen.kill()
            await asyncio.to_thread(worker_b.popen.wait, 30)

            # the server is back; a new worker starts and replays what B left
            port_c = free_port()
            base_c = f"http://127.0.0.1:{port_c}"
            env_c = serve_env(tmp_path, upstream_url, port_c, RSV_CHROMA_URL=chroma)
            async with (
                chroma_process(tmp_path / "chroma", chroma_port),
                running([SCRIPT, "serve"], env_c, f"{base_c}/health", timeout=180) as worker_c,
            ):
                await until(http, base_c, expected)
        assert "storing memory failed" in worker_b.output
        assert "replaying" in worker_c.output
    assert files_holding(data_dir, marker.encode()) == []
