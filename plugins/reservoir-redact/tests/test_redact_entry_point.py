"""`pip install ./plugins/reservoir-redact` makes the plugin active with no code change."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

Cli = Callable[..., subprocess.CompletedProcess[str]]
KEY = "sk-proj-Qm3xT9vLw2Zr8Kp4Yh6Nc1Bd5Fg7Js0Ua9Ee2Rt"


@pytest.mark.timeout(400)
def test_installed_plugin_is_loaded_from_its_entry_point(
    install_plugin: Callable[[str], Path], cli: Cli, tmp_path: Path
) -> None:
    site = install_plugin("reservoir-redact")
    listed = cli(site, tmp_path, "plugins")
    assert listed.returncode == 0, listed.stderr
    assert "redact: reservoir_prepare_record" in listed.stdout.splitlines()

    stored = cli(site, tmp_path, "ingest", stdin=f"my key is {KEY}")
    assert stored.returncode == 0, stored.stderr
    exported = cli(site, tmp_path, "export")
    assert exported.returncode == 0, exported.stderr
    assert "my key is [secret]" in exported.stdout and KEY not in exported.stdout

    # Blocked by name, it no longer takes part: the proof that it was the entry point.
    blocked = cli(site, tmp_path, "ingest", stdin=f"again {KEY}", RSV_DISABLE_PLUGINS="redact")
    assert blocked.returncode == 0, blocked.stderr
    assert f"again {KEY}" in cli(site, tmp_path, "export").stdout
