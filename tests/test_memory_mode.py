"""Memory per request: the `X-Reservoir-Memory` header (on, off, read, write), the
partitions' `memory_mode` policy it can only narrow, and `enrich(memory=...)`.

Through real uvicorn servers with the official `openai` client: the middleware in
front of the stand-in model, and `reservoir serve`'s app."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI, BadRequestError

from reservoir_middleware import Reservoir, ReservoirSettings, hookimpl
from reservoir_middleware.context import RetrievalQuery
from reservoir_middleware.gateway.app import create_app
from reservoir_middleware.memory._mode import policy_mode
from reservoir_middleware.store import MemoryStore
from tests.blocks import unblocked
from tests.conftest import Gateway, GatewayFactory, make_settings, serve
from tests.memory_fixtures import chat, memory_engine
from tests.upstream import Reply, Upstream

MEMORY = "X-Reservoir-Memory"
STATUS = "x-reservoir-status"
FACT = "My cat is named Turnip."
QUESTION = "What is my cat called?"
SECRET = "The locker code is 4411."


def client(base: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=base, api_key="sk-test", max_retries=0, timeout=30)


async def ask(
    ai: AsyncOpenAI, text: str, mode: str | None = None, *, stream: bool = False
) -> tuple[str | None, str]:
    """The `x-reservoir-status` header and the answer's text."""
    raw = await ai.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": text}],
        stream=stream,
        extra_headers={MEMORY: mode} if mode is not None else {},
    )
    parsed: Any = raw.parse()
    if inspect.isawaitable(parsed):  # openai versions differ
        parsed = await parsed
    if stream:
        pieces = [c.choices[0].delta.content or "" async for c in parsed if c.choices]
        content = "".join(pieces)
    else:
        content = parsed.choices[0].message.content or ""
    return raw.headers.get(STATUS), content


async def texts(reservoir: Reservoir, partition: str = "p", instance: str = "i") -> list[str]:
    await reservoir.settle()
    return [r.text for r in await reservoir.recent(partition, instance, limit=1000)]


async def found(reservoir: Reservoir, query: str, partition: str = "p") -> list[str]:
    """What the scope holds for a query, semantically and by keyword."""
    await reservoir.settle()
    hits = await reservoir.search(partition, "i", query, limit=50)
    hits += await reservoir.search(partition, "i", query, limit=50, semantic=False)
    return [h.record.text for h in hits]


@pytest.fixture
async def gw(gateway_factory: GatewayFactory) -> AsyncIterator[Gateway]:
    async with gateway_factory() as gateway:
        yield gateway


def sent_unchanged(gateway: Gateway, text: str) -> None:
    """The model got the request as the client sent it, without our header."""
    received = gateway.upstream.received[-1]
    assert received.messages == [{"role": "user", "content": text}]
    assert MEMORY.lower() not in received.headers


@pytest.mark.parametrize("stream", [False, True])
async def test_off_neither_reads_nor_stores(gw: Gateway, stream: bool) -> None:
    async with client(gw.base()) as ai:
        assert await ask(ai, FACT) == (None, f"Echo: {FACT}")  # `on`: no status header
        status, answer = await ask(ai, f"{QUESTION} {SECRET}", "off", stream=stream)
    assert status == "memory=off"
    assert answer == f"Echo: {QUESTION} {SECRET}"
    sent_unchanged(gw, f"{QUESTION} {SECRET}")  # no memory injected
    assert await texts(gw.reservoir) == [FACT, f"Echo: {FACT}"]  # not even the answer
    assert not [t for t in await found(gw.reservoir, "locker code 4411") if "4411" in t]


async def test_off_is_neither_journalled_nor_shown_in_flight(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(write_delay_ms=3000) as gw, client(gw.base()) as ai:
        gate = asyncio.Event()
        gw.upstream.replies.append(Reply(gate=gate))  # the incognito answer waits
        incognito = asyncio.ensure_future(ask(ai, SECRET, "off", stream=True))
        for _ in range(200):
            if gw.upstream.received:
                break
            await asyncio.sleep(0.05)
        # meanwhile, another request of the scope: the incognito one is not its recent past
        await ask(ai, "Anything new?")
        assert "4411" not in gw.upstream.received[-1].text
        gate.set()
        assert (await incognito)[0] == "memory=off"
        await ask(ai, "Noted: the bike is blue.")
        journal = gw.reservoir.settings.data_dir / "journal"
        kept = ""
        for _ in range(100):  # the answered `on` exchange is journalled before it is stored
            kept = "".join(p.read_text() for p in journal.glob("*.jsonl"))
            if "the bike is blue" in kept:
                break
            await asyncio.sleep(0.05)
        assert "the bike is blue" in kept
        assert "4411" not in kept


@pytest.mark.parametrize("stream", [False, True])
async def test_read_injects_and_stores_nothing(gw: Gateway, stream: bool) -> None:
    async with client(gw.base()) as ai:
        await ask(ai, FACT)
        status, answer = await ask(ai, f"{QUESTION} {SECRET}", "read", stream=stream)
    assert status == "memory=read"
    assert answer == f"Echo: {QUESTION} {SECRET}"
    received = gw.upstream.received[-1]
    assert FACT in received.text  # the earlier exchange reached the model
    assert unblocked(received.messages[-1]) == {"role": "user", "content": f"{QUESTION} {SECRET}"}
    assert MEMORY.lower() not in received.headers
    assert await texts(gw.reservoir) == [FACT, f"Echo: {FACT}"]


class CountRetrieval:
    """A retrieval plugin that only counts how often it is asked."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def reservoir_prefetch(self, query: RetrievalQuery, store: MemoryStore) -> None:
        self.calls += 1

    @hookimpl
    def reservoir_retrieve(self, query: RetrievalQuery, store: MemoryStore) -> None:
        self.calls += 1


@pytest.mark.parametrize("stream", [False, True])
async def test_write_stores_and_retrieves_nothing(
    gateway_factory: GatewayFactory, stream: bool
) -> None:
    counter = CountRetrieval()
    async with gateway_factory(plugins=(counter,)) as gw, client(gw.base()) as ai:
        await ask(ai, FACT)
        asked = counter.calls
        assert asked > 0
        status, answer = await ask(ai, QUESTION, "write", stream=stream)
        assert status == "memory=write"
        assert answer == f"Echo: {QUESTION}"
        sent_unchanged(gw, QUESTION)
        assert counter.calls == asked  # no retrieval work at all
        stored = await texts(gw.reservoir)
        assert stored == [FACT, f"Echo: {FACT}", QUESTION, f"Echo: {QUESTION}"]


async def test_header_on_and_spelling(gw: Gateway) -> None:
    async with client(gw.base()) as ai:
        await ask(ai, FACT)
        assert await ask(ai, QUESTION, "on") == (None, f"Echo: {QUESTION}")
        assert FACT in gw.upstream.received[-1].text
        assert MEMORY.lower() not in gw.upstream.received[-1].headers
        assert (await ask(ai, SECRET, "OFF"))[0] == "memory=off"
    assert await texts(gw.reservoir) == [FACT, f"Echo: {FACT}", QUESTION, f"Echo: {QUESTION}"]


@pytest.mark.parametrize("value", ["incognito", "", "read-only", "on;off"])
async def test_invalid_header_is_a_400_and_stores_nothing(gw: Gateway, value: str) -> None:
    async with client(gw.base()) as ai:
        with pytest.raises(BadRequestError) as refused:
            await ask(ai, SECRET, value)
    assert refused.value.status_code == 400
    error = refused.value.response.json()["error"]
    assert error["type"] == "invalid_request"
    assert "X-Reservoir-Memory" in error["message"]
    assert all(mode in error["message"] for mode in ("on", "off", "read", "write"))
    assert gw.upstream.received == []
    assert await texts(gw.reservoir) == []


POLICIES = {"guest-*": {"memory_mode": "off"}, "kiosk": {"memory_mode": "read"}}


async def test_partition_policy_from_the_settings(gateway_factory: GatewayFactory) -> None:
    async with gateway_factory(partitions=POLICIES) as gw:
        # the engine API (an import, the CLI, the admin endpoints) is not affected
        await gw.reservoir.add("kiosk", "i", [{"role": "user", "content": FACT}])
        await gw.reservoir.add("guest-7", "i", [{"role": "user", "content": FACT}])
        async with client(gw.base("guest-7", "i")) as ai:
            assert (await ask(ai, SECRET))[0] == "memory=off"
            sent_unchanged(gw, SECRET)
            assert (await ask(ai, SECRET, "on"))[0] == "memory=off"  # a header cannot widen
            sent_unchanged(gw, SECRET)
        async with client(gw.base("kiosk", "i")) as ai:
            assert (await ask(ai, QUESTION, stream=True))[0] == "memory=read"
            assert FACT in gw.upstream.received[-1].text
            assert (await ask(ai, QUESTION, "write"))[0] == "memory=off"  # read + write
            sent_unchanged(gw, QUESTION)
        async with client(gw.base("guests", "i")) as ai:  # no pattern matches: on
            assert (await ask(ai, SECRET))[0] is None
        assert await texts(gw.reservoir, "guest-7") == [FACT]
        assert await texts(gw.reservoir, "kiosk") == [FACT]
        assert await texts(gw.reservoir, "guests") == [SECRET, f"Echo: {SECRET}"]


async def test_global_memory_mode(gateway_factory: GatewayFactory) -> None:
    async with gateway_factory(memory_mode="write") as gw, client(gw.base()) as ai:
        await ask(ai, FACT)
        assert (await ask(ai, QUESTION, "read"))[0] == "memory=off"
        sent_unchanged(gw, QUESTION)
        assert (await ask(ai, QUESTION))[0] == "memory=write"
        sent_unchanged(gw, QUESTION)
        assert await texts(gw.reservoir) == [FACT, f"Echo: {FACT}", QUESTION, f"Echo: {QUESTION}"]


@contextlib.asynccontextmanager
async def served_gateway(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[str, Upstream]]:
    """`reservoir serve`'s app (access control, memory, the provider routes) in front
    of the stand-in model as its OpenAI provider."""
    upstream = Upstream()
    async with serve(upstream.app()) as upstream_url:
        settings = make_settings(tmp_path, openai_base_url=f"{upstream_url}/v1", **overrides)
        reservoir = Reservoir(settings)
        async with serve(create_app(settings, reservoir=reservoir)) as url:
            yield url, upstream
            await reservoir.settle(timeout=10)
        await reservoir.close()


async def test_reservoir_serve_honours_the_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream")
    async with served_gateway(tmp_path, partitions={"kiosk": {"memory_mode": "read"}}) as (
        url,
        upstream,
    ):
        async with client(f"{url}/v1/partition/p/instance/i") as ai:
            await ask(ai, FACT)
            assert (await ask(ai, SECRET, "off", stream=True))[0] == "memory=off"
            assert upstream.received[-1].messages == [{"role": "user", "content": SECRET}]
            assert MEMORY.lower() not in upstream.received[-1].headers
            assert (await ask(ai, QUESTION, "read"))[0] == "memory=read"
            assert FACT in upstream.received[-1].text and SECRET not in upstream.received[-1].text
            await ask(ai, "And what is the weather?")
            assert SECRET not in upstream.received[-1].text  # the off request was not kept
            assert QUESTION not in upstream.received[-1].text  # nor the read one
        async with client(f"{url}/v1/partition/kiosk/instance/i") as ai:
            assert (await ask(ai, QUESTION))[0] == "memory=read"
            with pytest.raises(BadRequestError):
                await ask(ai, QUESTION, "sometimes")


async def test_engine_enrich_memory_keyword(tmp_path: Path) -> None:
    counter = CountRetrieval()
    engine = memory_engine(tmp_path, counter, partitions={"ro": {"memory_mode": "read"}})
    try:
        await engine.add("p", "i", [{"role": "user", "content": FACT}])
        await engine.add("ro", "i", [{"role": "user", "content": FACT}])
        plain = await engine.enrich("p", "i", chat(QUESTION), store=False)  # as before
        assert plain.memory_mode == "on" and FACT in str(plain.body)
        asked = counter.calls

        write = await engine.enrich("p", "i", chat(QUESTION), store="with_answer", memory="write")
        assert write.memory_mode == "write" and not write.changed
        assert write.body == chat(QUESTION) and not write.semantic.messages
        assert counter.calls == asked  # neither prefetch nor retrieve
        await engine.record_answer(write, None)
        assert [r.text for r in await engine.recent("p", "i")] == [FACT, QUESTION]

        read = await engine.enrich("p", "i", chat(SECRET), store="with_answer", memory="read")
        assert read.memory_mode == "read" and FACT in str(read.body)
        assert await engine.record_answer(read, None) is None
        off = await engine.enrich("p", "i", chat(SECRET), memory="off")  # store=True
        assert off.memory_mode == "off" and off.body == chat(SECRET)
        await engine.settle()
        assert [r.text for r in await engine.recent("p", "i")] == [FACT, QUESTION]

        narrowed = await engine.enrich("ro", "i", chat(SECRET), memory="write")
        assert narrowed.memory_mode == "off" and narrowed.body == chat(SECRET)
        await engine.settle()
        assert [r.text for r in await engine.recent("ro", "i")] == [FACT]
        with pytest.raises(ValueError, match="on, off, read, write"):
            await engine.enrich("p", "i", chat(SECRET), memory="sometimes")  # type: ignore[arg-type]
    finally:
        await engine.close()


def test_the_readme_config_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's TOML example, read from a config file, gives the policies it says."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Memory per request: the X-Reservoir-Memory header", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "reservoir.toml").write_text(example)
    monkeypatch.setenv("RSV_CONFIG_FILE", str(tmp_path / "reservoir.toml"))
    settings = ReservoirSettings(data_dir=tmp_path / "memory")
    modes = {p: policy_mode(settings, p) for p in ("guest-1", "kiosk", "kiosk-2", "team")}
    assert modes == {"guest-1": "off", "kiosk": "read", "kiosk-2": "on", "team": "on"}
