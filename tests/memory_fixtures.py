"""Engines on `InMemoryStore` for fast unit tests: no Chroma, no child process,
the real embedding model; and what several of those tests share."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from reservoir_middleware import MessageRecord, Reservoir, Scope, hookimpl
from reservoir_middleware.memory.embeddings import MiniLMEmbedding
from reservoir_middleware.storage.inmemory import InMemoryStore
from tests.conftest import make_settings
from tests.test_engine import CONVERSATION as CONVERSATION


def messages(pairs: list[tuple[str, str]] = CONVERSATION) -> list[dict[str, str]]:
    return [{"role": role, "content": text} for role, text in pairs]


def chat(text: str, *earlier: dict[str, Any]) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [*earlier, {"role": "user", "content": text}]}


def memory_engine(
    tmp_path: Path, *plugins: object, store: InMemoryStore | None = None, **overrides: Any
) -> Reservoir:
    """A `Reservoir` on an in-memory store; its journal and deletion records still
    live under `tmp_path` (they are files by design)."""
    settings = make_settings(tmp_path, **overrides)
    return Reservoir(settings, plugins, store=store if store is not None else InMemoryStore())


@functools.cache
def embedder() -> MiniLMEmbedding:
    """The default model, loaded once for the test session."""
    return MiniLMEmbedding(threads=1)


def vectors(texts: list[str]) -> list[list[float]]:
    return [[float(x) for x in v] for v in embedder()(texts)]


class Batches:
    """A store plugin that keeps what each write handed to the stores, in order."""

    def __init__(self) -> None:
        self.batches: list[list[MessageRecord]] = []

    @hookimpl
    def reservoir_store(
        self, scope: Scope, records: list[MessageRecord], embeddings: list[list[float]]
    ) -> None:
        self.batches.append(list(records))

    @property
    def texts(self) -> list[list[str]]:
        return [[r.text for r in batch] for batch in self.batches]


def leave_journal(data_dir: Path, entries: list[dict[str, Any]], *, tail: str = "") -> Path:
    """A journal file as a process that died leaves it: entries without their
    `done` line, no lock held, mode 0600; `tail` is appended as it is (a torn line)."""
    directory = data_dir / "journal"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "host-99999-t0-deadbeef.jsonl"
    lines = "".join(json.dumps(entry) + "\n" for entry in entries) + tail
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(lines)
    return path
