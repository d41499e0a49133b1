"""Several processes, one memory. The embedded directory belongs to one process: a second
one (a script, the `reservoir` commands, another `reservoir serve`) gets a clear error that
names the holder and a Chroma server, until the holder dies, even by SIGKILL. With a Chroma
server, `reservoir serve --workers 2` runs two worker processes that share memory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from openai import AsyncOpenAI

from reservoir_middleware.context import without_memory
from reservoir_middleware.records import Scope
from reservoir_middleware.storage._datadir_lock import lock_data_dir
from reservoir_middleware.storage.chroma import _close_client, collection_name
from tests.conftest import GatewayFactory, free_port, running, serve
from tests.upstream import Upstream

SCRIPT = str(Path(sys.executable).with_name("reservoir"))

# Opens the embedded store by storing a message; with a third argument, then keeps
# the process (and so the directory) for that many seconds.
HOLDER = """
import asyncio, sys, time
from pathlib import Path
from reservoir_middleware import Reservoir, ReservoirSettings
r = Reservoir(ReservoirSettings(data_dir=Path(sys.argv[1]), load_entry_points=False))
asyncio.run(r.add("p", "i", [{"role": "user", "content": sys.argv[2]}]))
print("stored", flush=True)
if len(sys.argv) > 3:
    time.sleep(float(sys.argv[3]))
"""


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RSV_")}
    return {**env, "RSV_CONFIG_FILE": str(tmp_path / "none.toml"), **extra}


def run(
    argv: list[str], env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def holding(data_dir: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """Another process that has opened the embedded directory and keeps it."""
    with tempfile.TemporaryFile() as out:
        argv = [sys.executable, "-c", HOLDER, str(data_dir), "first words", "600"]
        holder = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                out.seek(0)
                output = out.read()
                if b"stored" in output:
                    break
                assert holder.poll() is None, output.decode(errors="replace")
                assert time.monotonic() < deadline, "the holder did not open the store"
                time.sleep(0.1)
            yield holder
        finally:
            if holder.poll() is None:
                holder.kill()
            holder.wait(30)


def holder_message(data_dir: Path, pid: int) -> str:
    return f"the memory directory {data_dir.resolve()} is in use by pid {pid}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_process_is_refused_clearly_until_the_first_is_killed(tmp_path: Path) -> None:
    data_dir = tmp_path / "memory"
    env = clean_env(tmp_path, RSV_DATA_DIR=str(data_dir))
    with holding(data_dir, env) as holder:
        in_use = holder_message(data_dir, holder.pid)
        named = f"{in_use} (python -c {data_dir} first words 600)"  # pid and command line

        second = run([sys.executable, "-c", HOLDER, str(data_dir), "second words"], env)
        assert second.returncode != 0
        assert f"DataDirInUse: {named}" in second.stderr
        assert f"chroma run --path {data_dir.resolve()} --port 8000" in second.stderr
        assert "RSV_CHROMA_URL=http://127.0.0.1:8000" in second.stderr

        # the memory commands: one clear line, exit code 1
        for command in (["search", "first"], ["view", "5", "-p", "p", "-i", "i"], ["stats"]):
            done = run([SCRIPT, *command], env)
            assert done.returncode == 1, done.stderr
            assert done.stdout == ""
            assert done.stderr.count("\n") == 1, done.stderr
            assert done.stderr.startswith(f"reservoir {command[0]}: {named}")
            assert "Stop that process, or run a Chroma server" in done.stderr

        # a second gateway stops at once instead of serving without memory
        port = free_port()
        started = time.monotonic()
        refused = run([SCRIPT, "serve", "--port", str(port)], env, timeout=120)
        assert refused.returncode == 1
        assert f"reservoir serve: {in_use}" in refused.stderr
        assert "RSV_CHROMA_URL" in refused.stderr
        assert "Uvicorn running" not in refused.stderr
        assert time.monotonic() - started < 60

        holder.send_signal(signal.SIGKILL)
        holder.wait(30)

    # the kernel dropped the lock with the killed process: nothing stale is left
    again = run([sys.executable, "-c", HOLDER, str(data_dir), "second words"], env)
    assert again.returncode == 0, again.stderr
    view = run([SCRIPT, "view", "5", "-p", "p", "-i", "i"], env)
    assert view.returncode == 0, view.stderr
    assert "first words" in view.stdout and "second words" in view.stdout


@pytest.mark.slow
async def test_the_middleware_goes_on_degraded_and_logs_why(
    tmp_path: Path, gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "memory"
    env = clean_env(tmp_path)
    with holding(data_dir, env) as holder:
        caplog.set_level(logging.WARNING, logger="reservoir")
        async with gateway_factory(data_dir=data_dir) as gw:
            response = await gw.chat([{"role": "user", "content": "Is memory there?"}])
            assert response.status_code == 200
            assert response.headers["x-reservoir-status"] == "degraded"
            assert response.json()["choices"][0]["message"]["content"] == "Echo: Is memory there?"
        lines = [r.getMessage() for r in caplog.records if r.name == "reservoir"]
        failed = [line for line in lines if "DataDirInUse" in line]
        assert failed, lines  # (at warm-up, or when a request first reaches the store)
        assert holder_message(data_dir, holder.pid) in failed[0]
        assert "RSV_CHROMA_URL" in failed[0]


def test_one_process_may_open_its_directory_more_than_once(tmp_path: Path) -> None:
    lock_data_dir(tmp_path / "memory")
    lock_data_dir(tmp_path / "memory")  # Chroma shares one client per path in a process
    pid = (tmp_path / "memory" / "reservoir.lock").read_text().split("\n")[0]
    assert pid == str(os.getpid())


def test_workers_need_a_chroma_server(tmp_path: Path) -> None:
    env = clean_env(tmp_path, RSV_DATA_DIR=str(tmp_path / "memory"))
    by_option = run([SCRIPT, "serve", "--workers", "2", "--port", str(free_port())], env)
    by_setting = run([SCRIPT, "serve", "--port", str(free_port())], {**env, "RSV_WORKERS": "3"})
    for done, count in ((by_option, 2), (by_setting, 3)):
        assert done.returncode == 1
        assert done.stderr.startswith(f"reservoir serve: {count} workers need a Chroma server")
        assert f"chroma run --path {tmp_path / 'memory'} --port 8000" in done.stderr
        assert "RSV_CHROMA_URL=http://127.0.0.1:8000" in done.stderr
    assert not (tmp_path / "memory").exists()  # nothing was opened
    usage = run([SCRIPT, "serve", "--help"], env)
    assert "rate_limit_per_minute is counted per worker" in " ".join(usage.stdout.split())


# -- two workers on a Chroma server -------------------------------------------------


def children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry))
    return found


def alive(pids: set[int]) -> bool:
    return any(os.path.exists(f"/proc/{pid}") for pid in pids)


def server_side_owner(port: int, client_port: int, candidates: set[int]) -> int:
    """The process that holds the server end of the loopback connection from `client_port`
    to `port` (the worker that accepted it and so served its requests), from /proc."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        ports = int(local.split(":")[1], 16), int(remote.split(":")[1], 16)
        if state == "01" and ports == (port, client_port):
            inodes.add(f"socket:[{inode}]")
    assert len(inodes) == 1, f"no single open connection from port {client_port}"
    for pid in candidates:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return pid
    raise AssertionError(f"no worker holds the connection from port {client_port}")


@dataclass
class Served:
    instance: str
    text: str
    answer: str
    worker: int
    headers: Mapping[str, str]


class Workers:
    def __init__(self, base: str, port: int, main_pid: int, partition: str) -> None:
        self.base, self.port, self.main_pid, self.partition = base, port, main_pid, partition

    async def chat(self, instance: str, text: str) -> Served:
        """One request on a connection of its own, and the worker that served it."""
        url = f"{self.base}/v1/partition/{self.partition}/instance/{instance}"
        async with AsyncOpenAI(base_url=url, api_key="k", max_retries=0, timeout=120) as ai:
            raw = await ai.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[{"role": "user", "content": text}]
            )
            stream = raw.http_response.extensions["network_stream"]
            client_port = stream.get_extra_info("client_addr")[1]
            worker = server_side_owner(self.port, client_port, children(self.main_pid))
            answer = raw.parse().choices[0].message.content or ""
        return Served(instance, text, answer, worker, raw.headers)


async def stored(chroma: Any, partition: str, instance: str, text: str) -> None:
    """Wait (bounded) until `text` is in the scope's collection on the Chroma server."""
    name = collection_name(Scope(partition, instance))
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(Exception):  # the collection may not exist yet
            found = await asyncio.to_thread(
                lambda: chroma.get_collection(name).get(where_document={"$contains": text})
            )
            if found["ids"]:
                return
        assert time.monotonic() < deadline, f"{text!r} was never stored in {instance}"
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def two_workers(tmp_path: Path, chroma_url: str, upstream_url: str) -> AsyncIterator[Any]:
    port = free_port()
    env = clean_env(
        tmp_path,
        RSV_PORT=str(port),
        RSV_CHROMA_URL=chroma_url,
        RSV_DATA_DIR=str(tmp_path / "unused"),
        RSV_OPENAI_BASE_URL=f"{upstream_url}/v1",
        OPENAI_API_KEY="sk-p",
    )
    argv = [SCRIPT, "serve", "--workers", "2"]
    base = f"http://127.0.0.1:{port}"
    spawned: set[int] = set()
    try:
        async with running(argv, env, f"{base}/health", timeout=180) as process:
            spawned = children(process.popen.pid)
            yield base, port, process
            spawned |= children(process.popen.pid)
    finally:  # the supervisor stops its workers; make sure none is left behind
        deadline = time.monotonic() + 30
        while alive(spawned):
            if time.monotonic() > deadline:
                for pid in spawned:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                break
            await asyncio.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_two_workers_answer_and_share_memory_through_the_chroma_server(
    tmp_path: Path, chroma_server: str, request: pytest.FixtureRequest
) -> None:
    import chromadb
    from chromadb.config import Settings

    address = urlsplit(chroma_server)
    chroma = await asyncio.to_thread(
        chromadb.HttpClient,
        host=address.hostname or "127.0.0.1",
        port=address.port or 8000,
        settings=Settings(anonymized_telemetry=False),
    )
    request.addfinalizer(lambda: _close_client(chroma))  # and its connections
    partition = f"w{uuid.uuid4().hex[:10]}"  # the Chroma server is shared by the session
    upstream = Upstream()
    async with serve(upstream.app()) as upstream_url:
        async with two_workers(tmp_path, chroma_server, upstream_url) as (base, port, process):
            workers = Workers(base, port, process.popen.pid, partition)
            gate = asyncio.Semaphore(6)

            async def one(instance: str, text: str) -> Served:
                async with gate:
                    return await workers.chat(instance, text)

            facts: dict[str, Served] = {}
            recalls: list[tuple[Served, Served]] = []
            crossed: set[tuple[int, int]] = set()  # (worker that stored, worker that recalled)
            for round_ in range(5):  # bounded: which worker accepts a connection is the kernel's
                names = [f"user{round_}x{n}" for n in range(12)]
                written = await asyncio.gather(
                    *(
                        one(name, f"My locker code at the gym is {name}-{4000 + n}.")
                        for n, name in enumerate(names)
                    )
                )
                facts.update((s.instance, s) for s in written)
                for s in written:  # the worker stores each exchange right after answering
                    await stored(chroma, partition, s.instance, f"Echo: {s.text}")
                asked = await asyncio.gather(
                    *(one(name, f"{name} here: what is my locker code?") for name in names)
                )
                recalls += [(facts[s.instance], s) for s in asked]
                crossed |= {(facts[s.instance].worker, s.worker) for s in asked}
                if len({a for a, b in crossed if a != b}) == 2:  # both directions seen
                    break

            every = [s for pair in recalls for s in pair]
            assert len(every) >= 24
            assert all(s.answer == f"Echo: {s.text}" for s in every)
            assert all("x-reservoir-status" not in s.headers for s in every)  # not degraded
            served_by = {s.worker for s in every}
            assert len(served_by) == 2 and process.popen.pid not in served_by
            # memory written through one worker is recalled by a request the other served,
            # in both directions
            assert {(a, b) for a, b in crossed if a != b} == {
                (a, b) for a in served_by for b in served_by if a != b
            }
            sent = {without_memory(r.messages[-1]["content"]): r.text for r in upstream.received}
            for fact, recall in recalls:
                received = sent[recall.text]
                assert fact.text in received and fact.answer in received, recall.instance
                others = [f.text for f in facts.values() if f.instance != fact.instance]
                assert not any(other in received for other in others)  # scopes stay apart
        assert "2 worker processes" in process.output
