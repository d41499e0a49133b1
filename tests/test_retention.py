"""Retention: messages older than their partition's `retention_days` (by their stored
time) go as a forgotten message goes, in the engine's background sweep or on demand."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reservoir_middleware import Reservoir
from reservoir_middleware.settings import PartitionPolicy
from reservoir_middleware.storage.inmemory import InMemoryStore
from tests.conftest import make_settings
from tests.test_cli_memory import run
from tests.test_deletion import files_holding

DAY = 86400.0
POLICIES = {"short": PartitionPolicy(retention_days=1), "keep-*": PartitionPolicy(retention_days=0)}


async def add_aged(engine: Reservoir, partition: str, tag: str) -> dict[str, str]:
    """Three messages 100, 10 and 0 days old; their texts by age."""
    texts = {
        age: f"{tag} note {age} days old, word {secrets.token_hex(5)}" for age in ("100", "10", "0")
    }
    for age, text in texts.items():
        at = time.time() - float(age) * DAY
        await engine.add(partition, "i", [{"role": "user", "content": text}], timestamp=at)
    return texts


async def texts_of(engine: Reservoir, partition: str) -> list[str]:
    return [r.text for r in await engine.recent(partition, "i", limit=100)]


@pytest.mark.parametrize("chroma_process", ["child", "inline"])
async def test_a_sweep_removes_what_is_past_retention_without_a_trace(
    tmp_path: Path, chroma_process: str
) -> None:
    settings = make_settings(
        tmp_path, chroma_process=chroma_process, retention_days=30, partitions=POLICIES
    )
    engine = Reservoir(settings)
    try:
        aged = {p: await add_aged(engine, p, p) for p in ("p", "short", "keep-a")}
        await engine.add("old", "i", [{"role": "user", "content": "ancient"}], timestamp=1e9)

        told = await engine.retention(apply=False)  # a dry run removes nothing
        rows = {(r.scope.partition, r.retention_days, r.expired, r.removed) for r in told}
        assert rows == {("p", 30, 1, 0), ("short", 1, 2, 0), ("old", 30, 1, 0)}
        assert len(await texts_of(engine, "p")) == 3

        done = await engine.retention()
        removed = {(r.scope.partition, r.expired, r.removed) for r in done}
        assert removed == {("p", 1, 1), ("short", 2, 2), ("old", 1, 1)}
        assert await texts_of(engine, "p") == [aged["p"]["10"], aged["p"]["0"]]
        assert await texts_of(engine, "short") == [aged["short"]["0"]]
        assert await texts_of(engine, "keep-a") == list(aged["keep-a"].values())
        assert "old" not in {s.partition for s in engine.store.scopes()}  # a whole scope
        for gone in (aged["p"]["100"], aged["short"]["100"], aged["short"]["10"]):
            assert files_holding(settings.data_dir, gone.encode()) == []
            word = gone.rsplit(" ", 1)[1]
            for partition in ("p", "short"):
                for semantic in (True, False):
                    hits = await engine.search(partition, "i", word, semantic=semantic)
                    assert all(h.record.text != gone for h in hits)
        for kept in (aged["p"]["10"], aged["short"]["0"]):
            word = kept.rsplit(" ", 1)[1]
            partition = "p" if kept in aged["p"].values() else "short"
            (hit,) = await engine.search(partition, "i", word, semantic=False, limit=1)
            assert hit.record.text == kept
        assert await engine.retention() == []  # nothing left to remove
    finally:
        await engine.close()


async def test_the_engine_sweeps_by_itself_at_start(tmp_path: Path) -> None:
    engine = Reservoir(make_settings(tmp_path, retention_days=30), store=InMemoryStore())
    try:
        aged = await add_aged(engine, "p", "p")
        await engine.warm_up()  # (as the middleware does at start-up)
        for _ in range(200):
            if len(await texts_of(engine, "p")) == 2:
                break
            await asyncio.sleep(0.05)
        assert await texts_of(engine, "p") == [aged["10"], aged["0"]]
    finally:
        await engine.close()


async def test_no_retention_keeps_everything(tmp_path: Path) -> None:
    engine = Reservoir(make_settings(tmp_path), store=InMemoryStore())
    try:
        await add_aged(engine, "p", "p")
        await engine.warm_up()
        assert await engine.retention() == []
        assert len(await texts_of(engine, "p")) == 3
    finally:
        await engine.close()


def test_the_cli_counts_then_removes(tmp_path: Path) -> None:
    data_dir = tmp_path / "memory"
    aged = {age: f"note {age} days old {secrets.token_hex(5)}" for age in ("100", "10", "0")}
    # another process stores them (embedded Chroma is one process's at a time)
    script = (
        "import asyncio, sys, time\n"
        "from reservoir_middleware import Reservoir, ReservoirSettings\n"
        "async def main():\n"
        f"    engine = Reservoir(ReservoirSettings(data_dir={str(data_dir)!r}, "
        "chroma_process='inline'))\n"
        f"    for age, text in {aged!r}.items():\n"
        "        message = [{'role': 'user', 'content': text}]\n"
        "        at = time.time() - float(age) * 86400\n"
        "        await engine.add('acme', 'i', message, timestamp=at)\n"
        "    await engine.close()\n"
        "asyncio.run(main())\n"
    )
    made = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert made.returncode == 0, made.stderr
    env = {
        "PATH": "/usr/bin:/bin",
        "RSV_CONFIG_FILE": str(tmp_path / "reservoir.toml"),
        "RSV_DATA_DIR": str(data_dir),
        "RSV_RETENTION_DAYS": "30",
        "RSV_PARTITIONS": json.dumps({"acme": {"retention_days": 5}}),
    }
    dry = run(env, "retention")
    assert dry.returncode == 0, dry.stderr
    assert "acme/i: would remove 2 message(s) older than 5 day(s)" in dry.stdout
    assert "run with --apply" in dry.stdout
    assert files_holding(data_dir, aged["100"].encode())
    done = run(env, "retention", "--apply")
    assert done.returncode == 0, done.stderr
    assert "acme/i: removed 2 message(s) older than 5 day(s)" in done.stdout
    assert files_holding(data_dir, aged["100"].encode()) == []
    assert files_holding(data_dir, aged["10"].encode()) == []
    view = run(env, "view", "10", "-p", "acme", "-i", "i")
    assert view.stdout.strip().endswith(aged["0"])
    assert (
        "no retention set"
        in run({**env, "RSV_RETENTION_DAYS": "0", "RSV_PARTITIONS": "{}"}, "retention").stdout
    )
