"""How much ReservoirMiddleware costs in front of an instant model, against baselines.

    python bench/overhead.py            # stored 0 and 10000, in 1 and 100 scopes: 3 to 5 min
    python bench/overhead.py --stored 0,10000,100000 --data-dir /work/bench-data --litellm
    python bench/overhead.py --quick    # smoke run: stored 0 and 200, 1 and 10 scopes, ~25 s

Everything below is measured in one run and printed as markdown tables, each
figure next to its baseline.

**Servers.** uvicorn on 127.0.0.1, in child processes: a tiny
OpenAI-compatible Starlette app that answers instantly ("bare", one process for
the whole run), and, one row after the other, the same app wrapped in
`ReservoirMiddleware` with a real `Reservoir` (Chroma + the local ONNX embedding
model) on the row's own store ("mw", a fresh process per row). Settings come
from the environment (`RSV_*`) and the config file, as in production.

**Rows (memory layouts).** For each `--stored` count N and each `--scopes`
count S (default 1 and 100): N messages in one scope (partition `bench`,
instance `stored-<N>`), or spread evenly over S scopes (instances
`stored-<N>-s000` ...), with requests sent to a random one of them. An empty
store (N = 0) gives one row. The store is filled beforehand by a separate
process (so the server's peak RSS does not include the fill) with varied short
messages through `Reservoir.add`, 500 at a time; the fill time is reported.
With `--texts lme` (or `short,lme`: both, side by side) the stored messages
look like LongMemEval's: (user, assistant) pairs of its development split in
`../shared/datasets/longmemeval/` (`--lme-dataset`), long answers of 300-800
tokens, else similar generated ones (bench/_long_texts.py); those rows say
"LME-like". Embedding a long message costs 50-300 ms of CPU here, so 10k take
30-50 min to fill and 100k hours: `--cheap-vectors` embeds only each message's
first 48 words when filling (whole texts are stored), and the report says so.

**Non-streaming latency.** Sequential requests (httpx, keep-alive), each a new
short user question, alternating bare and mw (and which goes first) so machine
noise hits both alike; p50/p90/p99 per server and the added latency. The
middleware stores every request and its answer in the background after the
response: that work is kept on, it competes for the CPU and the next request of
the scope waits for it, like in production. `--pause-ms` adds think time between
requests (default none: back to back). Before measuring, every scope of the row
gets one request, then `--warmup` more go out, for at least 1 s per 5,000
messages of the largest scope (20 s at 100k). Before that, the middleware
server loads every stored scope's in-memory copies (`Reservoir.preload`: its
messages, their vector index, the BM25 index; about 25 s at 100k), as a
deployment does at start-up for the scopes it knows are big; without it the
first requests of a large scope are slower until the background load is done.

**Streaming.** Time to first byte of a short answer (8 SSE events), and the
cost per SSE event, from the difference between a long (`--chunks`, 200) and a
short answer. **Hold-back check:** the model sends `--hold-events` (5) events
`--gap-ms` (200 ms) apart, and waits as long again before ending the stream;
each event carries the model's send time (an SSE comment, CLOCK_MONOTONIC, which
all processes share). The client timestamps each event's arrival: the delay per
event is arrival - send; an event is "late" if it arrived after the model had
sent the next one (or ended the stream). A middleware that held a chunk back
until the next one would show late events and delays of about the gap; pass:
no late event and a max delay <= 50 ms (loopback and scheduling noise).

**Throughput.** At each `--concurrency` level (1, 8, 32), `--duration` seconds
(3) of back-to-back non-streaming requests from that many concurrent clients
(asyncio + httpx), bare then mw (alternating which goes first); requests/s
is completed requests / wall time. The requests go where the row's requests go:
all to its one scope (so the middleware's per-scope write ordering is part of
the figure), or to random scopes among its S. The client runs on the same
machine, so the bare figure is mostly the client's own limit.

**Peak RSS.** VmHWM of the server processes from /proc/<pid>/status at the end
of each row: bare (one process, its peak so far) and the row's mw process, each
with its child processes (the middleware's Chroma child: `chroma_process=child`).

**LiteLLM** (`--litellm`, off by default: starting two LiteLLM proxies and
measuring them adds 30 s to a minute; `--quick` leaves it out too). The LiteLLM
proxy (the `litellm` command, in process) alone, and the same proxy with the
middleware in front (`examples/litellm/proxy.py`), both with a config whose
`openai/gpt-4o` model points at the bare instant model, an empty memory store,
a master key generated for the run and no network (local cost map). Sequential
requests alternating between them, as above (`--litellm-requests`); p50/p90/p99
and the added latency.

**Targets** (this 2-core machine, with 100k stored messages): added p50
<= 10 ms and p99 <= 30 ms per non-streaming request; added cost per SSE event
<= 50 us. Every row is marked pass/FAIL against them.

With `--data-dir` the filled stores (`<dir>/fill-<N>x<S>`, and a `.json` note
next to each) are kept and reused: each row serves a fresh copy, so every run
starts from exactly the filled messages and the fill is paid once (here 2 to 5
ms per message, depending on the load: 100k take 3 to 8 minutes per layout). Otherwise
everything is in a temporary directory removed at the end. Children are stopped
at the end, on error and on Ctrl-C; they also exit when this process dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import random
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _harness import (
    Child,
    child,
    completion_builder,
    emit,
    free_port,
    memory_kib,
    mib,
    percentile,
    watch_stdin,
)
from _harness import aligned_table as table
from _long_texts import CHEAP_WORDS, LongTexts, cheap
from _long_texts import DATASET_DIR as LME_DATASET

ROOT = Path(__file__).resolve().parent.parent
PARTITION = "bench"
TARGET_P50_MS = 10.0
TARGET_P99_MS = 30.0
TARGET_CHUNK_US = 50.0
HOLD_BACK_LIMIT_MS = 50.0
FILL_BATCH = 500
MODEL = "gpt-4o"
SHORT_STREAM = 8  # SSE events of the answer whose first byte gives the TTFB
WARM_MESSAGES_PER_S = 5_000  # warm-up lasts at least 1 s per this many messages of a scope
SENT_PREFIX = b": sent="  # the comment line carrying a hold-back event's send time

# -- text generation ---------------------------------------------------------------


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split("|")]


RELATIONS = _words(
    "sister|brother|mother|father|cousin|neighbour|boss|colleague|partner|son|daughter|aunt|"
    "uncle|friend|roommate|grandmother"
)
NAMES = _words(
    "Ana|Ben|Chloe|Dmitri|Elif|Farah|Goran|Hana|Ivo|Jonas|Keiko|Lars|Maya|Nikos|Olga|Pedro|"
    "Quinn|Rosa|Sami|Tomas"
)
LIKES = _words(
    "loves|can't stand|is allergic to|collects|is obsessed with|recently tried|"
    "wants to learn about|keeps talking about|gave me"
)
THINGS = _words(
    "oat milk|jazz records|sourdough bread|cats|old maps|sushi|board games|mountain bikes|"
    "sunflowers|spicy ramen|vintage cameras|crossword puzzles|dark chocolate|houseplants|"
    "science fiction novels|green tea|pottery|the opera|running shoes|chess|peanuts|"
    "electric guitars|thai curry|origami|woollen scarves|podcasts"
)
PAST_VERBS = _words("lost|found|bought|repaired|sold|borrowed|painted|returned")
OBJECTS = _words(
    "bike|laptop|umbrella|passport|guitar|car keys|winter coat|camera|notebook|headphones|"
    "backpack|watch|tent|kettle"
)
PLACES = _words(
    "in the garage|at the office|under the stairs|at my parents' house|in the attic|"
    "at the station|in the blue drawer|at the gym|in the car|at the library|on the balcony|"
    "in the basement"
)
TIMES = _words(
    "last Monday|yesterday|this morning|two weeks ago|next Friday|on Saturday|in March|"
    "after lunch|tonight|over the weekend|last summer|before Christmas|tomorrow|"
    "at the end of the month"
)
TASKS = _words(
    "call the dentist|renew my passport|pay the electricity bill|water the tomatoes|"
    "book the train to Lyon|send the quarterly report|pick up the dry cleaning|"
    "back up my photos|change the bike tyres|buy a birthday present|"
    "cancel the gym membership|fix the leaking tap"
)
ACTIVITIES = _words(
    "a hiking trip|a birthday dinner|a road trip|a job interview|a house move|"
    "a wedding speech|a marathon|a camping weekend|a product launch|a family reunion|"
    "a cooking class|a ski holiday"
)
CITIES = _words(
    "Lisbon|Kyoto|Oslo|Montreal|Nairobi|Prague|Lima|Hanoi|Edinburgh|Seville|Melbourne|"
    "Tbilisi|Reykjavik|Bologna"
)
COLORS = _words("red|navy|green|yellow|black|silver|orange|purple")
SKILLS = _words(
    "Spanish|the piano|Python|watercolour painting|salsa dancing|rock climbing|Japanese|"
    "woodworking|chess openings|sailing"
)
UNITS = _words("weeks|months|years")

USER_TEMPLATES = [
    "My {relation} {name} {likes} {thing}.",
    "I {past_verb} my {object} {place} {time}.",
    "Remind me to {task} {time}.",
    "I'm planning {activity} in {city} {time}, any tips?",
    "Note that my {object} is {color} and I keep it {place}.",
    "I've been learning {skill} for {number} {unit} now and I still struggle.",
    "{name} said we should meet {place} {time} to talk about {activity}.",
    "Do not let me forget that {name} {likes} {thing}.",
]
ASSISTANT_TEMPLATES = [
    "Got it: your {relation} {name} {likes} {thing}. I'll keep that in mind.",
    "Sure, I'll remind you to {task} {time}.",
    "For {activity} in {city}, book early and check the forecast {time}.",
    "Noted, your {object} is {color} and it lives {place}.",
    "Learning {skill} for {number} {unit} is a solid start; short daily practice helps most.",
    "Understood. You {past_verb} your {object} {place} {time}; want me to list next steps?",
    "Good idea to meet {name} {place}; {activity} needs a clear plan and a budget.",
]
QUERY_TEMPLATES = [
    "What did I say about {thing}?",
    "What did I tell you about my {relation}?",
    "Where do I keep my {object}?",
    "What was I planning in {city}?",
    "How long have I been learning {skill}?",
    "What did {name} say about {activity}?",
    "Did I ask you to remind me to {task}?",
    "What did I say about {thing} {time}?",
    "What does my {relation} {name} think of {thing}?",
]


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        relation=rng.choice(RELATIONS),
        name=rng.choice(NAMES),
        likes=rng.choice(LIKES),
        thing=rng.choice(THINGS),
        past_verb=rng.choice(PAST_VERBS),
        object=rng.choice(OBJECTS),
        place=rng.choice(PLACES),
        time=rng.choice(TIMES),
        task=rng.choice(TASKS),
        activity=rng.choice(ACTIVITIES),
        city=rng.choice(CITIES),
        color=rng.choice(COLORS),
        skill=rng.choice(SKILLS),
        number=rng.randint(2, 11),
        unit=rng.choice(UNITS),
    )


def stored_message(rng: random.Random, index: int) -> dict[str, str]:
    """A short, realistic chat message; even indexes are user turns."""
    if index % 2 == 0:
        return {"role": "user", "content": _fill(rng.choice(USER_TEMPLATES), rng)}
    return {"role": "assistant", "content": _fill(rng.choice(ASSISTANT_TEMPLATES), rng)}


class Questions:
    """Distinct short user questions, reproducible from a seed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(f"questions:{seed}")
        self.seen: set[str] = set()

    def next(self) -> str:
        for _ in range(50):
            text = _fill(self.rng.choice(QUERY_TEMPLATES), self.rng)
            if text not in self.seen:
                self.seen.add(text)
                return text
        text = f"{text} (#{len(self.seen)})"
        self.seen.add(text)
        return text


# -- the instant model -------------------------------------------------------------

ANSWER = (
    "Sure. Based on what you told me earlier, here is a short summary and two suggestions "
    "you might find useful for next week."
)


def completion_bytes(model: str) -> bytes:
    replies = completion_builder()
    completion = replies.chat_completion(
        ANSWER, model, completion_id="chatcmpl-bench", usage=(10, 25)
    )
    return json.dumps(completion).encode()


def stream_events(model: str, events: int) -> list[bytes]:
    """`events` SSE events (at least 4): role chunk, content deltas, finish chunk, [DONE]."""
    replies = completion_builder()
    words = ANSWER.split()
    pieces = [" " + words[i % len(words)] for i in range(max(1, events - 3))]
    chunks = replies.completion_chunks(pieces, model, completion_id="chatcmpl-bench", created=0)
    return list(replies.sse_events(chunks))


def make_model_app() -> Any:
    """Starlette app: POST /v1/chat/completions answers immediately (JSON or SSE).

    Extra body fields: `x_bench_events` sets the number of SSE events of a
    stream; `x_bench_gap_ms` makes the stream wait that long after each event
    (the last one included) and start each event with the comment line
    `: sent=<time.monotonic_ns() just before sending it>`. The response header
    `x-bench-messages` says how many messages the request had.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    streams: dict[tuple[str, int], list[bytes]] = {}

    async def chat(request: Request) -> Response:
        payload = json.loads(await request.body())
        model = str(payload.get("model") or MODEL)
        headers = {"x-bench-messages": str(len(payload.get("messages") or []))}
        if payload.get("stream"):
            key = (model, min(int(payload.get("x_bench_events") or 8), 100_000))
            events = streams.get(key)
            if events is None:
                events = streams[key] = stream_events(*key)
            gap = min(float(payload.get("x_bench_gap_ms") or 0), 10_000.0) / 1000

            async def body() -> Any:
                for event in events:
                    yield event

            async def spaced() -> Any:
                for event in events:
                    yield b"%s%d\n%s" % (SENT_PREFIX, time.monotonic_ns(), event)
                    await asyncio.sleep(gap)

            return StreamingResponse(
                spaced() if gap > 0 else body(), media_type="text/event-stream", headers=headers
            )
        return Response(completion_bytes(model), media_type="application/json", headers=headers)

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


# -- memory layouts ------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """`stored` messages spread evenly over `scopes` scopes of the partition `bench`."""

    stored: int
    scopes: int
    texts: str = "short"  # or "lme": LongMemEval-like exchanges (bench/_long_texts.py)

    @property
    def name(self) -> str:
        return f"fill-{self.stored}x{self.scopes}" + ("" if self.texts == "short" else "-lme")

    @property
    def label(self) -> str:
        where = "1 scope" if self.scopes == 1 else f"{self.scopes} scopes"
        return where if self.texts == "short" else f"{where}, LME-like"

    def instances(self) -> list[str]:
        if self.scopes == 1:
            return [f"stored-{self.stored}"]
        return [f"stored-{self.stored}-s{k:03d}" for k in range(self.scopes)]

    def sizes(self) -> list[int]:
        each, extra = divmod(self.stored, self.scopes)
        return [each + (1 if k < extra else 0) for k in range(self.scopes)]

    def note(self) -> dict[str, Any]:
        texts = {} if self.texts == "short" else {"texts": self.texts}
        return {"stored": self.stored, "scopes": self.scopes, **texts}


def layouts_of(
    stored: Sequence[int], scopes: Sequence[int], texts: Sequence[str] = ("short",)
) -> list[Layout]:
    out: list[Layout] = []
    for n in stored:
        for kind in texts:
            for s in scopes:
                # an empty store: one row
                layout = Layout(n, s, kind) if n > 0 else Layout(0, 1)
                if layout not in out:
                    out.append(layout)
    return out


# -- child processes: serve, fill, LiteLLM ---------------------------------------------


def fill_child(
    data_dir: Path,
    layout: Layout,
    seed: int,
    cheap_vectors: bool = False,
    lme_dataset: Path = LME_DATASET,
) -> int:
    """Top the layout's scopes up to their sizes in `data_dir`, report, exit."""
    from reservoir_middleware import Reservoir, ReservoirSettings, Scope

    stop = threading.Event()
    watch_stdin(stop.set)
    reservoir = Reservoir(ReservoirSettings(data_dir=data_dir))
    make, source = stored_message, "short generated messages"
    if layout.texts == "lme":
        long_texts = LongTexts(lme_dataset)
        make, source = long_texts.message, long_texts.source
    if cheap_vectors:  # a batch of 500 is embedded here, not in the Chroma child
        embed = reservoir._writer.embedder
        reservoir._writer.embedder = lambda texts: embed(cheap(list(texts)))

    async def run() -> dict[str, Any]:
        started = time.perf_counter()
        last_report = started
        added = done = 0
        for instance, size in zip(layout.instances(), layout.sizes(), strict=True):
            scope = Scope(PARTITION, instance)
            have = reservoir.store.count(scope)
            rng = random.Random(f"fill:{seed}:{instance}:{have}")
            index, rounds = have, 0
            while have < size and not stop.is_set() and rounds < 4 * (size // FILL_BATCH + 2):
                batch = min(FILL_BATCH, size - have)
                messages = [make(rng, index + k) for k in range(batch)]
                index += batch
                await reservoir.add(PARTITION, instance, messages)
                now_have = reservoir.store.count(scope)
                added += now_have - have
                have = now_have
                rounds += 1
                if time.perf_counter() - last_report >= 5:
                    last_report = time.perf_counter()
                    emit(
                        {
                            "event": "progress",
                            "layout": layout.name,
                            "have": done + have,
                            "seconds": last_report - started,
                        }
                    )
            if stop.is_set():
                raise SystemExit(3)
            if have < size:
                raise RuntimeError(f"{instance}: {have} of {size} messages after {rounds} batches")
            done += have
        return {
            "event": "fill",
            "count": done,
            "added": added,
            "seconds": time.perf_counter() - started,
            "texts": source,
        }

    emit(asyncio.run(run()))
    return 0


def serve_child(kind: str, data_dir: Path | None) -> int:
    import uvicorn

    app: Any = make_model_app()
    server: uvicorn.Server | None = None
    stop = threading.Event()

    def on_close() -> None:
        stop.set()
        if server is not None:
            server.should_exit = True

    watch_stdin(on_close)
    if kind == "middleware":
        from reservoir_middleware import Reservoir, ReservoirMiddleware, ReservoirSettings

        assert data_dir is not None
        reservoir = Reservoir(ReservoirSettings(data_dir=data_dir))
        app = ReservoirMiddleware(app, reservoir=reservoir)

    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    if stop.is_set():
        return 3

    # What uvicorn's "auto" picks.
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"

    def announce() -> None:
        deadline = time.monotonic() + 120
        if kind == "middleware":  # what a deployment does for its known scopes
            asyncio.run(preload_all(reservoir))
        while time.monotonic() < deadline and not stop.is_set():
            if server.started and server.servers:
                port = server.servers[0].sockets[0].getsockname()[1]
                emit({"event": "ready", "port": port, "loop": loop, "http": http})
                return
            time.sleep(0.01)

    announcer = threading.Thread(target=announce, daemon=True)
    announcer.start()
    server.run()
    announcer.join(5)
    return 0


async def preload_all(reservoir: Any) -> None:
    """Load every stored scope's in-memory copies (messages, vector index, BM25)
    before the server is announced, as `Reservoir.preload` at start-up would."""
    scopes = await asyncio.to_thread(reservoir.store.scopes)
    for scope in scopes:
        await reservoir.preload(scope.partition, scope.instance)


def litellm_child(kind: str, config: Path, port: int) -> int:
    """LiteLLM's proxy in this process: `litellm` alone, or examples/litellm/proxy.py."""

    def on_close() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # uvicorn shuts down gracefully
        time.sleep(5)
        os._exit(1)  # LiteLLM's shutdown (or start-up) took too long

    watch_stdin(on_close)
    if kind == "alone":
        from litellm.proxy.proxy_cli import run_server

        command = run_server
    else:
        spec = importlib.util.spec_from_file_location(
            "rsv_bench_litellm_proxy", ROOT / "examples" / "litellm" / "proxy.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        command = module.build_command()
    argv = ["--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    command.main(args=argv, prog_name="litellm", standalone_mode=True)
    return 0


# -- parent: measuring -----------------------------------------------------------------


@dataclass
class Samples:
    bare: list[float] = field(default_factory=list)
    middleware: list[float] = field(default_factory=list)

    def side(self, middleware: bool) -> list[float]:
        return self.middleware if middleware else self.bare


@dataclass
class Level:
    """One concurrency level of the throughput test, for one server."""

    completed: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Row:
    layout: Layout
    count: int = 0
    fill_seconds: float = 0.0
    fill_added: int = 0
    copy_seconds: float = 0.0
    texts: str = ""  # where the stored messages come from
    vectors: str = ""  # how they were embedded, when not the usual way
    plain: Samples = field(default_factory=Samples)
    ttfb: Samples = field(default_factory=Samples)
    per_chunk_us: Samples = field(default_factory=Samples)
    hold_delay_ms: Samples = field(default_factory=Samples)
    hold_late: dict[str, int] = field(default_factory=lambda: {"bare": 0, "middleware": 0})
    throughput: dict[int, dict[str, Level]] = field(default_factory=dict)
    rss_kib: dict[str, dict[str, int]] = field(default_factory=dict)
    injected: list[int] = field(default_factory=list)
    degraded: int = 0
    warm_requests: int = 0
    warm_seconds: float = 0.0


@dataclass
class Timed:
    """Arrival of one SSE event, and when the model sent it (both monotonic ns)."""

    sent: int
    arrived: int


class Target:
    """One server to send requests to; with several URLs (scopes), a random one each time."""

    def __init__(
        self,
        client: httpx.Client,
        urls: Sequence[str],
        middleware: bool,
        *,
        seed: int = 0,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.urls = list(urls)
        self.middleware = middleware
        self.rng = random.Random(f"urls:{seed}")
        self.headers = {**JSON_HEADERS, **(headers or {})}

    @property
    def side(self) -> str:
        return "middleware" if self.middleware else "bare"

    def url(self) -> str:
        return self.urls[0] if len(self.urls) == 1 else self.rng.choice(self.urls)

    def _check(self, response: httpx.Response, url: str, row: Row | LiteLLMResult | None) -> None:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:500]}")
        if self.middleware and row is not None:
            if response.headers.get("x-reservoir-status") == "degraded":
                row.degraded += 1
            # LiteLLM passes the model's headers on with the prefix "llm_provider-"
            for name in ("x-bench-messages", "llm_provider-x-bench-messages"):
                if name in response.headers:
                    row.injected.append(int(response.headers[name]) - 1)
                    break

    def post(self, body: bytes, row: Row | LiteLLMResult | None, url: str | None = None) -> float:
        """Milliseconds for one complete JSON request/response."""
        url = url or self.url()
        started = time.perf_counter_ns()
        response = self.client.post(url, content=body, headers=self.headers)
        response.read()
        elapsed = (time.perf_counter_ns() - started) / 1e6
        self._check(response, url, row)
        return elapsed

    def stream(self, body: bytes) -> tuple[float, float]:
        """Milliseconds to the first body byte, and from it to the end of the stream."""
        url = self.url()
        started = time.perf_counter_ns()
        first = 0
        tail = b""
        with self.client.stream("POST", url, content=body, headers=self.headers) as response:
            self._check(response, url, None)
            for chunk in response.iter_raw():
                if not first:
                    first = time.perf_counter_ns()
                tail = (tail + chunk)[-32:]
            ended = time.perf_counter_ns()
        if not tail.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"incomplete stream from {url}")
        return (first - started) / 1e6, (ended - first) / 1e6

    def timed_events(self, body: bytes) -> list[Timed]:
        """Each SSE event's send time (from its `: sent=` line) and arrival time."""
        url = self.url()
        out: list[Timed] = []
        buffer = b""
        with self.client.stream("POST", url, content=body, headers=self.headers) as response:
            self._check(response, url, None)
            for chunk in response.iter_raw():
                arrived = time.monotonic_ns()
                buffer += chunk.replace(b"\r\n", b"\n")
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    sent = [
                        int(line[len(SENT_PREFIX) :])
                        for line in event.split(b"\n")
                        if line.startswith(SENT_PREFIX)
                    ]
                    if len(sent) != 1:
                        raise RuntimeError(f"event without its send time from {url}: {event!r}")
                    out.append(Timed(sent[0], arrived))
        if buffer.strip():
            raise RuntimeError(f"unterminated event from {url}: {buffer!r}")
        return out


JSON_HEADERS = {"content-type": "application/json"}


def chat_body(text: str, **extra: Any) -> bytes:
    return json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}
    ).encode()


def pairs(i: int, a: Target, b: Target) -> tuple[Target, Target]:
    """Both targets, which one first alternating with i."""
    return (a, b) if i % 2 == 0 else (b, a)


def measure(
    row: Row,
    bare: Target,
    middleware: Target,
    questions: Questions,
    args: argparse.Namespace,
) -> None:
    """Latency, streaming and hold-back, bare and middleware interleaved."""
    pause = args.pause_ms / 1000

    def rest() -> None:
        if pause:
            time.sleep(pause)

    def plain(count: int, keep: bool) -> None:
        for i in range(count):
            for target in pairs(i, bare, middleware):
                elapsed = target.post(chat_body(questions.next()), row if keep else None)
                if keep:
                    row.plain.side(target.middleware).append(elapsed)
                rest()

    def streams(count: int, keep: bool) -> None:
        # A short answer (its first byte is the TTFB), then a long one from the same
        # server: the difference of their after-first-byte times, per extra event, is
        # the cost of one SSE event, whatever the client's reads coalesce.
        short = {"stream": True, "x_bench_events": SHORT_STREAM}
        long = {"stream": True, "x_bench_events": args.chunks}
        for i in range(count):
            for target in pairs(i, bare, middleware):
                ttfb, short_rest = target.stream(chat_body(questions.next(), **short))
                rest()
                _, long_rest = target.stream(chat_body(questions.next(), **long))
                rest()
                if keep:
                    per_event = (long_rest - short_rest) * 1000 / (args.chunks - SHORT_STREAM)
                    row.ttfb.side(target.middleware).append(ttfb)
                    row.per_chunk_us.side(target.middleware).append(per_event)

    def hold_back(count: int) -> None:
        spaced = {"stream": True, "x_bench_events": args.hold_events, "x_bench_gap_ms": args.gap_ms}
        gap_ns = int(args.gap_ms * 1e6)
        for i in range(count):
            for target in pairs(i, bare, middleware):
                events = target.timed_events(chat_body(questions.next(), **spaced))
                if len(events) != args.hold_events:
                    raise RuntimeError(f"{len(events)} of {args.hold_events} events arrived")
                for k, event in enumerate(events):
                    # the model sends the next event (or ends the stream) one gap later
                    following = events[k + 1].sent if k + 1 < len(events) else event.sent + gap_ns
                    row.hold_delay_ms.side(target.middleware).append(
                        (event.arrived - event.sent) / 1e6
                    )
                    if event.arrived >= following:
                        row.hold_late[target.side] += 1
                rest()

    # Every scope of the row once, then the warm-up requests, for long enough that a
    # large scope's indexes are loaded and built (see the docstring).
    largest = max(row.layout.sizes())
    started = time.monotonic()
    if len(middleware.urls) > 1:
        for url in middleware.urls:
            middleware.post(chat_body(questions.next()), None, url)
    plain(args.warmup, keep=False)
    warm_until = started + largest / WARM_MESSAGES_PER_S
    for _ in range(100_000):
        if time.monotonic() >= warm_until:
            break
        plain(1, keep=False)
        row.warm_requests += 1
    row.warm_requests += args.warmup + (len(middleware.urls) if len(middleware.urls) > 1 else 0)
    row.warm_seconds = time.monotonic() - started
    plain(args.requests, keep=True)
    streams(min(args.warmup, 5), keep=False)
    streams(args.stream_requests, keep=True)
    hold_back(args.hold_streams)


async def _load(
    target: Target, questions: Questions, concurrency: int, seconds: float, timeout: float
) -> Level:
    """`concurrency` clients sending back-to-back requests for `seconds`."""
    level = Level()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(timeout), limits=limits, trust_env=False
    ) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                url = target.url()
                sent = time.perf_counter()
                body = chat_body(questions.next())
                response = await client.post(url, content=body, headers=target.headers)
                if response.status_code != 200:
                    raise RuntimeError(f"{url} answered {response.status_code}")
                level.latencies.append((time.perf_counter() - sent) * 1000)
                level.completed += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        level.seconds = time.perf_counter() - started
    return level


def measure_throughput(
    row: Row, bare: Target, middleware: Target, questions: Questions, args: argparse.Namespace
) -> None:
    for i, concurrency in enumerate(args.concurrency):
        row.throughput[concurrency] = {}
        for target in pairs(i, bare, middleware):
            level = asyncio.run(_load(target, questions, concurrency, args.duration, args.timeout))
            row.throughput[concurrency][target.side] = level
            time.sleep(0.2)  # let the last background writes finish


# -- LiteLLM -------------------------------------------------------------------------------

LITELLM_CONFIG = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: http://127.0.0.1:{port}/v1
      api_key: sk-bench-upstream
litellm_settings:
  num_retries: 0
  request_timeout: {timeout}
"""
# Keep the proxies off the network (see tests/test_litellm_proxy.py).
LITELLM_OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_TELEMETRY_DISABLED": "True",
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
    "LITELLM_MODE": "PRODUCTION",
    "ORT_DISABLE_TELEMETRY": "1",
}
# The developer's own LiteLLM settings, keys and databases stay out.
LITELLM_FOREIGN_PREFIXES = ("LITELLM_", "OPENAI_", "REDIS_")
LITELLM_FOREIGN_NAMES = {"DATABASE_URL", "DIRECT_URL", "NUM_WORKERS", "DEBUG", "DETAILED_DEBUG"}
LITELLM_STARTUP_S = 180.0


@dataclass
class LiteLLMResult:
    latency: Samples = field(default_factory=Samples)  # bare: alone, middleware: with memory
    rss_kib: dict[str, dict[str, int]] = field(default_factory=dict)
    startup_seconds: float = 0.0
    injected: list[int] = field(default_factory=list)
    degraded: int = 0


def _wait_live(proc: Child, url: str, log: Path, deadline: float) -> None:
    with httpx.Client(timeout=2, trust_env=False) as http:
        while time.monotonic() < deadline and proc.proc.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                if http.get(f"{url}/health/liveliness").status_code == 200:
                    return
            time.sleep(0.2)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    state = "exited" if proc.proc.poll() is not None else "not live in time"
    raise RuntimeError(f"{proc.label} {state}; its output:\n{tail}")


def measure_litellm(
    args: argparse.Namespace, tmp: Path, upstream_port: int, questions: Questions
) -> LiteLLMResult:
    result = LiteLLMResult()
    config = tmp / "litellm.yaml"
    config.write_text(
        LITELLM_CONFIG.format(model=MODEL, port=upstream_port, timeout=int(args.timeout))
    )
    key = "sk-" + secrets.token_hex(24)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(LITELLM_FOREIGN_PREFIXES) and k not in LITELLM_FOREIGN_NAMES
    }
    env.update(LITELLM_OFFLINE_ENV, LITELLM_MASTER_KEY=key, RSV_DATA_DIR=str(tmp / "litellm-mem"))
    script = str(Path(__file__).resolve())
    timeout = httpx.Timeout(args.timeout)
    with contextlib.ExitStack() as stack:
        started = time.monotonic()
        procs: dict[str, tuple[Child, str, Path]] = {}
        for kind in ("alone", "memory"):
            port, log = free_port(), tmp / f"litellm-{kind}.log"
            argv = [sys.executable, script, "--litellm-child", kind, "--port", str(port)]
            argv += ["--litellm-config", str(config)]
            out = stack.enter_context(log.open("w"))
            proc = stack.enter_context(
                child(
                    f"litellm {kind}",
                    argv,
                    lambda e: None,
                    log=out,
                    env=env,
                    cwd=tmp,
                    stop_timeout=10,
                )
            )
            procs[kind] = (proc, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + LITELLM_STARTUP_S
        for proc, url, log in procs.values():
            _wait_live(proc, url, log, deadline)
        result.startup_seconds = time.monotonic() - started
        auth = {"authorization": f"Bearer {key}"}
        alone_client = stack.enter_context(httpx.Client(timeout=timeout, trust_env=False))
        memory_client = stack.enter_context(httpx.Client(timeout=timeout, trust_env=False))
        alone = Target(
            alone_client, [f"{procs['alone'][1]}/v1/chat/completions"], False, headers=auth
        )
        memory = Target(
            memory_client,
            [f"{procs['memory'][1]}/v1/partition/{PARTITION}/instance/litellm/chat/completions"],
            True,
            headers=auth,
        )
        print("measuring LiteLLM ...", file=sys.stderr, flush=True)
        for keep, count in ((False, args.warmup), (True, args.litellm_requests)):
            for i in range(count):
                for target in pairs(i, alone, memory):
                    elapsed = target.post(chat_body(questions.next()), result if keep else None)
                    if keep:
                        result.latency.side(target.middleware).append(elapsed)
                    if args.pause_ms:
                        time.sleep(args.pause_ms / 1000)
        for kind, side in (("alone", "bare"), ("memory", "middleware")):
            result.rss_kib[side] = memory_kib(procs[kind][0].pid)
    return result


# -- report -------------------------------------------------------------------------------


def mark(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def latency_cells(samples: Samples) -> tuple[list[str], float, float]:
    b = [percentile(samples.bare, q) for q in (50, 90, 99)]
    m = [percentile(samples.middleware, q) for q in (50, 90, 99)]
    added50, added99 = m[0] - b[0], m[2] - b[2]
    cells = [*(f"{v:.2f}" for v in b), *(f"{v:.2f}" for v in m), f"{added50:.2f}", f"{added99:.2f}"]
    return cells, added50, added99


HEAD = ["stored", "layout"]


def section(title: str, header: list[str], cells: list[list[str]]) -> list[str]:
    """A table with its caption, as the report prints it."""
    return [title, "", table(header, cells), ""]


def row_key(row: Row) -> list[str]:
    return [str(row.layout.stored), row.layout.label]


def latency_table(rows: list[Row], args: argparse.Namespace) -> list[str]:
    """Non-streaming latency, bare and mw, against the p50 and p99 targets."""
    cells = []
    for row in rows:
        figures, added50, added99 = latency_cells(row.plain)
        cells.append(
            [
                *row_key(row),
                *figures,
                mark(added50 <= TARGET_P50_MS),
                mark(added99 <= TARGET_P99_MS),
            ]
        )
    return section(
        f"Non-streaming chat completions, {args.requests} sequential requests per server "
        f"per row (after warm-up), bare and middleware (mw) interleaved; ms. Targets for "
        f"100k stored: added p50 <= {TARGET_P50_MS:g}, p99 <= {TARGET_P99_MS:g}",
        [
            *HEAD,
            "bare p50",
            "bare p90",
            "bare p99",
            "mw p50",
            "mw p90",
            "mw p99",
            "added p50",
            "added p99",
            f"p50 <= {TARGET_P50_MS:g}",
            f"p99 <= {TARGET_P99_MS:g}",
        ],
        cells,
    )


def streaming_table(rows: list[Row], args: argparse.Namespace) -> list[str]:
    """Time to first byte, and the cost per SSE event against its target."""
    cells = []
    for row in rows:
        tb = [percentile(row.ttfb.bare, q) for q in (50, 99)]
        tm = [percentile(row.ttfb.middleware, q) for q in (50, 99)]
        cb, cm = percentile(row.per_chunk_us.bare, 50), percentile(row.per_chunk_us.middleware, 50)
        cells.append(
            [
                *row_key(row),
                f"{tb[0]:.2f}",
                f"{tm[0]:.2f}",
                f"{tm[0] - tb[0]:.2f}",
                f"{tb[1]:.2f}",
                f"{tm[1]:.2f}",
                f"{tm[1] - tb[1]:.2f}",
                f"{cb:.1f}",
                f"{cm:.1f}",
                f"{cm - cb:.1f}",
                mark(cm - cb <= TARGET_CHUNK_US),
            ]
        )
    return section(
        f"Streaming, {args.stream_requests} short ({SHORT_STREAM} SSE events) and long "
        f"({args.chunks} events) streams per server per row: time to first byte of the short "
        "ones (ms), and per-event time (us): median of (long - short) after-first-byte time / "
        f"extra events. Target: added <= {TARGET_CHUNK_US:g} us per event",
        [
            *HEAD,
            "bare TTFB p50",
            "mw TTFB p50",
            "added p50",
            "bare TTFB p99",
            "mw TTFB p99",
            "added p99",
            "bare us/event",
            "mw us/event",
            "added us/event",
            f"us/event <= {TARGET_CHUNK_US:g}",
        ],
        cells,
    )


def hold_back_table(rows: list[Row], args: argparse.Namespace) -> list[str]:
    """Whether the middleware held an SSE event back until the next one."""
    cells = []
    for row in rows:
        late_b, late_m = row.hold_late["bare"], row.hold_late["middleware"]
        worst = max(row.hold_delay_ms.middleware, default=float("nan"))
        cells.append(
            [
                *row_key(row),
                str(len(row.hold_delay_ms.middleware)),
                f"{percentile(row.hold_delay_ms.bare, 50):.2f}",
                f"{max(row.hold_delay_ms.bare, default=float('nan')):.2f}",
                f"{percentile(row.hold_delay_ms.middleware, 50):.2f}",
                f"{worst:.2f}",
                f"{late_b} / {late_m}",
                mark(late_m == 0 and worst <= HOLD_BACK_LIMIT_MS),
            ]
        )
    return section(
        f"No chunk held back: {args.hold_streams} streams per server per row whose "
        f"{args.hold_events} events the model sends {args.gap_ms:g} ms apart; delay = arrival "
        "at the client - send by the model, per event (ms); late = arrived after the model had "
        "sent the next event (or ended the stream). A held-back chunk would be late by about "
        f"the gap. Pass: no late event and max delay <= {HOLD_BACK_LIMIT_MS:g} ms",
        [
            *HEAD,
            "events",
            "bare delay p50",
            "bare delay max",
            "mw delay p50",
            "mw delay max",
            "late bare / mw",
            "not held back",
        ],
        cells,
    )


def throughput_table(rows: list[Row], args: argparse.Namespace) -> list[str]:
    """Requests per second at each concurrency level, bare and mw."""
    cells = []
    for row in rows:
        for concurrency, levels in row.throughput.items():
            b, m = levels["bare"], levels["middleware"]
            cells.append(
                [
                    *row_key(row),
                    str(concurrency),
                    f"{b.rate:.1f}",
                    f"{m.rate:.1f}",
                    f"{m.rate / b.rate:.3f}" if b.rate else "nan",
                    f"{percentile(b.latencies, 50):.2f}",
                    f"{percentile(m.latencies, 50):.2f}",
                    f"{percentile(m.latencies, 99):.2f}",
                    f"{b.completed} / {m.completed}",
                ]
            )
    return section(
        f"Throughput: {args.duration:g} s of back-to-back non-streaming requests per level and "
        "server, from that many concurrent clients; requests/s = completed / wall time; "
        "latency in ms. Concurrent requests go to the row's one scope, or to random scopes "
        "among its scopes",
        [
            *HEAD,
            "concurrency",
            "bare req/s",
            "mw req/s",
            "mw / bare",
            "bare p50",
            "mw p50",
            "mw p99",
            "requests bare / mw",
        ],
        cells,
    )


def rss_table(rows: list[Row]) -> list[str]:
    """Peak memory of the servers, the middleware's Chroma child included."""
    cells = []
    for row in rows:
        b, m = row.rss_kib.get("bare", {}), row.rss_kib.get("middleware", {})
        cells.append(
            [
                *row_key(row),
                f"{mib(b):.1f}",
                f"{mib(m):.1f}",
                f"{mib(m) - mib(b):.1f}",
                f"{mib(m, 'VmRSS'):.1f}",
            ]
        )
    return section(
        "Peak RSS (VmHWM) of the server processes at the end of each row, MiB: bare is one "
        "process for the whole run (its peak so far), mw the row's own process with its Chroma "
        "child (the fill ran in another process)",
        [*HEAD, "bare peak", "mw peak", "added", "mw RSS at end"],
        cells,
    )


def litellm_table(litellm: LiteLLMResult, args: argparse.Namespace) -> list[str]:
    """LiteLLM's proxy alone against the same proxy with the middleware."""
    cells, _, _ = latency_cells(litellm.latency)
    alone, memory = litellm.rss_kib.get("bare", {}), litellm.rss_kib.get("middleware", {})
    return section(
        f"LiteLLM proxy alone vs LiteLLM proxy with the middleware (examples/litellm/proxy.py)"
        f", same instant model behind, {args.litellm_requests} sequential requests each, "
        "interleaved, empty memory store at the start; ms. Peak RSS in MiB",
        [
            "litellm p50",
            "litellm p90",
            "litellm p99",
            "+mw p50",
            "+mw p90",
            "+mw p99",
            "added p50",
            "added p99",
            "litellm peak RSS",
            "+mw peak RSS",
        ],
        [[*cells, f"{mib(alone):.1f}", f"{mib(memory):.1f}"]],
    )


def fill_notes(rows: list[Row]) -> list[str]:
    """How each row's store was filled (or reused), and how long it took."""
    out = ["Fill (Reservoir.add, batches of 500, real embedding model, separate process):"]
    for row in rows:
        rate = (
            f", {1000 * row.fill_seconds / row.fill_added:.2f} ms/message" if row.fill_added else ""
        )
        reused = row.count - row.fill_added
        kept = f" ({reused} reused from --data-dir)" if reused else ""
        copied = (
            f"; served from a copy made in {row.copy_seconds:.1f} s" if row.copy_seconds else ""
        )
        out.append(
            f"  stored={row.layout.stored} in {row.layout.label}: {row.fill_added} added in "
            f"{row.fill_seconds:.1f} s{rate}{kept}; {row.count} messages before measuring{copied}"
        )
        if row.texts and row.layout.texts != "short":
            out.append(f"    messages: {row.texts}")
        if row.vectors:
            out.append(f"    stored vectors: {row.vectors}, not of the whole message")
    return [*out, ""]


def sanity_notes(
    rows: list[Row],
    args: argparse.Namespace,
    servers: dict[str, Any],
    litellm: LiteLLMResult | None,
    seconds: float,
) -> list[str]:
    """What tells a reader the run measured what it says: memory was injected, nothing
    degraded, the warm-up, and the machine."""
    out = ["Sanity:"]
    for row in rows:
        injected = f"{np.mean(row.injected):.1f}" if row.injected else "n/a"
        out.append(
            f"  stored={row.layout.stored} in {row.layout.label}: memory messages injected per "
            f"request (mean) {injected}; degraded answers {row.degraded}; warm-up "
            f"{row.warm_requests} mw requests in {row.warm_seconds:.1f} s"
        )
    if litellm is not None:
        injected = f"{np.mean(litellm.injected):.1f}" if litellm.injected else "n/a"
        out.append(
            f"  LiteLLM proxies live after {litellm.startup_seconds:.1f} s; through LiteLLM with "
            f"the middleware: memory messages injected per request (mean) {injected}, degraded "
            f"answers {litellm.degraded}"
        )
    mw = servers.get("middleware", {})
    out.append(
        f"  python {platform.python_version()}, {os.cpu_count()} CPUs, uvicorn loop="
        f"{mw.get('loop')} http={mw.get('http')}, pause between requests {args.pause_ms:g} ms; "
        f"run took {seconds:.0f} s"
    )
    return out


def report(
    rows: list[Row],
    args: argparse.Namespace,
    servers: dict[str, Any],
    litellm: LiteLLMResult | None,
    seconds: float,
) -> str:
    """Every table of the run, then the notes on the fill and the run's sanity."""
    out = [
        *latency_table(rows, args),
        *streaming_table(rows, args),
        *hold_back_table(rows, args),
        *throughput_table(rows, args),
        *rss_table(rows),
    ]
    if litellm is not None:
        out += litellm_table(litellm, args)
    out += fill_notes(rows)
    out += sanity_notes(rows, args, servers, litellm, seconds)
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------


def parse_texts(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if not kinds or any(k not in ("short", "lme") for k in kinds):
        raise argparse.ArgumentTypeError(f"--texts takes short, lme or both: {text!r}")
    return list(dict.fromkeys(kinds))


def parse_counts(minimum: int) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"values must be >= {minimum}")
        return values

    return parse


QUICK = {
    "stored": [0, 200],
    "scopes": [1, 10],
    "requests": 20,
    "warmup": 3,
    "stream_requests": 3,
    "chunks": 50,
    "hold_streams": 2,
    "hold_events": 4,
    "gap_ms": 50.0,
    "duration": 0.3,
}
FULL = {
    "stored": [0, 10000],
    "scopes": [1, 100],
    "requests": 300,
    "warmup": 30,
    "stream_requests": 100,
    "chunks": 200,
    "hold_streams": 3,
    "hold_events": 5,
    "gap_ms": 200.0,
    "duration": 3.0,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add = parser.add_argument
    add("--stored", type=parse_counts(0), help="stored message counts (default 0,10000)")
    add("--scopes", type=parse_counts(1), help="scopes to spread them over (default 1,100)")
    add("--requests", type=int, help="measured requests per server and row (default 300)")
    add("--warmup", type=int, help="warm-up requests per server and row (default 30)")
    add("--stream-requests", type=int, help="measured streams per server and row (default 100)")
    add("--chunks", type=int, help="SSE events per long stream (default 200)")
    add("--hold-streams", type=int, help="hold-back streams per server and row (default 3)")
    add("--hold-events", type=int, help="SSE events per hold-back stream (default 5)")
    add("--gap-ms", type=float, help="time between hold-back events (default 200)")
    add(
        "--concurrency",
        type=parse_counts(1),
        default=[1, 8, 32],
        help="throughput concurrency levels (default 1,8,32)",
    )
    add("--duration", type=float, help="seconds per throughput level and server (default 3)")
    add("--litellm", action="store_true", help="add LiteLLM proxy alone vs with the middleware")
    add("--litellm-requests", type=int, help="measured requests per LiteLLM proxy (--requests)")
    add("--pause-ms", type=float, default=0.0, help="sleep after each sequential request")
    add("--data-dir", type=Path, help="keep and reuse the filled stores here (default: temp)")
    add(
        "--texts",
        type=parse_texts,
        default=["short"],
        help="stored messages: short (generated), lme (LongMemEval-like long answers), "
        "or both: short,lme (default short)",
    )
    add(
        "--lme-dataset",
        type=Path,
        default=LME_DATASET,
        help="LongMemEval directory for --texts lme (absent: similar messages are generated)",
    )
    add(
        "--cheap-vectors",
        action="store_true",
        help=f"lme fill: embed each message's first {CHEAP_WORDS} words only (said in the output)",
    )
    add("--seed", type=int, default=1234)
    add("--timeout", type=float, default=30.0, help="per request, seconds")
    add("--quick", action="store_true", help="tiny smoke run: stored 0,200 in 1 and 10 scopes")
    add("--serve", choices=["bare", "middleware"], help=argparse.SUPPRESS)
    add("--fill", action="store_true", help=argparse.SUPPRESS)
    add("--litellm-child", choices=["alone", "memory"], help=argparse.SUPPRESS)
    add("--litellm-config", type=Path, help=argparse.SUPPRESS)
    add("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.litellm_requests is None:
        args.litellm_requests = args.requests
    problems = []
    if args.requests < 1 or args.stream_requests < 1 or args.litellm_requests < 1:
        problems.append("--requests, --stream-requests, --litellm-requests must be >= 1")
    if args.warmup < 0 or args.hold_streams < 1:
        problems.append("--warmup must be >= 0, --hold-streams >= 1")
    if args.chunks <= SHORT_STREAM:
        problems.append(f"--chunks must be > {SHORT_STREAM}")
    if not 4 <= args.hold_events <= 1000 or not 0 < args.gap_ms <= 5000:
        problems.append("--hold-events must be in 4..1000, --gap-ms in (0, 5000]")
    if not 0 < args.duration <= 600 or max(args.concurrency) > 1000:
        problems.append("--duration must be in (0, 600], --concurrency at most 1000")
    if problems:
        parser.error("; ".join(problems))
    return args


def prepare_store(
    row: Row, base: Path, args: argparse.Namespace, argv: list[str], on_event: Any
) -> Path:
    """The row's filled store in `base` (filled now, or reused as the note says)."""
    layout = row.layout
    store, note = base / layout.name, base / f"{layout.name}.json"
    expected = {**layout.note(), "seed": args.seed}
    if args.cheap_vectors and layout.texts == "lme":
        words = f"first {CHEAP_WORDS} words"
        expected["vectors"] = f"MiniLM of each message's {words} (--cheap-vectors)"
    row.vectors = expected.get("vectors", "")
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(note.read_text())
        if store.is_dir() and {k: known.get(k) for k in expected} == expected:
            row.count = int(known["count"])
            row.texts = str(known.get("source", ""))
            print(f"reusing {store} ({row.count} messages)", file=sys.stderr, flush=True)
            return store
    if layout.stored == 0:
        return store
    note.unlink(missing_ok=True)
    fill = [*argv, "--fill", "--stored", str(layout.stored), "--scopes", str(layout.scopes)]
    fill += [
        "--data-dir",
        str(store),
        "--texts",
        layout.texts,
        "--lme-dataset",
        str(args.lme_dataset),
    ]
    if row.vectors:
        fill.append("--cheap-vectors")
    # per message: 2-5 ms short, 50-300 ms long (embedding 256 tokens, on a busy machine)
    per_message = 0.5 if layout.texts == "lme" and not row.vectors else 0.05
    print(f"filling {store} ...", file=sys.stderr, flush=True)
    with child(f"fill {layout.name}", fill, on_event) as proc:
        event = proc.wait_for("fill", 600 + per_message * layout.stored)
        if proc.proc.wait(120) != 0:
            raise RuntimeError(f"the fill of {layout.name} exited with {proc.proc.returncode}")
    row.count, row.fill_added = int(event["count"]), int(event["added"])
    row.fill_seconds = float(event["seconds"])
    row.texts = str(event.get("texts", ""))
    print(
        f"filled {layout.name}: {row.fill_added} added, {row.count} in store, "
        f"{row.fill_seconds:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    note.write_text(json.dumps({**expected, "count": row.count, "source": row.texts}) + "\n")
    return store


def run(args: argparse.Namespace) -> int:
    run_started = time.monotonic()
    rows = [Row(layout) for layout in layouts_of(args.stored, args.scopes, args.texts)]
    servers: dict[str, dict[str, Any]] = {}
    script = str(Path(__file__).resolve())
    litellm: LiteLLMResult | None = None

    def on_event(label: str) -> Callable[[dict[str, Any]], None]:
        def handle(event: dict[str, Any]) -> None:
            if event["event"] == "ready":
                servers[label] = event
            elif event["event"] == "progress":
                print(
                    f"  filling {event['layout']}: {event['have']} messages "
                    f"({event['seconds']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )

        return handle

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rsv-bench-")))
        keep = args.data_dir is not None
        base = args.data_dir.expanduser().resolve() if keep else tmp / "memory"
        base.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, script, "--seed", str(args.seed)]
        bare_proc = stack.enter_context(child("bare", [*argv, "--serve", "bare"], on_event("bare")))
        bare_port = bare_proc.wait_ready(60)
        timeout = httpx.Timeout(args.timeout)
        bare_client = stack.enter_context(httpx.Client(timeout=timeout, trust_env=False))
        bare = Target(bare_client, [f"http://127.0.0.1:{bare_port}/v1/chat/completions"], False)
        questions = Questions(args.seed)
        for row in rows:
            # One store and one middleware process per row, so that a row's numbers do
            # not depend on the other rows' data; a kept store is served from a copy.
            store = prepare_store(row, base, args, argv, on_event("fill"))
            served = store
            if keep:
                served = tmp / "work" / row.layout.name
                started = time.perf_counter()
                if store.is_dir():
                    shutil.copytree(store, served)
                    row.copy_seconds = max(time.perf_counter() - started, 1e-9)
            serve = [*argv, "--serve", "middleware", "--data-dir", str(served)]
            with child(f"middleware {row.layout.name}", serve, on_event("middleware")) as mw_proc:
                mw_port = mw_proc.wait_ready(180)
                urls = [
                    f"http://127.0.0.1:{mw_port}/v1/partition/{PARTITION}/instance/{i}"
                    "/chat/completions"
                    for i in row.layout.instances()
                ]
                print(
                    f"measuring stored={row.layout.stored} in {row.layout.label} ...",
                    file=sys.stderr,
                    flush=True,
                )
                with httpx.Client(timeout=timeout, trust_env=False) as mw_client:
                    mw = Target(mw_client, urls, True, seed=args.seed)
                    measure(row, bare, mw, questions, args)
                    measure_throughput(row, bare, mw, questions, args)
                row.rss_kib = {
                    "bare": memory_kib(bare_proc.pid),
                    "middleware": memory_kib(mw_proc.pid),
                }
            if keep:
                shutil.rmtree(served, ignore_errors=True)
        if args.litellm:
            litellm = measure_litellm(args, tmp, bare_port, questions)
    print(report(rows, args, servers, litellm, time.monotonic() - run_started))
    return 0


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds: the children are stopped


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve_child(args.serve, args.data_dir)
    if args.fill:
        assert args.data_dir is not None
        layout = Layout(args.stored[0], args.scopes[0], args.texts[0])
        return fill_child(args.data_dir, layout, args.seed, args.cheap_vectors, args.lme_dataset)
    if args.litellm_child:
        assert args.litellm_config is not None and args.port is not None
        return litellm_child(args.litellm_child, args.litellm_config, args.port)
    signal.signal(signal.SIGTERM, _terminated)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
