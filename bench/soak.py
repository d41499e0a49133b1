"""Soak: steady chat traffic through the middleware; errors, latency and memory use.

    python bench/soak.py                          # 180 s, 8 in flight, 16 scopes
    python bench/soak.py --model-ms 300           # a model that takes 300 ms to answer
    python bench/soak.py --seconds 900 --concurrency 16 --json soak.json
    python bench/soak.py --seconds 15             # the CI smoke run

A child process serves, with uvicorn on 127.0.0.1, `ReservoirMiddleware` (real
`Reservoir`: embedded Chroma in a temporary directory, the local ONNX
embedding model) in front of a stand-in model that answers "Echo: <last user
message>", at once or after `--model-ms`. With an instant model the traffic
is as fast as the server goes (a stress); with a model latency it is paced
like real use. This process drives the traffic with httpx:
`--concurrency` workers, each going round a fixed set of `--scopes` scopes
(partition `soak-<k>`, instance `user`), conversations of up to four turns
that re-send their history (so deduplication works all along), one request in
three streamed. Every message carries its scope's tag; the stand-in checks
that the messages it is sent carry no other scope's tag.

Counted as an error: a non-200 status, a transport error or timeout, an
answer that is not the echo of the question, a stream without `[DONE]`, and a
request the stand-in found another scope's message in. `degraded` counts the
answers marked `x-reservoir-status: degraded` (memory skipped). The child's
resident memory (VmRSS from /proc/<pid>/status) is sampled every second; the
growth is measured from the end of the warm-up to the end of the run. Memory
is written after the answers; when the traffic stops, the child reports how
long it took to write what was still queued (`drain`: how far memory lagged
behind) and how many messages it stored (expected: the question and the
answer of every successful request, each once).

Exit status 1 when a request failed, a message is missing or duplicated, or
the growth exceeds `--max-growth-mb` (when given).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _harness import Child, emit, percentile, status_kib, watch_stdin
from _harness import aligned_table as table

MODEL = "gpt-4o"
COMPLETION_ID = "chatcmpl-soak"
SCOPE_HEADER = "x-soak-scope"
TAG = re.compile(r"\bS(\d\d\d)-\d+\b")
MEMORY_LINE = re.compile(r"^(\[instance [^\]]*\] )?(user|assistant)( \([^)]*\))?: ")
MAX_TURNS = 4

SUBJECTS = [
    "my sister",
    "the new intern",
    "our landlord",
    "my running coach",
    "the plumber",
    "my neighbour Rosa",
    "the bakery on the corner",
    "my old laptop",
]
EVENTS = [
    "moved the meeting to Thursday",
    "recommended a book about Roman history",
    "asked me to water the tomatoes",
    "is learning the cello",
    "broke the kitchen tap again",
    "wants to go hiking in the Alps",
    "sent the quarterly report late",
    "started baking sourdough bread",
]
WHEN = ["yesterday", "this morning", "last week", "on Saturday", "after lunch", "in March"]


def question(rng: random.Random, scope: int, number: int) -> str:
    return (
        f"S{scope:03d}-{number} Note that {rng.choice(SUBJECTS)} "
        f"{rng.choice(EVENTS)} {rng.choice(WHEN)}."
    )


def partition(scope: int) -> str:
    return f"soak-{scope:03d}"


# -- child: the stand-in model behind the middleware -----------------------------


def model_app(delay: float = 0.0) -> Any:
    """POST /v1/chat/completions: "Echo: <last user text>" (its memory block left
    out, as a model would not repeat it), as JSON or SSE, after
    `delay` seconds (0: at once).

    The response header `x-soak-messages` says how many messages it was sent,
    `x-soak-memory` how many messages of memory they showed;
    `x-soak-leak` lists tags of scopes other than the request's own it saw.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from reservoir_middleware.asgi._replies import chat_completion, completion_chunks, sse_events
    from reservoir_middleware.context import without_memory

    async def chat(request: Request) -> Response:
        payload = json.loads(await request.body())
        messages = payload["messages"]
        own = request.headers.get(SCOPE_HEADER, "")
        seen = {m for msg in messages for m in TAG.findall(str(msg.get("content")))}
        shown = sum(  # the lines of memory blocks: one per message shown
            1
            for msg in messages
            for line in str(msg.get("content")).split("\n")
            if MEMORY_LINE.match(line)
        )
        headers = {"x-soak-messages": str(len(messages)), "x-soak-memory": str(shown)}
        foreign = sorted(seen - {own})
        if foreign:
            headers["x-soak-leak"] = ",".join(foreign[:10])
        last = next(m for m in reversed(messages) if m.get("role") == "user")
        content = f"Echo: {without_memory(str(last['content']))}"  # the question, not memory
        if delay:
            await asyncio.sleep(delay)
        if payload.get("stream"):
            half = len(content) // 2
            pieces = (content[:half], content[half:])
            events = sse_events(completion_chunks(pieces, MODEL, completion_id=COMPLETION_ID))

            async def body() -> Any:
                for event in events:
                    yield event

            return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
        completion = chat_completion(content, MODEL, completion_id=COMPLETION_ID, usage=(10, 5))
        return JSONResponse(completion, headers=headers)

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def serve_child(data_dir: Path, model_ms: float) -> int:
    """Serve until stdin closes, then let the writes finish and report the store."""
    import uvicorn

    from reservoir_middleware import Reservoir, ReservoirMiddleware, ReservoirSettings

    async def run() -> None:
        reservoir = Reservoir(ReservoirSettings(data_dir=data_dir))
        await reservoir.warm_up()  # the model is loaded before the first measurement
        app = ReservoirMiddleware(model_app(model_ms / 1000), reservoir=reservoir)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", access_log=False
        )
        server = uvicorn.Server(config)
        loop = asyncio.get_running_loop()

        stop_at: list[float] = []

        def on_close() -> None:  # the parent closed our stdin to stop us (or died)
            stop_at.append(time.monotonic())
            loop.call_soon_threadsafe(setattr, server, "should_exit", True)

        watch_stdin(on_close)
        serving = asyncio.ensure_future(server.serve())
        for _ in range(1200):
            if server.started or serving.done():
                break
            await asyncio.sleep(0.05)
        if not server.started:
            serving.cancel()
            raise RuntimeError("uvicorn did not start")
        emit({"event": "ready", "port": server.servers[0].sockets[0].getsockname()[1]})
        await serving
        # Writes run after the answers: what is still queued when traffic stops is
        # the backlog; the time it takes to write it (during uvicorn's shutdown or
        # after it) is how far memory lagged behind.
        await reservoir.settle(timeout=300)
        drain = time.monotonic() - (stop_at[0] if stop_at else time.monotonic())
        scopes = await asyncio.to_thread(reservoir.store.scopes)
        counts = [await asyncio.to_thread(reservoir.store.count, s) for s in scopes]
        emit(
            {
                "event": "stored",
                "scopes": len(scopes),
                "messages": sum(counts),
                "drain_s": round(drain, 2),
                "rss_kb": status_kib(os.getpid())["VmRSS"],
            }
        )

    asyncio.run(run())
    return 0


# -- parent: the child process ---------------------------------------------------


# -- parent: traffic ---------------------------------------------------------------


@dataclass
class Result:
    at: float  # seconds since the start, when the request ended
    ms: float
    ok: bool
    degraded: bool
    injected: int = 0


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds, RSS kB)
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def fail(self, kind: str, detail: str) -> None:
        self.failures[kind] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{kind}: {detail[:300]}")


def stream_text(raw: bytes) -> tuple[str, bool]:
    """The content of an SSE chat stream, and whether it ended with [DONE]."""
    pieces, done = [], False
    for line in raw.decode().splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        for choice in json.loads(data).get("choices", []):
            pieces.append(choice.get("delta", {}).get("content") or "")
    return "".join(pieces), done


async def worker(
    index: int,
    http: httpx.AsyncClient,
    base: str,
    args: argparse.Namespace,
    run: Run,
    started: float,
    end: float,
) -> None:
    rng = random.Random(f"{args.seed}:{index}")
    scope = index % args.scopes
    history: list[dict[str, str]] = []
    number = 0
    while time.monotonic() < end:
        number += 1
        text = question(rng, scope, index * 1_000_000 + number)
        history.append({"role": "user", "content": text})
        stream = number % 3 == 0
        body = {"model": MODEL, "messages": history, "stream": stream}
        url = f"{base}/v1/partition/{partition(scope)}/instance/user/chat/completions"
        headers = {SCOPE_HEADER: f"{scope:03d}"}
        t0 = time.perf_counter()
        ok, degraded, injected, answer = False, False, 0, ""
        try:
            response = await http.post(url, json=body, headers=headers)
            if response.status_code != 200:
                run.fail("status", f"{response.status_code} {response.text}")
            else:
                degraded = response.headers.get("x-reservoir-status") == "degraded"
                injected = int(response.headers.get("x-soak-memory", "0"))
                done = True
                if stream:
                    answer, done = stream_text(response.content)
                else:
                    answer = response.json()["choices"][0]["message"]["content"]
                if leak := response.headers.get("x-soak-leak"):
                    run.fail("leak", f"scope {scope:03d} was sent messages of {leak}")
                elif not done:
                    run.fail("stream", "no [DONE]")
                elif answer != f"Echo: {text}":
                    run.fail("answer", f"{answer!r} for {text!r}")
                else:
                    ok = True
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            run.fail(type(exc).__name__, repr(exc))
        elapsed = (time.perf_counter() - t0) * 1000
        run.results.append(Result(time.monotonic() - started, elapsed, ok, degraded, injected))
        if ok and len(history) < 2 * MAX_TURNS - 1:
            history.append({"role": "assistant", "content": answer})
        else:  # a new conversation, in the next scope of this worker's round
            history = []
            scope = (scope + args.concurrency) % args.scopes if args.scopes > 1 else 0


async def sample_memory(pid: int, run: Run, started: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError):
            run.samples.append((time.monotonic() - started, status_kib(pid)["VmRSS"]))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def drive(port: int, pid: int, args: argparse.Namespace) -> tuple[Run, float, int]:
    run = Run()
    started = time.monotonic()
    run.samples.append((0.0, status_kib(pid)["VmRSS"]))
    end = started + args.seconds
    limits = httpx.Limits(max_connections=args.concurrency)
    stop = asyncio.Event()
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(args.timeout), limits=limits, trust_env=False
    ) as http:
        sampler = asyncio.ensure_future(sample_memory(pid, run, started, stop))
        base = f"http://127.0.0.1:{port}"
        await asyncio.gather(
            *(worker(i, http, base, args, run, started, end) for i in range(args.concurrency))
        )
        elapsed = time.monotonic() - started
        stop.set()
        await sampler
    memory = status_kib(pid)
    run.samples.append((elapsed, memory["VmRSS"]))
    return run, elapsed, memory["VmHWM"]


# -- report ------------------------------------------------------------------------


def rss_at(samples: Sequence[tuple[float, int]], at: float) -> int:
    """The first sample taken at or after `at` seconds (the last one if none)."""
    return next((kb for t, kb in samples if t >= at), samples[-1][1])


def summarise(
    run: Run, elapsed: float, peak_kb: int, stored: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    ok = [r for r in run.results if r.ok]
    after = [r for r in run.results if r.at >= args.warmup]
    start_kb = run.samples[0][1]
    warm_kb = rss_at(run.samples, args.warmup)
    end_kb = run.samples[-1][1]
    new_messages = 2 * sum(r.ok for r in after)  # written after the warm-up
    return {
        "seconds": round(elapsed, 1),
        "concurrency": args.concurrency,
        "scopes": args.scopes,
        "requests": len(run.results),
        "errors": len(run.results) - len(ok),
        "failures": dict(run.failures),
        "degraded": sum(r.degraded for r in run.results),
        "req_per_s": round(len(run.results) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(percentile([r.ms for r in after], 50), 2),
        "p99_ms": round(percentile([r.ms for r in after], 99), 2),
        "injected_mean": round(sum(r.injected for r in ok) / len(ok), 1) if ok else 0.0,
        "stored": stored.get("messages"),
        "expected_stored": 2 * len(ok),
        "drain_s": stored.get("drain_s"),
        "rss_start_mb": round(start_kb / 1024, 1),
        "rss_warm_mb": round(warm_kb / 1024, 1),
        "rss_end_mb": round(end_kb / 1024, 1),
        "rss_growth_mb": round((end_kb - warm_kb) / 1024, 1),
        "rss_growth_kb_per_message": round((end_kb - warm_kb) / new_messages, 2)
        if new_messages
        else None,
        "rss_peak_mb": round(peak_kb / 1024, 1),
        "rss_drained_mb": round(stored.get("rss_kb", 0) / 1024, 1),
    }


def report(run: Run, summary: dict[str, Any], args: argparse.Namespace) -> str:
    out = [
        f"Soak: {summary['seconds']:.0f} s, {args.concurrency} in flight, {args.scopes} scopes, "
        f"warm-up {args.warmup:g} s; loopback, embedded Chroma, the local embedding model, an "
        + (
            f"echo model answering in {args.model_ms:g} ms"
            if args.model_ms
            else "instant echo model"
        )
        + "; latency in ms, RSS of the server process in MB",
        "",
    ]
    rows = []
    edges = [0.0]
    while edges[-1] < args.seconds - 1e-9:
        edges.append(min(edges[-1] + args.interval, args.seconds))
    for lo, hi in itertools.pairwise(edges):
        last = hi == edges[-1]  # it takes the requests still in flight at the end too
        part = [r for r in run.results if lo <= r.at < hi or (last and r.at >= hi)]
        span = (summary["seconds"] if last else hi) - lo
        rows.append(
            [
                f"{lo:.0f}-{hi:.0f} s",
                str(len(part)),
                str(sum(not r.ok for r in part)),
                str(sum(r.degraded for r in part)),
                f"{len(part) / span:.1f}" if span else "-",
                f"{percentile([r.ms for r in part], 50):.1f}",
                f"{percentile([r.ms for r in part], 99):.1f}",
                f"{rss_at(run.samples, hi) / 1024:.1f}",
            ]
        )
    out.append(
        table(
            ["interval", "requests", "errors", "degraded", "req/s", "p50", "p99", "RSS"],
            rows,
        )
    )
    out.append("")
    s = summary
    out.append(
        table(
            [
                "requests",
                "errors",
                "degraded",
                "req/s",
                "p50",
                "p99",
                "stored/expected",
                "RSS start",
                "after warm-up",
                "end",
                "growth",
                "peak",
                "drain",
            ],
            [
                [
                    str(s["requests"]),
                    str(s["errors"]),
                    str(s["degraded"]),
                    f"{s['req_per_s']:.1f}",
                    f"{s['p50_ms']:.1f}",
                    f"{s['p99_ms']:.1f}",
                    f"{s['stored']}/{s['expected_stored']}",
                    f"{s['rss_start_mb']:.1f}",
                    f"{s['rss_warm_mb']:.1f}",
                    f"{s['rss_end_mb']:.1f}",
                    f"{s['rss_growth_mb']:+.1f}",
                    f"{s['rss_peak_mb']:.1f}",
                    f"{s['drain_s']:.1f} s",
                ]
            ],
        )
    )
    out.append("")
    per_message = s["rss_growth_kb_per_message"]
    out.append(
        "p50/p99 after warm-up. growth: RSS at the end minus after warm-up"
        + (f" ({per_message:.1f} kB per message stored meanwhile)" if per_message else "")
        + f"; peak: VmHWM; drain: time to write what was still queued when traffic "
        f"stopped (RSS then {s['rss_drained_mb']:.1f} MB). Memory messages injected per "
        f"request (mean) {s['injected_mean']}; python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs"
    )
    if s["failures"]:
        out.append("Failures: " + ", ".join(f"{k} {v}" for k, v in sorted(s["failures"].items())))
        out.extend(f"  {example}" for example in run.examples)
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=180.0, help="traffic time (180)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (8)")
    parser.add_argument("--scopes", type=int, default=16, help="scopes the traffic goes to (16)")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds before RSS growth counts (30, max 1/3)"
    )
    parser.add_argument(
        "--interval", type=float, default=None, help="seconds per table row (30, or 1/5 of it)"
    )
    parser.add_argument(
        "--model-ms", type=float, default=0.0, help="the stand-in model's answer time (0)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument(
        "--max-growth-mb", type=float, default=None, help="fail when RSS grows more after warm-up"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # child: its data dir
    args = parser.parse_args(argv)
    if args.serve is not None:
        return args
    if args.seconds <= 0 or args.concurrency < 1 or args.scopes < 1 or args.timeout <= 0:
        parser.error("--seconds, --concurrency, --scopes and --timeout must be positive")
    if args.model_ms < 0:
        parser.error("--model-ms must be >= 0")
    if args.warmup is None:
        args.warmup = min(30.0, args.seconds / 3)
    if args.interval is None:
        args.interval = 30.0 if args.seconds >= 150 else max(1.0, args.seconds / 5)
    if not 0 <= args.warmup < args.seconds or args.interval <= 0:
        parser.error("--warmup must be below --seconds, --interval positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        return serve_child(args.serve, args.model_ms)
    if not Path("/proc/self/status").exists():
        print("soak: needs /proc (Linux) to read the server's memory use", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="rsv-soak-") as tmp:
        script = str(Path(__file__).resolve())
        model = ["--model-ms", str(args.model_ms)]
        server = Child("server", [sys.executable, script, *model, "--serve", tmp], stop_timeout=60)
        try:
            port = server.wait_ready(180)
            print(f"server pid {server.pid} on port {port}; driving traffic ...", flush=True)
            run, elapsed, peak = asyncio.run(drive(port, server.pid, args))
            server.stop()
            stored = server.wait_for("stored", 120)
        finally:
            server.close()
    summary = summarise(run, elapsed, peak, stored, args)
    print(report(run, summary, args))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    problems = []
    if summary["errors"]:
        problems.append(f"{summary['errors']} requests failed")
    if summary["stored"] != summary["expected_stored"]:
        problems.append(
            f"{summary['stored']} messages stored, {summary['expected_stored']} expected"
        )
    if args.max_growth_mb is not None and summary["rss_growth_mb"] > args.max_growth_mb:
        problems.append(
            f"RSS grew {summary['rss_growth_mb']} MB after warm-up (max {args.max_growth_mb})"
        )
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
