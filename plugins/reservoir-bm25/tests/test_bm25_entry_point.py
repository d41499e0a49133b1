"""`pip install ./plugins/reservoir-bm25` makes the plugin active with no code change."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.mark.timeout(400)
def test_installed_plugin_is_loaded_from_its_entry_point(
    install_plugin: Callable[[str], Path], cli: Cli, tmp_path: Path
) -> None:
    site = install_plugin("reservoir-bm25")
    listed = cli(site, tmp_path, "plugins")
    assert listed.returncode == 0, listed.stderr
    assert (
        "bm25: reservoir_delete, reservoir_retrieve, reservoir_store" in listed.stdout.splitlines()
    )

    ingested = cli(
        site, tmp_path, "ingest", "-p", "acme", "-i", "alice", stdin="Parcel QX7-4417-ZB is late."
    )
    assert ingested.returncode == 0, ingested.stderr
    assert len(list((tmp_path / "memory" / "bm25").glob("*.sqlite3"))) == 1

    blocked = cli(site, tmp_path, "plugins", RSV_DISABLE_PLUGINS="bm25")
    assert blocked.returncode == 0, blocked.stderr
    assert not any(line.startswith("bm25:") for line in blocked.stdout.splitlines())
