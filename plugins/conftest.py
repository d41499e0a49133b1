"""Test set-up for the plugin packages in `plugins/*`.

Their tests run from the repository with the project's own test command, the
plugins not installed: each `plugins/*/src` goes on `sys.path` here, and the
tests give the plugin objects to the engine in code (`plugins=[...]`, with
entry points off, so a copy installed in the environment cannot interfere).
Installation itself is tested by `install_plugin`, into a temporary directory
used only by a subprocess.

The fixtures of `tests/conftest.py` (config isolation, the HTTP gateway with
its stand-in model) are shared, not copied.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parent
ROOT = PLUGINS.parent

for _src in sorted(PLUGINS.glob("*/src"), reverse=True):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import _isolated_config, gateway_factory  # noqa: E402

__all__ = ["_isolated_config", "gateway_factory"]  # fixtures shared with tests/

PIP_TIMEOUT = 240  # seconds: the build may fetch hatchling from the package index


@pytest.fixture
def install_plugin(tmp_path: Path) -> Callable[[str], Path]:
    """`pip install --no-deps --no-build-isolation --target DIR plugins/<name>`; returns DIR, for a
    subprocess's PYTHONPATH (this process's plugin manager is not touched)."""

    def install(package: str) -> Path:
        target = tmp_path / f"site-{package}"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--no-deps",
                "--no-build-isolation",  # hatchling comes with the test extra: no download
                "--no-input",
                "--disable-pip-version-check",
                "--quiet",
                "--target",
                str(target),
                str(PLUGINS / package),
            ],
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return target

    return install


def run_cli(
    site: Path, tmp_path: Path, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m reservoir_middleware.cli ARGS` in a subprocess that sees the
    packages installed in `site`, with its own data directory and config file."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RSV_")}
    environment = {
        **clean,
        "PYTHONPATH": str(site),
        "RSV_DATA_DIR": str(tmp_path / "memory"),
        "RSV_CONFIG_FILE": str(tmp_path / "no-config.toml"),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "reservoir_middleware.cli", *args],
        env=environment,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli
