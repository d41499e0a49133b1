"""How much latency ReservoirMiddleware adds in front of an instant model.

    python bench/overhead.py                    # stored 0 and 10000, 300 requests each
    python bench/overhead.py --stored 0,100000 --data-dir ~/.cache/rsv-bench
    python bench/overhead.py --quick            # a few seconds' smoke run

uvicorn servers run on 127.0.0.1 in child processes: a tiny OpenAI-compatible
Starlette app that answers instantly ("bare"), and, one after the other for
each stored count N, the same app wrapped in `ReservoirMiddleware` with a real
`Reservoir` (Chroma + the local ONNX embedding model) on its own data
directory ("middleware"). Before serving, the middleware child fills the
measured scope (partition `bench`, instance `stored-<N>`) with N varied
messages through `Reservoir.add`, 500 at a time, and reports the fill time.

The client (this process, httpx with keep-alive) sends sequential requests,
each a new short user message, alternating bare and middleware (and
alternating which goes first) so machine noise hits both alike. The
middleware stores every request and its answer in the background after the
response: that work is kept on, it competes for the CPU and the next request
of the scope waits for it, like in production. `--pause-ms` adds think time
between requests (default none: back to back).

Streaming: time to first byte of a short answer, and the cost per SSE event,
from the difference between a long (`--chunks`, 200) and a short answer.

With `--data-dir` the filled stores (`<dir>/stored-<N>`) are kept and reused:
messages left by earlier measurements are removed first, so each run starts
from exactly the filled messages. Otherwise everything is in a temporary
directory removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

PARTITION = "bench"
EVENT_PREFIX = "BENCH-EVENT "
TARGET_P50_MS = 10.0
TARGET_P99_MS = 30.0
FILL_BATCH = 500
MODEL = "gpt-4o"
SHORT_STREAM = 8  # SSE events of the answer whose first byte gives the TTFB

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
        for _ in range(1000):
            text = _fill(self.rng.choice(QUERY_TEMPLATES), self.rng)
            if text not in self.seen:
                self.seen.add(text)
                return text
        text = f"{text} ({len(self.seen)})"
        self.seen.add(text)
        return text


# -- the instant model -------------------------------------------------------------

ANSWER = (
    "Sure. Based on what you told me earlier, here is a short summary and two suggestions "
    "you might find useful for next week."
)


def completion_bytes(model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ANSWER},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 25, "total_tokens": 35},
        }
    ).encode()


def stream_events(model: str, events: int) -> list[bytes]:
    """`events` SSE events: role chunk, content deltas, finish chunk, [DONE]."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": model}
    words = ANSWER.split()

    def sse(payload: Any) -> bytes:
        return (
            f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n".encode()
        )

    deltas = max(1, events - 3)
    out = [sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    out += [
        sse({**base, "choices": [{"index": 0, "delta": {"content": " " + words[i % len(words)]}}]})
        for i in range(deltas)
    ]
    out.append(sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    out.append(sse("[DONE]"))
    return out


def make_model_app() -> Any:
    """Starlette app: POST /v1/chat/completions answers immediately (JSON or SSE).

    Extra body field `x_bench_events` sets the number of SSE events of a stream.
    The response header `x-bench-messages` says how many messages it was sent.
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
            key = (model, int(payload.get("x_bench_events") or 8))
            events = streams.get(key)
            if events is None:
                events = streams[key] = stream_events(*key)

            async def body() -> Any:
                for event in events:
                    yield event

            return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
        return Response(completion_bytes(model), media_type="application/json", headers=headers)

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


# -- child process: serve (and fill) ---------------------------------------------------


def emit(event: dict[str, Any]) -> None:
    print(EVENT_PREFIX + json.dumps(event), flush=True)


def instance_name(stored: int) -> str:
    return f"stored-{stored}"


async def prepare_scope(
    reservoir: Any, stored: int, seed: int, stop: threading.Event
) -> dict[str, Any]:
    """Remove earlier measurement traffic, then top the scope up to `stored` messages."""
    from reservoir_middleware import Scope

    instance = instance_name(stored)
    scope = Scope(PARTITION, instance)
    removed = 0
    col = reservoir.store.collection(scope)
    if col is not None:
        before = col.count()
        col.delete(where={"source": {"$ne": "import"}})
        removed = before - col.count()
    have = reservoir.store.count(scope)
    start_count = have
    rng = random.Random(f"fill:{seed}:{instance}:{have}")
    started = time.perf_counter()
    index = have
    rounds = 0
    while have < stored and not stop.is_set() and rounds < 4 * (stored // FILL_BATCH + 2):
        size = min(FILL_BATCH, stored - have)
        messages = [stored_message(rng, index + k) for k in range(size)]
        index += size
        await reservoir.add(PARTITION, instance, messages)
        have = reservoir.store.count(scope)
        rounds += 1
        emit(
            {
                "event": "progress",
                "stored": stored,
                "have": have,
                "seconds": time.perf_counter() - started,
            }
        )
    if stop.is_set():
        raise SystemExit(3)
    return {
        "event": "fill",
        "stored": stored,
        "count": have,
        "added": have - start_count,
        "removed": removed,
        "seconds": time.perf_counter() - started,
    }


def serve_child(kind: str, data_dir: str | None, stored: Sequence[int], seed: int) -> int:
    import uvicorn

    stop = threading.Event()
    app: Any = make_model_app()
    reservoir = None
    server: uvicorn.Server | None = None

    def watch_stdin() -> None:
        # The parent closes our stdin to stop us (or dies, which closes it too).
        with contextlib.suppress(Exception):
            sys.stdin.read()
        stop.set()
        if server is not None:
            server.should_exit = True

    threading.Thread(target=watch_stdin, daemon=True).start()

    if kind == "middleware":
        from reservoir_middleware import Reservoir, ReservoirMiddleware, ReservoirSettings

        assert data_dir is not None
        reservoir = Reservoir(ReservoirSettings(data_dir=Path(data_dir)))

        async def fill_all() -> None:
            for n in stored:
                emit(await prepare_scope(reservoir, n, seed, stop))

        asyncio.run(fill_all())
        app = ReservoirMiddleware(app, reservoir=reservoir)

    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    if stop.is_set():
        return 3

    import importlib.util

    # What uvicorn's "auto" picks.
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"

    def announce() -> None:
        deadline = time.monotonic() + 60
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


# -- parent: children -------------------------------------------------------------------


class Child:
    """A server child process; stopped by closing its stdin, then terminate, then kill."""

    def __init__(self, label: str, argv: list[str], on_event: Callable[[dict[str, Any]], None]):
        self.label = label
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.on_event = on_event
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(EVENT_PREFIX):
                self.events.put(json.loads(line[len(EVENT_PREFIX) :]))
            else:
                sys.stderr.write(f"[{self.label}] {line}")
        self.events.put(None)

    def wait_ready(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.label} server not ready after {timeout:.0f} s")
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if event is None:
                raise RuntimeError(f"{self.label} server exited with {self.proc.wait(10)}")
            if event["event"] == "ready":
                self.on_event(event)
                return int(event["port"])
            self.on_event(event)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.reader.join(10)


@contextlib.contextmanager
def child(
    label: str, argv: list[str], on_event: Callable[[dict[str, Any]], None]
) -> Iterator[Child]:
    proc = Child(label, argv, on_event)
    try:
        yield proc
    finally:
        proc.close()


# -- parent: measuring -----------------------------------------------------------------


@dataclass
class Samples:
    bare: list[float] = field(default_factory=list)
    middleware: list[float] = field(default_factory=list)


@dataclass
class Row:
    stored: int
    count: int = 0
    fill_seconds: float = 0.0
    fill_added: int = 0
    plain: Samples = field(default_factory=Samples)
    ttfb: Samples = field(default_factory=Samples)
    per_chunk_us: Samples = field(default_factory=Samples)
    injected: list[int] = field(default_factory=list)
    degraded: int = 0


class Target:
    def __init__(self, client: httpx.Client, url: str, middleware: bool) -> None:
        self.client = client
        self.url = url
        self.middleware = middleware

    def _check(self, response: httpx.Response, row: Row | None) -> None:
        if response.status_code != 200:
            raise RuntimeError(f"{self.url} answered {response.status_code}: {response.text}")
        if self.middleware and row is not None:
            if response.headers.get("x-reservoir-status") == "degraded":
                row.degraded += 1
            row.injected.append(int(response.headers.get("x-bench-messages", "1")) - 1)

    def post(self, body: bytes, row: Row | None) -> float:
        """Milliseconds for one complete JSON request/response."""
        started = time.perf_counter_ns()
        response = self.client.post(self.url, content=body, headers=JSON_HEADERS)
        response.read()
        elapsed = (time.perf_counter_ns() - started) / 1e6
        self._check(response, row)
        return elapsed

    def stream(self, body: bytes, row: Row | None) -> tuple[float, float]:
        """Milliseconds to the first body byte, and from it to the end of the stream."""
        started = time.perf_counter_ns()
        first = 0
        tail = b""
        with self.client.stream("POST", self.url, content=body, headers=JSON_HEADERS) as response:
            for chunk in response.iter_raw():
                if not first:
                    first = time.perf_counter_ns()
                tail = (tail + chunk)[-32:]
            ended = time.perf_counter_ns()
            self._check(response, row)
        if not tail.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"incomplete stream from {self.url}")
        return (first - started) / 1e6, (ended - first) / 1e6


JSON_HEADERS = {"content-type": "application/json"}


def chat_body(text: str, **extra: Any) -> bytes:
    return json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}
    ).encode()


def measure(
    row: Row,
    bare: Target,
    middleware: Target,
    questions: Questions,
    args: argparse.Namespace,
) -> None:
    """Interleaved requests; which server goes first alternates from one pair to the next."""
    pause = args.pause_ms / 1000

    def rest() -> None:
        if pause:
            time.sleep(pause)

    def plain(count: int, keep: bool) -> None:
        for i in range(count):
            for target in (bare, middleware) if i % 2 == 0 else (middleware, bare):
                elapsed = target.post(chat_body(questions.next()), row if keep else None)
                if keep:
                    (row.plain.middleware if target.middleware else row.plain.bare).append(elapsed)
                rest()

    def streams(count: int, keep: bool) -> None:
        # A short answer (its first byte is the TTFB), then a long one from the same
        # server: the difference of their after-first-byte times, per extra event, is
        # the cost of one SSE event, whatever the client's reads coalesce.
        short = {"stream": True, "x_bench_events": SHORT_STREAM}
        long = {"stream": True, "x_bench_events": args.chunks}
        for i in range(count):
            for target in (bare, middleware) if i % 2 == 0 else (middleware, bare):
                ttfb, short_rest = target.stream(chat_body(questions.next(), **short), None)
                rest()
                _, long_rest = target.stream(chat_body(questions.next(), **long), None)
                rest()
                if keep:
                    per_event = (long_rest - short_rest) * 1000 / (args.chunks - SHORT_STREAM)
                    side = "middleware" if target.middleware else "bare"
                    getattr(row.ttfb, side).append(ttfb)
                    getattr(row.per_chunk_us, side).append(per_event)

    plain(args.warmup, keep=False)
    plain(args.requests, keep=True)
    streams(min(args.warmup, 5), keep=False)
    streams(args.stream_requests, keep=True)


# -- report -------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def mark(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join(lines)


def report(rows: list[Row], args: argparse.Namespace, servers: dict[str, Any]) -> str:
    out = []
    plain_rows = []
    for row in rows:
        b = [pct(row.plain.bare, q) for q in (50, 90, 99)]
        m = [pct(row.plain.middleware, q) for q in (50, 90, 99)]
        added50, added99 = m[0] - b[0], m[2] - b[2]
        plain_rows.append(
            [
                str(row.stored),
                *(f"{v:.2f}" for v in b),
                *(f"{v:.2f}" for v in m),
                f"{added50:.2f}",
                f"{added99:.2f}",
                mark(added50 <= TARGET_P50_MS),
                mark(added99 <= TARGET_P99_MS),
            ]
        )
    out.append(
        f"Non-streaming chat completions, {args.requests} sequential requests per server "
        f"per row (after {args.warmup} warm-up), bare and middleware interleaved; ms"
    )
    out.append("")
    out.append(
        table(
            [
                "stored",
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
            plain_rows,
        )
    )
    stream_rows = []
    for row in rows:
        tb = [pct(row.ttfb.bare, q) for q in (50, 99)]
        tm = [pct(row.ttfb.middleware, q) for q in (50, 99)]
        cb, cm = pct(row.per_chunk_us.bare, 50), pct(row.per_chunk_us.middleware, 50)
        stream_rows.append(
            [
                str(row.stored),
                f"{tb[0]:.2f}",
                f"{tm[0]:.2f}",
                f"{tm[0] - tb[0]:.2f}",
                f"{tb[1]:.2f}",
                f"{tm[1]:.2f}",
                f"{tm[1] - tb[1]:.2f}",
                f"{cb:.1f}",
                f"{cm:.1f}",
                f"{cm - cb:.1f}",
            ]
        )
    out.append("")
    out.append(
        f"Streaming, {args.stream_requests} short ({SHORT_STREAM} SSE events) and long "
        f"({args.chunks} events) streams per server per row: time to first byte of the short "
        "ones (ms), and per-event time (us): median of (long - short) after-first-byte time / "
        "extra events"
    )
    out.append("")
    out.append(
        table(
            [
                "stored",
                "bare TTFB p50",
                "mw TTFB p50",
                "added p50",
                "bare TTFB p99",
                "mw TTFB p99",
                "added p99",
                "bare us/event",
                "mw us/event",
                "added us/event",
            ],
            stream_rows,
        )
    )
    out.append("")
    out.append("Fill (Reservoir.add, batches of 500, real embedding model):")
    for row in rows:
        rate = (
            f", {1000 * row.fill_seconds / row.fill_added:.2f} ms/message" if row.fill_added else ""
        )
        reused = row.count - row.fill_added
        kept = f" ({reused} reused from --data-dir)" if reused else ""
        out.append(
            f"  stored={row.stored}: {row.fill_added} added in {row.fill_seconds:.1f} s{rate}"
            f"{kept}; scope holds {row.count} before measuring"
        )
    out.append("")
    out.append("Sanity:")
    for row in rows:
        injected = f"{np.mean(row.injected):.1f}" if row.injected else "n/a"
        out.append(
            f"  stored={row.stored}: memory messages injected per request (mean) {injected}; "
            f"degraded answers {row.degraded}"
        )
    mw = servers.get("middleware", {})
    out.append(
        f"  python {platform.python_version()}, {os.cpu_count()} CPUs, uvicorn loop="
        f"{mw.get('loop')} http={mw.get('http')}, pause between requests {args.pause_ms:g} ms"
    )
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------


def parse_stored(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("stored counts must be >= 0")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--stored",
        type=parse_stored,
        default=None,
        help="stored message counts, comma separated (default 0,10000)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="measured requests per server and row (default 300)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up requests per server and row (default 30)"
    )
    parser.add_argument(
        "--stream-requests",
        type=int,
        default=None,
        help="measured streams per server and row (default 100)",
    )
    parser.add_argument(
        "--chunks", type=int, default=200, help="SSE events per measured stream (default 200)"
    )
    parser.add_argument(
        "--pause-ms",
        type=float,
        default=0.0,
        help="sleep after each request (default 0: back to back)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="keep and reuse the filled memory here (default: a temp dir)",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument(
        "--quick", action="store_true", help="tiny run for smoke tests: stored 0,200, 20 requests"
    )
    parser.add_argument("--serve", choices=["bare", "middleware"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = {"stored": [0, 200], "requests": 20, "warmup": 5, "stream_requests": 5}
    full = {"stored": [0, 10000], "requests": 300, "warmup": 30, "stream_requests": 100}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick and args.chunks == 200:
        args.chunks = 50
    if (
        args.requests < 1
        or args.warmup < 0
        or args.stream_requests < 1
        or args.chunks <= SHORT_STREAM
    ):
        parser.error(f"--requests and --stream-requests must be >= 1, --chunks > {SHORT_STREAM}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        data = str(args.data_dir) if args.data_dir else None
        return serve_child(args.serve, data, args.stored, args.seed)

    rows = {n: Row(n) for n in args.stored}
    servers: dict[str, dict[str, Any]] = {}
    script = str(Path(__file__).resolve())

    def on_event(label: str) -> Callable[[dict[str, Any]], None]:
        def handle(event: dict[str, Any]) -> None:
            kind = event["event"]
            if kind == "ready":
                servers[label] = event
            elif kind == "progress":
                print(
                    f"  filling stored-{event['stored']}: {event['have']} messages "
                    f"({event['seconds']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            elif kind == "fill":
                row = rows[int(event["stored"])]
                row.count, row.fill_added = int(event["count"]), int(event["added"])
                row.fill_seconds = float(event["seconds"])
                print(
                    f"fill stored-{event['stored']}: {event['added']} added, "
                    f"{event['removed']} earlier measurement messages removed, "
                    f"{event['count']} in scope, {event['seconds']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )

        return handle

    with contextlib.ExitStack() as stack:
        if args.data_dir is not None:
            data_dir = args.data_dir.expanduser().resolve()
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="rsv-bench-"))
            data_dir = Path(tmp) / "memory"
        base = [sys.executable, script, "--seed", str(args.seed)]
        bare_proc = stack.enter_context(child("bare", [*base, "--serve", "bare"], on_event("bare")))
        bare_port = bare_proc.wait_ready(60)
        timeout = httpx.Timeout(args.timeout)
        bare_client = stack.enter_context(httpx.Client(timeout=timeout, trust_env=False))
        bare = Target(bare_client, f"http://127.0.0.1:{bare_port}/v1/chat/completions", False)
        questions = Questions(args.seed)
        for n in args.stored:
            # One store (data dir) and one middleware process per row, so that a row's
            # numbers do not depend on the other rows' data.
            argv = [
                *base,
                "--stored",
                str(n),
                "--serve",
                "middleware",
                "--data-dir",
                str(data_dir / instance_name(n)),
            ]
            with child(f"middleware {n}", argv, on_event("middleware")) as mw_proc:
                mw_port = mw_proc.wait_ready(180 + 0.05 * n)
                url = (
                    f"http://127.0.0.1:{mw_port}/v1/partition/{PARTITION}/instance/"
                    f"{instance_name(n)}/chat/completions"
                )
                print(f"measuring stored={n} ...", file=sys.stderr, flush=True)
                with httpx.Client(timeout=timeout, trust_env=False) as mw_client:
                    measure(rows[n], bare, Target(mw_client, url, True), questions, args)
    print(report(list(rows.values()), args, servers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
