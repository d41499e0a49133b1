"""Where the memory of an idle `reservoir serve` goes.

    python bench/footprint.py               # the RSS table: ~30 s
    python bench/footprint.py --imports     # and what each import / load step costs
    cd /tmp && PYTHONPATH=/path/to/other/tree python /path/to/bench/footprint.py  # another tree

**Processes.** In child processes on 127.0.0.1: a stand-in model (a tiny
Starlette app answering every chat request at once), `reservoir serve` with
its defaults (embedded Chroma in its own child process, the built-in embedding
model), its data in a temporary `RSV_DATA_DIR`, its `openai` provider pointed
at the stand-in; and the baseline "bare": a Starlette app that forwards the
chat request to the stand-in with httpx, the gateway's shape without memory.

**Sequence.** Once the gateway is up and idle (its warm-up done), each server
gets one chat request; once the gateway's is stored (question and answer in
`memory/recent`), a second one, stored too. Then we wait until the processes
are idle (their CPU time stands still for 2 s) and read VmRSS, RssAnon and
VmHWM (peak) from /proc/<pid>/status `--samples` times, `--interval` s apart:
the median RSS and the last peak. The Chroma child is the gateway's child
process.

**--imports** runs, in a fresh interpreter per process, the steps each takes
(imports, token encodings, the embedding model, embeddings; the child's own
embedding loop on a socket pair) and prints the RSS each step adds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

PARTITION, INSTANCE = "bench", "footprint"
IDLE_S = 3.0  # the child gives freed buffers back after 2 s without work
ADMIN_KEY = "footprint-admin-key"
QUESTIONS = (
    "My sister Ana moved to Porto last spring and now runs a small bakery there.",
    "What did I tell you about my sister?",
)


# -- the servers (run as children of this script) --------------------------------------


def upstream_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        text = body["messages"][-1].get("content")
        message = {"role": "assistant", "content": f"Noted: {text}"}
        return JSONResponse(
            {
                "id": "chatcmpl-footprint",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "gpt-4o"),
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        )

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )


def bare_app(upstream: str) -> Any:
    """The gateway's shape without memory: forward the chat request, return the answer."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    client: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            client["http"] = http
            yield

    async def chat(request: Request) -> Response:
        answer = await client["http"].post(
            f"{upstream}/chat/completions",
            content=await request.body(),
            headers={"content-type": "application/json"},
        )
        return Response(answer.content, answer.status_code, media_type="application/json")

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def run_server(role: str, port: int, upstream: str) -> int:
    import uvicorn

    app = upstream_app() if role == "upstream" else bare_app(upstream)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    return 0


# -- processes ------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def started(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn shuts down; the gateway stops its child
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def wait_until_up(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, VmHWM of a process, KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def wait_idle(pids: Sequence[int], quiet: float = 2.0, timeout: float = 60.0) -> None:
    """Until the processes' CPU time stands still for `quiet` seconds (bounded)."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        ticks = sum(cpu_ticks(pid) for pid in pids)
        if ticks != last:
            last, since = ticks, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.2)


# -- the measurement ------------------------------------------------------------------


def chat(http: httpx.Client, url: str, text: str) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
    response = http.post(url, json=body)
    response.raise_for_status()


def wait_stored(http: httpx.Client, base: str, count: int, timeout: float = 30.0) -> None:
    url = f"{base}/v1/partition/{PARTITION}/instance/{INSTANCE}/memory/recent?limit=50"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = http.get(url, headers={"authorization": f"Bearer {ADMIN_KEY}"})
        if response.status_code == 200 and len(response.json().get("messages", [])) >= count:
            return
        time.sleep(0.1)
    raise SystemExit(f"the gateway did not store {count} messages within {timeout:.0f} s")


def sample(pids: dict[str, int], samples: int, interval: float) -> dict[str, dict[str, float]]:
    seen: dict[str, list[dict[str, int]]] = {name: [] for name in pids}
    for index in range(samples):
        for name, pid in pids.items():
            seen[name].append(status(pid))
        if index + 1 < samples:
            time.sleep(interval)
    return {
        name: {
            "rss": statistics.median(s["VmRSS"] for s in rows) / 1024,
            "anon": statistics.median(s["RssAnon"] for s in rows) / 1024,
            "peak": rows[-1]["VmHWM"] / 1024,
        }
        for name, rows in seen.items()
    }


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, float]]:
    script = str(Path(__file__).resolve())
    up_port, bare_port, gw_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    env = {
        **os.environ,
        "RSV_PORT": str(gw_port),
        "RSV_DATA_DIR": str(tmp / "mem"),
        "RSV_OPENAI_BASE_URL": upstream,
        "RSV_CONFIG_FILE": str(tmp / "none.toml"),
        "OPENAI_API_KEY": "sk-footprint",
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("RSV_CHROMA_URL", "RSV_WORKERS", "RSV_API_KEYS"):
        env.pop(name, None)
    env["RSV_ADMIN_KEY"] = ADMIN_KEY  # memory/recent tells when a request is stored
    serve = [sys.executable, "-m", "reservoir_middleware.cli", "serve", "--log-level", "warning"]
    gateway = f"http://127.0.0.1:{gw_port}"
    bare = f"http://127.0.0.1:{bare_port}"
    with (
        started([sys.executable, script, "--role", "upstream", "--port", str(up_port)],
                env, tmp / "upstream.log") as up,
        started([sys.executable, script, "--role", "bare", "--port", str(bare_port),
                 "--upstream", upstream], env, tmp / "bare.log") as bare_proc,
        started(serve, env, tmp / "gateway.log") as gw,
        httpx.Client(timeout=60, trust_env=False) as http,
    ):  # fmt: skip
        wait_until_up(up, f"{upstream}/models", tmp / "upstream.log", 30)
        wait_until_up(bare_proc, f"{bare}/health", tmp / "bare.log", 30)
        wait_until_up(gw, f"{gateway}/health", tmp / "gateway.log", 120)
        wait_idle([gw.pid, *children_of(gw.pid)])  # warm-up done: no request times out on it
        scoped = f"{gateway}/v1/partition/{PARTITION}/instance/{INSTANCE}/chat/completions"
        for count, text in enumerate(QUESTIONS, 1):
            chat(http, scoped, text)
            chat(http, f"{bare}/v1/chat/completions", text)
            wait_stored(http, gateway, 2 * count)
        kids = children_of(gw.pid)
        if len(kids) != 1:
            raise SystemExit(f"expected one Chroma child of the gateway, found {kids}")
        pids = {"gateway": gw.pid, "chroma child": kids[0], "bare": bare_proc.pid}
        wait_idle([*pids.values(), up.pid])
        pids["stand-in model"] = up.pid
        return sample(pids, args.samples, args.interval)


def report(found: dict[str, dict[str, float]]) -> str:
    total = {k: found["gateway"][k] + found["chroma child"][k] for k in ("rss", "anon", "peak")}
    rows = [
        ("gateway", found["gateway"]),
        ("chroma child", found["chroma child"]),
        ("gateway + child", total),
        ("bare app (baseline)", found["bare"]),
        ("stand-in model", found["stand-in model"]),
    ]
    lines = [
        "| process | RSS MiB (median) | anon MiB | peak RSS MiB |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {n} | {v['rss']:.1f} | {v['anon']:.1f} | {v['peak']:.1f} |" for n, v in rows]
    return "\n".join(lines)


# -- --imports: the cost of each step --------------------------------------------------

# (what the table says, the code run), or the code alone; each process in a fresh interpreter
STEPS: dict[str, list[str | tuple[str, str]]] = {
    "gateway (reservoir serve)": [
        "import reservoir_middleware.cli.main",
        "import reservoir_middleware.gateway.app",
        "import uvicorn",
        (
            "the o200k_base encoding",
            "from reservoir_middleware.memory.tokens import get_encoding\n"
            "get_encoding('o200k_base')",
        ),
        ("the cl100k_base encoding (GPT-4 / 3.5)", "get_encoding('cl100k_base')"),
        (
            "the embedding model (2 threads)",
            "from reservoir_middleware.memory.embeddings import MiniLMEmbedding\n"
            "model = MiniLMEmbedding(threads=2)\nmodel.load()",
        ),
        ("embed a query", "model.embed(['what did I tell you about my sister?'])"),
        ("embed 8 long answers", "model.embed(['a longer answer about the bakery ' * 40] * 8)"),
        ("malloc_trim", "import ctypes\nctypes.CDLL(None).malloc_trim(0)"),
    ],
    "chroma child (its embedding loop, on a socket pair)": [
        "import reservoir_middleware.storage._child",
        "import chromadb_rust_bindings",
        ("load the model, embed a question", "ask(['what did I tell you about my sister?'])"),
        ("embed 8 long answers", "ask(['a longer answer about the bakery ' * 40] * 8)"),
        (f"idle {IDLE_S:.0f} s", f"time.sleep({IDLE_S})"),
    ],
}

STEP_RUNNER = """
import json, socket, struct, sys, threading, time
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
def ask(texts):  # what ChromaServer.embed sends the child
    global ours
    if 'ours' not in globals():
        from reservoir_middleware.storage import _child
        ours, theirs = socket.socketpair()
        threading.Thread(target=_child._serve_embeddings, args=(theirs, 1), daemon=True).start()
    payload = json.dumps(texts).encode()
    ours.sendall(struct.pack('!I', len(payload)) + payload)
    from reservoir_middleware.storage._child import _recv_exact
    status, size = struct.unpack('!II', _recv_exact(ours, 8))
    assert status == 0, _recv_exact(ours, size)
    _recv_exact(ours, size)
env, prev = {'ask': ask, 'time': time}, rss()
print(f"| (interpreter) | {prev:.1f} | | |")
for label, step in zip(sys.argv[1::2], sys.argv[2::2]):
    start = time.perf_counter()
    exec(step, env)
    now = rss()
    heavy = sorted(m for m in ('chromadb', 'onnxruntime', 'tokenizers', 'tiktoken', 'numpy',
        'pydantic', 'httpx', 'starlette', 'litellm', 'fastapi', 'opentelemetry')
        if m in sys.modules)
    print(f"| {label} | {now - prev:+.1f} | {(time.perf_counter() - start) * 1000:.0f} "
          f"| {len(sys.modules)}: {', '.join(heavy)} |")
    prev = now
"""


def _pair(step: str | tuple[str, str]) -> tuple[str, str]:
    return (step, step) if isinstance(step, str) else step


def imports_report() -> str:
    out = []
    for process, steps in STEPS.items():
        result = subprocess.run(
            [sys.executable, "-c", STEP_RUNNER, *(p for s in steps for p in _pair(s))],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise SystemExit(result.stderr)
        out += [
            f"\n{process}: RSS each step adds, in a fresh interpreter",
            "| step | MiB | ms | modules: heavy ones loaded |",
            "|---|---:|---:|---|",
            result.stdout.rstrip(),
        ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--imports", action="store_true", help="also the cost of each step")
    parser.add_argument("--role", choices=["upstream", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        return run_server(args.role, args.port, args.upstream)
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        found = measure(args, Path(tmp))
    print(
        f"Idle RSS after two stored chat requests (median of {args.samples} samples, "
        f"{args.interval} s apart; peak = VmHWM):\n"
    )
    print(report(found))
    print(json.dumps({"footprint_mib": found}))
    if args.imports:
        print(imports_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
