"""What the benchmarks share: child processes, memory figures, percentiles, tables, and
the stand-in model's chat completions.

A bench measures servers in child processes (its own script, run again with a
hidden flag), so that a server's memory and CPU are its own. The protocol is a
pipe each way: the child prints one JSON event per line on stdout, prefixed with
`EVENT_PREFIX` (`ready` with its port, and whatever the bench adds); the parent
stops it by closing its stdin, which also happens when the parent dies, so no
server outlives a bench.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EVENT_PREFIX = "BENCH-EVENT "

# -- in the child ---------------------------------------------------------------------


def emit(event: dict[str, Any]) -> None:
    """Tell the parent something (one line on stdout; the other output is the child's log)."""
    print(EVENT_PREFIX + json.dumps(event), flush=True)


def watch_stdin(on_close: Callable[[], None]) -> None:
    """Call `on_close` when the parent closes our stdin (or dies, which closes it too)."""

    def run() -> None:
        with contextlib.suppress(Exception):
            sys.stdin.read()
        on_close()

    threading.Thread(target=run, daemon=True).start()


@functools.cache
def completion_builder() -> ModuleType:
    """The middleware's one chat-completion builder (`asgi/_replies.py`), loaded from its
    file: importing it through the package would load the whole middleware (the engine,
    numpy, Chroma's client) into the bare model server, whose memory is the baseline.
    Loaded once: the stand-in model answers in microseconds."""
    path = ROOT / "reservoir_middleware" / "asgi" / "_replies.py"
    spec = importlib.util.spec_from_file_location("rsv_bench_replies", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- in the parent --------------------------------------------------------------------


class Child:
    """A child process that reports events on stdout; its other output is its log
    (to `log`, else to stderr with its label). Stopped by closing its stdin."""

    def __init__(
        self,
        label: str,
        argv: list[str],
        on_event: Callable[[dict[str, Any]], None] = lambda event: None,
        *,
        log: IO[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stop_timeout: float = 30.0,
    ):
        self.label = label
        self.stop_timeout = stop_timeout
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.on_event = on_event
        self.log = log
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if log is not None else None,
            text=True,
            bufsize=1,
            env=env,
            cwd=cwd,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(EVENT_PREFIX):
                self.events.put(json.loads(line[len(EVENT_PREFIX) :]))
            elif self.log is not None:
                with contextlib.suppress(ValueError):  # closed at the very end
                    self.log.write(line)
            else:
                sys.stderr.write(f"[{self.label}] {line}")
        self.events.put(None)

    def wait_for(self, kind: str, timeout: float) -> dict[str, Any]:
        """The next event of this kind (the others go to `on_event` on the way)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.label}: no {kind!r} after {timeout:.0f} s")
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if event is None:
                raise RuntimeError(f"{self.label} exited with {self.proc.wait(10)}")
            self.on_event(event)
            if event["event"] == kind:
                return event

    def wait_ready(self, timeout: float) -> int:
        """The port the child serves on, once it says so."""
        return int(self.wait_for("ready", timeout)["port"])

    def stop(self) -> None:
        """Ask the child to stop (it may still report, e.g. what it wrote at shutdown)."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()

    def close(self) -> None:
        """Stop the child and wait for it; terminated, then killed, if it takes too long."""
        self.stop()
        try:
            self.proc.wait(self.stop_timeout)
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
    label: str, argv: list[str], on_event: Callable[[dict[str, Any]], None], **options: Any
) -> Iterator[Child]:
    """A `Child` that is stopped on the way out, on error and on Ctrl-C too."""
    proc = Child(label, argv, on_event, **options)
    try:
        yield proc
    finally:
        proc.close()


def free_port() -> int:
    """A free port on 127.0.0.1, for a child that cannot report the one it took."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- memory ---------------------------------------------------------------------------


def status_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS of one live process, in KiB (OSError if gone)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(rest.split()[0])
    return out


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS of a live process plus its child processes (the middleware's
    Chroma child), in KiB: what the server costs, whichever process holds it."""
    out: dict[str, int] = {}
    for each in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            for key, kib in status_kib(each).items():
                out[key] = out.get(key, 0) + kib
    return out


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, of in parents.items() if of == parent]
        found += children
        frontier += children
    return found


def mib(kib: dict[str, int], key: str = "VmHWM") -> float:
    return kib[key] / 1024 if key in kib else float("nan")


# -- figures --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float, *, nearest: bool = False) -> float:
    """The q-th percentile, interpolated between the two nearest values (NaN for none);
    `nearest`: the value nearest that rank, for a few samples (no made-up value)."""
    if not values:
        return float("nan")
    if nearest:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]
    return float(np.percentile(np.asarray(values, dtype=float), q))


def aligned_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table padded to line up in a terminal: figures right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A compact markdown table (for the README); `align`: "l" or "r" per column."""
    marks = {"l": "---", "r": "---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
