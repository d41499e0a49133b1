"""Embedded Chroma in a child process, so that writing memory never stalls a request.

A Chroma upsert in this process holds the interpreter for 5-20 ms (its Rust
binding does not release it) and would stop every request that runs
meanwhile. So in embedded mode (no `chroma_url`) the gateway starts Chroma's
own server (`chroma run`, shipped in the chromadb wheel) on the data
directory, on a free loopback port, at a lower CPU priority, and talks to it
like to any Chroma server; requests read their memory from this process's
in-memory copy and never wait for it. The child is this process's alone: it
dies with it (it watches a pipe from us), the data directory stays locked by
us, and it is stopped when the store closes or the interpreter exits.

With the built-in embedding model the child also embeds what is written (the
answers, mostly: about 8 ms of CPU each, more than the request path's whole
budget), so that this work too runs at the lower priority; the query of a
request is still embedded in this process, at once.

Run as `python -m reservoir_middleware.storage._child --path DIR --port N
[--embed-fd FD --embed-threads N]`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import http.client
import json
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from reservoir_middleware._malloc import return_large_blocks, trim, wipe_freed_memory
from reservoir_middleware._private import PRIVATE_UMASK, private_open

logger = logging.getLogger("reservoir")

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
EMBED_TIMEOUT_S = 60.0
TRIM_AFTER_IDLE_S = 2.0  # no embedding for this long: freed buffers go back to the system
NICENESS = 10  # writes yield the CPU to requests when both want it
LOG_FILE = "chroma-server.log"


class ChromaServerError(RuntimeError):
    """The child Chroma process could not be started, or could not embed."""


class ChromaServer:
    """One child `chroma run` serving a data directory on 127.0.0.1 (and, with
    `embed_threads`, embedding texts with the built-in model)."""

    def __init__(self, data_dir: Path, *, embed_threads: int | None = None) -> None:
        self.data_dir = data_dir
        self.key = _dir_key(data_dir)
        self.embed_threads = embed_threads
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._embed_sock: socket.socket | None = None
        self._embed_lock = threading.Lock()
        self.users = 0  # stores using it (shared_server)
        self.embedded = 0  # texts the child has embedded
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> str:
        """Start the server (or make sure it still runs); its URL."""
        with self._lock:
            if self.alive():
                return self.url
            if self._proc is not None:
                _reap(self._proc)
                logger.warning(
                    "the memory's Chroma process exited with %s; starting it again (see %s)",
                    self._proc.returncode,
                    self.data_dir / LOG_FILE,
                )
            last: Exception | None = None
            for _ in range(3):  # a port taken between our probe and its bind
                try:
                    self._spawn()
                    return self.url
                except ChromaServerError as exc:
                    last = exc
            assert last is not None
            raise last

    def _spawn(self) -> None:
        if self._embed_sock is not None:  # the previous child's
            self._embed_sock.close()
            self._embed_sock = None
        self.port = _free_port()
        command = [
            sys.executable,
            "-m",
            "reservoir_middleware.storage._child",
            "--path",
            str(self.data_dir),
            "--port",
            str(self.port),
        ]
        ours: socket.socket | None = None
        theirs: socket.socket | None = None
        if self.embed_threads:
            ours, theirs = socket.socketpair()
            command += ["--embed-fd", str(theirs.fileno()), "--embed-threads"]
            command.append(str(self.embed_threads))
        log = private_open(self.data_dir / LOG_FILE, os.O_WRONLY | os.O_APPEND)  # the child's
        env = dict(os.environ, ANONYMIZED_TELEMETRY="False")
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(theirs.fileno(),) if theirs is not None else (),
                start_new_session=True,  # a Ctrl-C meant for the gateway is not its
                umask=PRIVATE_UMASK,  # what Chroma creates is the owner's only
            )
        except BaseException:
            if ours is not None:
                ours.close()
            raise
        finally:
            os.close(log)
            if theirs is not None:
                theirs.close()
        self._proc = proc
        if ours is not None:
            ours.settimeout(EMBED_TIMEOUT_S)
        self._embed_sock = ours
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.stop()  # releases its pipe and our socket end
                raise ChromaServerError(
                    f"the memory's Chroma process exited with {proc.returncode} at start-up; "
                    f"see {self.data_dir / LOG_FILE}"
                )
            if _heartbeat(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise ChromaServerError(
            f"the memory's Chroma process did not answer within {START_TIMEOUT_S:.0f} s; "
            f"see {self.data_dir / LOG_FILE}"
        )

    def embed(self, texts: list[str]) -> list[NDArray[np.float32]]:
        """Embed texts in the child (built-in model); raises if it cannot."""
        if not texts:
            return []
        with self._embed_lock:
            sock = self._embed_sock
            if sock is None or not self.alive():
                raise ChromaServerError("the memory's Chroma process is not running")
            payload = json.dumps(texts, ensure_ascii=False).encode("utf-8", "surrogatepass")
            try:
                sock.sendall(struct.pack("!I", len(payload)) + payload)
                status, size = struct.unpack("!II", _recv_exact(sock, 8))
                body = _recv_exact(sock, size)
            except OSError as exc:
                self._embed_sock = None  # out of step now: not used again
                sock.close()
                raise ChromaServerError(f"embedding in the memory's process failed: {exc}") from exc
        if status != 0:
            raise ChromaServerError(body.decode("utf-8", "replace"))
        matrix = np.frombuffer(body, dtype=np.float32).reshape(len(texts), -1)
        self.embedded += len(texts)
        return list(matrix)

    def stop(self) -> None:
        sock, self._embed_sock = self._embed_sock, None
        if sock is not None:
            sock.close()
        proc, self._proc = self._proc, None
        if proc is not None:
            _reap(proc)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Stop a child (it exits when its stdin closes) and release its pipe."""
    with contextlib.suppress(OSError):
        assert proc.stdin is not None
        proc.stdin.close()
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)


_SHARED: dict[str, ChromaServer] = {}
_SHARED_LOCK = threading.Lock()


def shared_server(data_dir: Path, *, embed_threads: int | None) -> ChromaServer:
    """One child per data directory in a process: every engine on it (the
    gateway's, an admin's) talks to the same server, never to a second one
    writing the same files."""
    key = _dir_key(data_dir)
    with _SHARED_LOCK:
        server = _SHARED.get(key)
        if server is None:
            server = _SHARED[key] = ChromaServer(data_dir, embed_threads=embed_threads)
        server.users += 1
        return server


def release(server: ChromaServer) -> None:
    """One user less (a store was dropped); the last one stops the child."""
    with _SHARED_LOCK:
        server.users -= 1
        if server.users > 0:
            return
        if _SHARED.get(server.key) is server:
            del _SHARED[server.key]
    server.stop()


def _dir_key(data_dir: Path) -> str:
    return str(data_dir.expanduser().resolve())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _heartbeat(port: int) -> bool:
    """Chroma answers (http.client: no proxy from the environment on loopback)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        connection.request("GET", "/api/v2/heartbeat")
        with connection.getresponse() as response:  # it holds the socket until closed
            response.read()
            return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise ConnectionResetError("the other side closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _serve_embeddings(sock: socket.socket, threads: int) -> None:
    """Answer embedding requests from the parent until it closes the socket."""
    from reservoir_middleware.memory import _minilm  # not `embeddings`: no chromadb here

    _minilm.load(threads)
    # poll, not select: the socket keeps the gateway's descriptor number, over 1,024
    # in a busy gateway, which select() refuses
    waiting = select.poll()
    waiting.register(sock, select.POLLIN)
    trimmed = True  # nothing embedded since the last trim
    while True:
        try:
            if not trimmed and not waiting.poll(TRIM_AFTER_IDLE_S * 1000):
                trim()  # idle: give back what the last batches' buffers left in the heap
                trimmed = True
            (size,) = struct.unpack("!I", _recv_exact(sock, 4))
            trimmed = False
            texts = json.loads(_recv_exact(sock, size).decode("utf-8", "surrogatepass"))
        except (OSError, ValueError):
            return
        try:
            vectors = np.stack(_minilm.embed(texts, threads=threads)).astype(np.float32)
            status, body = 0, vectors.tobytes()
        except Exception as exc:  # answered, not fatal: the parent embeds itself
            status, body = 1, f"{type(exc).__name__}: {exc}".encode()
        try:
            sock.sendall(struct.pack("!II", status, len(body)) + body)
        except OSError:
            return


def _run_chroma(path: str, port: int) -> None:
    import chromadb_rust_bindings  # the server `chroma run` starts

    try:
        chromadb_rust_bindings.cli(
            ["chroma", "run", "--path", path, "--host", "127.0.0.1", "--port", str(port)]
        )
    finally:
        os._exit(1)  # the server must not end on its own


def _exit_with_parent() -> None:
    """Block until the parent closes our stdin (it stopped us, or it died), then exit."""
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--embed-fd", type=int)
    parser.add_argument("--embed-threads", type=int, default=1)
    args = parser.parse_args(argv)
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    return_large_blocks()  # the buffers of a batch of long answers: freed, not kept
    wipe_freed_memory()  # no freed text reaches an index file as uninitialised bytes
    if hasattr(os, "nice"):
        with contextlib.suppress(OSError):
            os.nice(NICENESS)
    server = threading.Thread(
        target=_run_chroma, args=(args.path, args.port), name="chroma", daemon=True
    )
    server.start()
    if args.embed_fd is not None:
        _serve_embeddings(socket.socket(fileno=args.embed_fd), args.embed_threads)
        os._exit(0)  # the parent closed the socket: it stopped us, or it died
    server.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
