"""A deleted scope leaves no byte of its text under the data directory, and does not come back."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from reservoir_middleware import Reservoir
from reservoir_middleware.journal import Journal
from tests.conftest import make_settings


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
