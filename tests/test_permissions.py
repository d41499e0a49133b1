"""Conversations are private: under the usual umask (022), everything the
gateway keeps on disk is its owner's only: directories 0700, files 0600,
including what the Chroma child and inline Chroma create."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from reservoir_middleware import Reservoir, ReservoirSettings
from tests.conftest import GatewayFactory


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The umask most systems give a user (files 0644, directories 0755)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def loose_entries(root: Path) -> list[str]:
    """Every entry under `root` (and itself) that group or others may access."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_IMODE(mode) & 0o077:
            found.append(f"{oct(stat.S_IMODE(mode))} {path.relative_to(root.parent)}")
    return found


def kinds(root: Path) -> set[str]:
    """What the data directory holds, by kind (so that the walk is not vacuous)."""
    found = set()
    for path in root.rglob("*"):
        if path.name == "chroma.sqlite3":
            found.add("chroma database")
        elif path.name == "reservoir.lock":
            found.add("lock")
        elif path.name == "chroma-server.log":
            found.add("chroma log")
        elif path.suffix == ".bin":
            found.add("vector index")
        elif path.name == "journal" and path.is_dir():
            found.add("journal")
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("chroma_process", ["child", "inline"])
async def test_memory_on_disk_is_private_while_the_gateway_runs_and_after(
    gateway_factory: GatewayFactory, tmp_path: Path, usual_umask: None, chroma_process: str
) -> None:
    data_dir = tmp_path / "memory"
    async with gateway_factory(chroma_process=chroma_process) as gw:
        for instance in ("a", "b"):
            async with AsyncOpenAI(base_url=gw.base("p", instance), api_key="k") as ai:
                for text in ("my sister is called Ada", "she lives in Lisbon"):
                    await ai.chat.completions.create(
                        model="gpt-4o", messages=[{"role": "user", "content": text}]
                    )
        assert len(await gw.stored("p", "a")) == 4
        assert loose_entries(data_dir) == []  # while it runs
    expected = {"chroma database", "lock", "vector index", "journal"}
    if chroma_process == "child":
        expected.add("chroma log")
    assert kinds(data_dir) >= expected
    assert loose_entries(data_dir) == []  # after it stopped


@pytest.mark.timeout(300)
@pytest.mark.parametrize("chroma_process", ["child", "inline"])
async def test_a_data_dir_left_readable_by_an_older_version_is_tightened_at_start(
    tmp_path: Path, usual_umask: None, chroma_process: str
) -> None:
    data_dir = tmp_path / "memory"
    settings = ReservoirSettings(data_dir=data_dir, chroma_process=chroma_process)
    first = Reservoir(settings)
    await first.add("p", "i", [{"role": "user", "content": "the spare key is under the mat"}])
    await first.close()
    for path in [data_dir, *data_dir.rglob("*")]:  # as an older version left it
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert len(loose_entries(data_dir)) > 5

    again = Reservoir(settings)
    await again.warm_up()
    try:
        assert loose_entries(data_dir) == []
        assert [r.text for r in await again.recent("p", "i", limit=10)] == [
            "the spare key is under the mat"
        ]
    finally:
        await again.close()
