"""Embedded Chroma runs in a child process of the gateway (`chroma_process="child"`, the
default), so that writes never hold the gateway's interpreter. The child is the
gateway's alone: it dies with it (even on SIGKILL), it is started again if it dies,
it embeds what is written with the same model, and requests read their memory from
the gateway's in-memory copy (an HNSW index of the scope) that agrees with Chroma."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from openai import AsyncOpenAI

from reservoir_middleware import Reservoir, ReservoirSettings
from reservoir_middleware.records import Scope
from tests.conftest import chroma_store, free_port, running, serve
from tests.upstream import Upstream

SCRIPT = str(Path(sys.executable).with_name("reservoir"))
CHILD_MODULE = b"reservoir_middleware.storage._child"  # `python -m` of the Chroma child


def chroma_children(pid: int) -> set[int]:
    """Processes whose parent is `pid` and that run our Chroma child."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and CHILD_MODULE in cmdline:
                found.add(int(entry))
    return found


def alive(pids: set[int]) -> bool:
    """Any of them running (a zombie, dead but not reaped yet, is not)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return True
    return False


async def gone(pids: set[int], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pids):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


def count_inline(data_dir: Path, scope: Scope) -> int:
    """What Chroma holds on disk, read without a child (after the gateway is gone)."""
    settings = ReservoirSettings(data_dir=data_dir, chroma_process="inline")
    return Reservoir(settings).store.count(scope)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_the_child_dies_with_the_gateway_and_what_was_answered_is_kept(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "memory"
    port = free_port()
    upstream = Upstream()
    async with serve(upstream.app()) as upstream_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RSV_")}
        env.update(
            RSV_CONFIG_FILE=str(tmp_path / "none.toml"),
            RSV_DATA_DIR=str(data_dir),
            RSV_PORT=str(port),
            RSV_OPENAI_BASE_URL=f"{upstream_url}/v1",
            OPENAI_API_KEY="sk-test",
        )
        base = f"http://127.0.0.1:{port}"
        async with running([SCRIPT, "serve"], env, f"{base}/health", timeout=180) as process:
            url = f"{base}/v1/partition/child/instance/a"
            async with AsyncOpenAI(base_url=url, api_key="k", max_retries=0, timeout=60) as ai:
                for text in ("my sister is called Ada", "she lives in Lisbon"):
                    await ai.chat.completions.create(
                        model="gpt-4o", messages=[{"role": "user", "content": text}]
                    )
                deadline = time.monotonic() + 60
                while not (kids := chroma_children(process.popen.pid)):
                    assert time.monotonic() < deadline, "no Chroma child process"
                    await asyncio.sleep(0.1)
                assert len(kids) == 1
                reply = await ai.chat.completions.with_raw_response.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "where does Ada live?"}]
                )
            status = reply.headers.get("x-reservoir-status")
            recalled = upstream.received[-1].text
            process.popen.send_signal(signal.SIGKILL)
            assert await gone(kids), "the Chroma child outlived its gateway"
        assert status != "degraded", process.output[-5000:]
        assert "Lisbon" in recalled  # memory came through the child
    # every answered exchange is on disk (written, or replayed from the journal next start)
    settings = ReservoirSettings(data_dir=data_dir, chroma_process="inline")
    engine = Reservoir(settings)
    await engine.warm_up()  # replays what the journal still holds
    await engine.settle()
    texts = [r.text for r in await engine.recent("child", "a", limit=20)]
    assert "my sister is called Ada" in texts and "where does Ada live?" in texts
    assert sum(t.startswith("Echo:") for t in texts) == 3


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_killed_child_is_started_again_and_memory_goes_on(tmp_path: Path) -> None:
    engine = Reservoir(ReservoirSettings(data_dir=tmp_path / "memory"))
    await engine.warm_up()
    server = chroma_store(engine).server
    assert server is not None and server.alive()
    first = server._proc.pid if server._proc is not None else 0
    assert first in chroma_children(os.getpid())
    await engine.add("p", "i", [{"role": "user", "content": "the boat is called Marlin"}])

    os.kill(first, signal.SIGKILL)
    assert await gone({first})
    await engine.add("p", "i", [{"role": "user", "content": "the dog is called Rex"}])
    texts = [r.text for r in await engine.recent("p", "i")]
    assert texts == ["the boat is called Marlin", "the dog is called Rex"]
    assert server.alive() and server._proc is not None and server._proc.pid != first
    second = server._proc.pid
    enriched = await engine.enrich("p", "i", {"messages": [{"role": "user", "content": "boat?"}]})
    assert "Marlin" in str(enriched.body)
    await engine.close()  # stores the enriched question first
    assert await gone({second})
    assert count_inline(tmp_path / "memory", Scope("p", "i")) == 3  # once each


async def test_the_child_embeds_like_this_process(tmp_path: Path) -> None:
    engine = Reservoir(ReservoirSettings(data_dir=tmp_path / "memory"))
    await engine.warm_up()
    server = chroma_store(engine).server
    assert server is not None and server.embed_threads
    texts = ["Café au lait ☕ at 7", "the quarterly report is due on Friday", "x" * 3000]
    theirs = server.embed(texts)
    ours = engine.embedder(texts)
    for a, b in zip(theirs, ours, strict=True):
        assert float(np.dot(a, b)) > 0.9999

    before = server.embedded  # what is written is embedded in the child...
    await engine.add("p", "i", [{"role": "user", "content": "the kettle is blue"}])
    assert server.embedded == before + 1
    bulk = [{"role": "user", "content": f"imported line {n}"} for n in range(80)]
    await engine.add("p", "i", bulk)  # ...but an import here, with all our threads
    assert server.embedded == before + 1
    assert len(await engine.recent("p", "i", limit=100)) == 81
    await engine.close()


@pytest.mark.timeout(300)
async def test_the_in_memory_index_finds_the_nearest_messages(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    words = [f"w{i}" for i in range(400)]
    messages = [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "content": " ".join(rng.choice(words, size=8)) + f" number {i}",
        }
        for i in range(1500)
    ]
    engine = Reservoir(ReservoirSettings(data_dir=tmp_path / "memory"))
    await engine.warm_up()
    await engine.add("p", "i", messages)
    await engine.preload("p", "i")  # the scope's copy and its HNSW index
    scope = Scope("p", "i")
    collection = chroma_store(engine).collection(scope)
    assert collection is not None
    stored = collection.get(include=["embeddings"])  # the exact answer, by brute force
    matrix = np.asarray(stored["embeddings"], dtype=np.float64)
    overlap = []
    for query in ("w1 w2 w3", "number 700", "w399 w12 w77 w5", "something else entirely"):
        vector = cast("list[float]", engine.embedder([query])[0])  # an array: a sequence
        exact = {stored["ids"][i] for i in np.argsort(-(matrix @ vector))[:20]}
        ours = engine.store.nearest(scope, vector, 20)
        assert len(ours) == 20 and ours == sorted(ours, key=lambda hit: -hit[1])
        overlap.append(len({i for i, _ in ours} & exact) / 20)
        records = engine.store.query(scope, vector, 20)  # the read API plugins use
        assert [(r.id, round(s, 6)) for r, s in records] == [(i, round(s, 6)) for i, s in ours]
    assert sum(overlap) / len(overlap) >= 0.95 and min(overlap) >= 0.85, overlap
    await engine.close()


async def test_inline_mode_keeps_chroma_in_this_process(tmp_path: Path) -> None:
    settings = ReservoirSettings(data_dir=tmp_path / "memory", chroma_process="inline")
    engine = Reservoir(settings)
    await engine.add("p", "i", [{"role": "user", "content": "inline works"}])
    assert chroma_store(engine).server is None and engine.store.in_process
    assert [r.text for r in await engine.recent("p", "i")] == ["inline works"]


def test_the_child_embeds_when_the_gateway_holds_many_files(tmp_path: Path) -> None:
    """A busy gateway holds more than 1,024 descriptors, and the child gets its socket
    under the gateway's number: waiting on it must not need `select()`, which
    refuses such numbers (the child then exited, and every write restarted it)."""
    import resource

    from reservoir_middleware.storage._child import TRIM_AFTER_IDLE_S, ChromaServer

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1200, hard), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    server = ChromaServer(tmp_path / "memory", embed_threads=1)
    try:
        (tmp_path / "memory").mkdir(mode=0o700)
        server.start()
        first = server.embed(["my sister is called Ada"])
        time.sleep(TRIM_AFTER_IDLE_S + 1)  # idle: the child waits on the socket, then trims
        again = server.embed(["my sister is called Ada"])
        assert server.alive()
        assert np.allclose(first[0], again[0])
    finally:
        server.stop()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
