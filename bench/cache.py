"""Does memory keep the provider's prompt cache? LongMemEval sessions played live.

    python bench/cache.py                                   # 8 questions, last 2 sessions each
    python bench/cache.py --questions 0100672e,09d032c9 --sessions 3
    python bench/cache.py --data-dir ~/.cache/rsv-cache     # keep the filled store, reuse it

Providers bill a prompt prefix they have seen at a fraction of the price and
skip its prefill (OpenAI, Anthropic and Gemini prompt caching; vLLM and
SGLang prefix caching). A client that re-sends its history sends, on each
turn, the previous request plus the new turns: almost all of it is such a
prefix, unless memory changes it.

For each LongMemEval development question (`../shared/datasets/longmemeval/`
or `--dataset`), every haystack session but the last `--sessions` (by date)
is stored in the user's scope through `Reservoir.add`, with its date: that is
the user's memory. The last sessions are then played live, one conversation
each, through `ReservoirMiddleware` (its default settings: memory budget
2,000 tokens) in front of a recording stand-in model that answers with the
session's own assistant turns: turn k sends the system prompt and the
session's first k user turns with the k-1 answers. The filled store is copied
before playing, so every run starts from the same memory.

Measured on what the model receives, tokenised with o200k_base (each
message: its role, then its content):
- prefix share: over all requests, the tokens that are a prefix of an earlier
  request of the same conversation (the longest such prefix), over all tokens;
  "without memory" is the same for the requests as the client sent them;
- uncached tokens per request: the tokens after that prefix;
- requests with memory: those where a memory block is in the request.
The target (issue 23): the share with memory at least 0.9 times the share
without, with memory on at least 80% of the requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
from _harness import markdown_table
from longmemeval import DATASET_DIR, Question, Session, load_question, question_files, session_ids
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reservoir_middleware import Reservoir, ReservoirMiddleware, ReservoirSettings, Scope
from reservoir_middleware.asgi._replies import chat_completion
from reservoir_middleware.context import MEMORY_OPEN
from reservoir_middleware.memory.tokens import get_encoding
from reservoir_middleware.records import content_text

PARTITION = "lme-cache"
MODEL = "gpt-4o-mini"
SYSTEM = "You are a helpful assistant."
SEPARATOR = -1  # between messages in a token sequence: never a token id


class Recorder:
    """The stand-in model: records what it receives, answers with the next scripted reply."""

    def __init__(self) -> None:
        self.replies: list[str] = []
        self.received: list[list[dict[str, Any]]] = []

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.received.append(body["messages"])
        reply = self.replies.pop(0) if self.replies else "OK."
        return JSONResponse(chat_completion(reply, body.get("model", MODEL), usage=(10, 5)))


def tokens(messages: Sequence[dict[str, Any]]) -> list[int]:
    encoding = get_encoding("o200k_base")
    out: list[int] = []
    for message in messages:
        out += encoding.encode_ordinary(str(message.get("role")))
        out += encoding.encode_ordinary(content_text(message.get("content")))
        out.append(SEPARATOR)
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Shares:
    """Prefix and uncached tokens of a series of conversations' requests."""

    total: int = 0
    cached: int = 0
    uncached: list[int] = field(default_factory=list)

    def add_conversation(self, requests: list[list[int]]) -> None:
        for k, request in enumerate(requests):
            prefix = max((common_prefix(request, earlier) for earlier in requests[:k]), default=0)
            self.total += len(request)
            self.cached += prefix
            self.uncached.append(len(request) - prefix)

    @property
    def share(self) -> float:
        return self.cached / self.total if self.total else 0.0


def played_sessions(question: Question, count: int) -> tuple[list[Session], list[Session]]:
    """The sessions stored as memory, and the last `count` (by date), played."""
    return question.sessions[:-count], question.sessions[-count:]


async def fill(memory: Reservoir, question: Question, stored: list[Session]) -> int:
    scope = Scope(PARTITION, question.instance)
    unique = list(dict.fromkeys(i for s in stored for i in session_ids(scope, s)))
    count = await anyio.to_thread.run_sync(memory.store.count, scope)
    if count == len(unique):
        found = await anyio.to_thread.run_sync(memory.store.existing_ids, scope, unique)
        if len(found) == len(unique):
            return 0
    if count:
        await memory.delete(PARTITION, question.instance)
    written = 0
    for session in stored:
        messages = [{"role": t.role, "content": t.content} for t in session.turns]
        written += len(
            await memory.add(PARTITION, question.instance, messages, timestamp=session.date)
        )
    return written


@dataclass
class Played:
    without: Shares = field(default_factory=Shares)
    with_memory: Shares = field(default_factory=Shares)
    requests: int = 0
    with_block: int = 0
    memory_tokens: list[int] = field(default_factory=list)
    conversations: int = 0


def memory_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """Tokens of the memory blocks in a request."""
    encoding = get_encoding("o200k_base")
    total = 0
    for message in messages:
        text = content_text(message.get("content"))
        start = text.find(MEMORY_OPEN)
        if start >= 0:
            end = text.find("</memory>", start)
            total += len(encoding.encode_ordinary(text[start : end if end >= 0 else None]))
    return total


async def play(data_dir: Path, questions: list[Question], count: int, played: Played) -> None:
    recorder = Recorder()
    settings = ReservoirSettings(data_dir=data_dir, load_entry_points=False)
    middleware = ReservoirMiddleware(recorder.app(), settings=settings)
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for question in questions:
            url = f"/v1/partition/{PARTITION}/instance/{question.instance}/chat/completions"
            for session in played_sessions(question, count)[1]:
                sent: list[list[int]] = []
                received: list[list[int]] = []
                history: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
                turns = session.turns
                for index, turn in enumerate(turns):
                    if turn.role != "user":
                        continue
                    history.append({"role": "user", "content": turn.content})
                    answer = next(
                        (t.content for t in turns[index + 1 :] if t.role == "assistant"), "OK."
                    )
                    recorder.replies = [answer]
                    body = {"model": MODEL, "messages": history}
                    reply = await client.post(url, json=body, timeout=120)
                    reply.raise_for_status()
                    upstream = recorder.received[-1]
                    sent.append(tokens(history))
                    received.append(tokens(upstream))
                    blocks = memory_tokens(upstream)
                    played.requests += 1
                    played.with_block += blocks > 0
                    played.memory_tokens.append(blocks)
                    history.append({"role": "assistant", "content": answer})
                played.without.add_conversation(sent)
                played.with_memory.add_conversation(received)
                played.conversations += 1
        await middleware.reservoir.settle()
    await middleware.reservoir.close()


def report(played: Played) -> str:
    def row(name: str, shares: Shares, with_block: int, memory: list[int]) -> list[str]:
        return [
            name,
            f"{shares.share:.3f}",
            f"{statistics.mean(shares.uncached):.0f}",
            f"{statistics.median(shares.uncached):.0f}",
            f"{with_block / played.requests:.0%}",
            f"{statistics.median(memory):.0f}",
        ]

    header = [
        "",
        "prefix share",
        "uncached tokens / request (mean)",
        "(median)",
        "requests with memory",
        "memory tokens / request (median)",
    ]
    rows = [
        row("without memory", played.without, 0, [0]),
        row("with memory", played.with_memory, played.with_block, played.memory_tokens),
    ]
    ratio = played.with_memory.share / played.without.share if played.without.share else 0.0
    target = ratio >= 0.9 and played.with_block >= 0.8 * played.requests
    return (
        markdown_table(header, rows, "lrrrrr")
        + f"\n\nshare with / without memory: **{ratio:.3f}** (target >= 0.9, with memory on "
        f">= 80% of requests: {'met' if target else 'missed'})\n"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DATASET_DIR, help="LongMemEval directory")
    parser.add_argument("--questions", help="comma separated question ids (default: 8 of them)")
    parser.add_argument("--sessions", type=int, default=2, help="sessions played per question")
    parser.add_argument("--data-dir", type=Path, help="keep the filled store here and reuse it")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> str:
    files = question_files(args.dataset, args.questions)
    if not args.questions:
        files = files[:: max(1, len(files) // 8)][:8]
    questions = [load_question(p) for p in files]
    questions = [q for q in questions if len(q.sessions) > args.sessions]
    kept = args.data_dir or Path(tempfile.mkdtemp(prefix="rsv-cache-fill-"))
    filler = Reservoir(
        ReservoirSettings(
            data_dir=kept, load_entry_points=False, chroma_process="inline", journal=False
        )
    )
    await filler.warm_up()
    started = time.perf_counter()
    written = 0
    for question in questions:
        written += await fill(filler, question, played_sessions(question, args.sessions)[0])
        print(f"question {question.id}: filled", file=sys.stderr)
    await filler.settle()
    await filler.close()
    fill_note = (
        f"{written} turns stored in {time.perf_counter() - started:.0f} s"
        if written
        else f"reused the filled store in {kept}"
    )
    played = Played()
    with tempfile.TemporaryDirectory(prefix="rsv-cache-play-") as scratch:
        copy = Path(scratch) / "data"
        shutil.copytree(kept, copy)
        started = time.perf_counter()
        await play(copy, questions, args.sessions, played)
        seconds = time.perf_counter() - started
    if not args.data_dir:
        shutil.rmtree(kept, ignore_errors=True)
    command = shlex.join([sys.executable, *sys.argv])
    return "\n".join(
        [
            "# Prompt-cache prefix share: LongMemEval sessions played live\n",
            f"command: `cd {shlex.quote(os.getcwd())} && {command}`\n",
            f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}\n",
            f"dataset: {len(questions)} questions of {args.dataset}; memory: every session "
            f"but the last {args.sessions} ({fill_note}); played: {played.conversations} "
            f"conversations, {played.requests} requests in {seconds:.0f} s\n",
            report(played),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dataset.is_dir():
        print(f"no LongMemEval dataset in {args.dataset} (see --dataset)", file=sys.stderr)
        return 2
    print(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
