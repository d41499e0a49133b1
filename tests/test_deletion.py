"""A deleted scope leaves no byte of its text under the data directory, and does not come back."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reservoir_middleware import Reservoir
from reservoir_middleware.memory._journal import Journal
from reservoir_middleware.storage import _scrub as scrub
from tests.conftest import GatewayFactory, make_settings


def files_holding(directory: Path, marker: bytes) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and marker in p.read_bytes()]


def leave_a_dead_journal(data_dir: Path, partition: str, instance: str, text: str) -> None:
    """What a gateway killed before its write leaves behind: an unmarked entry, unlocked."""
    journal = Journal(data_dir / "journal")
    record = {"id": secrets.token_hex(8), "partition": partition, "instance": instance}
    journal.append(
        {
            "scope": [partition, instance],
            "trace_id": secrets.token_hex(8),
            "records": [{**record, "role": "user", "text": text}],
            "answer": None,
        }
    )
    assert journal._current is not None
    os.close(journal._current.fd)  # the process is gone: its flock with it


@pytest.mark.parametrize("chroma_process", ["child", "inline"])
async def test_deleted_text_is_nowhere_under_the_data_dir(
    tmp_path: Path, chroma_process: str
) -> None:
    marker = f"zebra-{secrets.token_hex(6)}"
    kept = f"okapi-{secrets.token_hex(6)}"
    settings = make_settings(tmp_path, chroma_process=chroma_process)
    data_dir = settings.data_dir
    engine = Reservoir(settings)
    try:
        await engine.add("gone", "i", [{"role": "user", "content": f"my code word is {marker}"}])
        await engine.add("stays", "i", [{"role": "user", "content": f"my code word is {kept}"}])
        leave_a_dead_journal(data_dir, "gone", "i", f"unsaved: {marker}")
        assert files_holding(data_dir, marker.encode())  # it was on disk
        assert await engine.delete("gone") == 1
        assert files_holding(data_dir, marker.encode()) == []
    finally:
        await engine.close()
    assert files_holding(data_dir, marker.encode()) == []

    again = Reservoir(settings)  # a restart replays the journals
    try:
        await again.warm_up()
        await again.settle()
        assert await again.recent("gone", "i") == []
        assert [r.text for r in await again.recent("stays", "i")] == [f"my code word is {kept}"]
    finally:
        await again.close()
    assert files_holding(data_dir, marker.encode()) == []
    assert files_holding(data_dir, kept.encode())


async def test_a_crash_then_delete_then_restart_does_not_bring_the_scope_back(
    tmp_path: Path,
) -> None:
    marker = f"zebra-{secrets.token_hex(6)}"
    settings = make_settings(tmp_path, chroma_process="inline")
    leave_a_dead_journal(settings.data_dir, "x", "i", f"unsaved: {marker}")
    engine = Reservoir(settings)  # `reservoir delete -p x` on the stopped gateway's directory
    try:
        await engine.delete("x")
    finally:
        await engine.close()
    assert files_holding(settings.data_dir, marker.encode()) == []
    again = Reservoir(settings)
    try:
        await again.warm_up()
        await again.settle()
        assert await again.recent("x", "i") == []
    finally:
        await again.close()


HOLD_WRITE_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")  # readers go on, no other writer
print("locked", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
"""


@contextlib.contextmanager
def write_lock_held(database: Path) -> Iterator[None]:
    """Another process holds the database's write lock for the block."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITE_LOCK, str(database)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.communicate(timeout=30)


async def test_a_delete_that_cannot_erase_the_text_says_so_and_keeps_the_scope(
    gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scrub, "ERASE_BUSY_S", 0.5, raising=False)  # not a minute
    admin = {"x-reservoir-admin-key": "adm-secret-1"}
    marker = f"zebra-{secrets.token_hex(6)}"
    async with gateway_factory(admin_key="adm-secret-1") as gw:
        text = f"my code word is {marker}"
        await gw.reservoir.add("p", "i", [{"role": "user", "content": text}])
        assert [r.text for r in await gw.stored()] == [text]
        database = gw.reservoir.settings.data_dir / "chroma.sqlite3"
        with write_lock_held(database):
            response = await gw.http.delete(f"{gw.base()}/memory", headers=admin)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "delete_failed"
        assert "cannot be erased" in error["message"]
        assert [r.text for r in await gw.stored()] == [text]  # not deleted
        with write_lock_held(database), pytest.raises(RuntimeError, match="cannot be erased"):
            await gw.reservoir.delete("p", "i")
        response = await gw.http.delete(f"{gw.base()}/memory", headers=admin)  # once it can
        assert response.json() == {"deleted": 1}
        assert await gw.stored() == []
        assert files_holding(gw.reservoir.settings.data_dir, marker.encode()) == []
