"""`pip install ./plugins/reservoir-recency` makes the plugin active with no code change."""

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
    site = install_plugin("reservoir-recency")
    listed = cli(site, tmp_path, "plugins", RSV_RECENCY_HALF_LIFE_DAYS="7")
    assert listed.returncode == 0, listed.stderr
    assert "recency: reservoir_delete, reservoir_truncate" in listed.stdout.splitlines()

    blocked = cli(site, tmp_path, "plugins", RSV_DISABLE_PLUGINS="recency")
    assert blocked.returncode == 0, blocked.stderr
    assert not any(line.startswith("recency:") for line in blocked.stdout.splitlines())

    # A bad setting is named at load time, not at the first request.
    broken = cli(site, tmp_path, "plugins", RSV_RECENCY_FLOOR="2")
    assert broken.returncode != 0
    assert "recency floor" in broken.stderr
