"""The `reservoir` console script, run for real in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = str(Path(sys.executable).with_name("reservoir"))


def run(
    *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *args], env=env, input=stdin, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RSV_")}
    return {
        **clean,
        "RSV_CONFIG_FILE": str(tmp_path / "conf" / "reservoir.toml"),
        "RSV_DATA_DIR": str(tmp_path / "memory"),
    }


def test_config_set_get_list_unset(env: dict[str, str], tmp_path: Path) -> None:
    done = run("config", "--set", "recent-context-size=10", env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "conf" / "reservoir.toml").read_text() == "recent_context_size = 10\n"
    assert run("config", "--get", "recent_context_size", env=env).stdout == "10\n"
    limits = run("config", "--set", 'model_limits={"my-model" = 32768}', env=env)
    assert limits.returncode == 0, limits.stderr
    listed = run("config", "--list", env=env).stdout
    assert "recent_context_size = 10  [file]" in listed
    assert "model_limits = {'my-model': 32768}  [file]" in listed
    assert "semantic_context_size = 7  [default]" in listed
    env_wins = run(
        "config", "--get", "recent_context_size", env={**env, "RSV_RECENT_CONTEXT_SIZE": "3"}
    )
    assert env_wins.stdout == "3\n"
    assert run("config", "--unset", "recent_context_size", env=env).returncode == 0
    assert run("config", "--get", "recent_context_size", env=env).stdout == "15\n"
    assert run("config", "--path", env=env).stdout.strip() == env["RSV_CONFIG_FILE"]


def test_config_refuses_bad_keys_and_values_by_name(env: dict[str, str], tmp_path: Path) -> None:
    bad_value = run("config", "--set", "recent_context_size=many", env=env)
    assert bad_value.returncode == 1
    assert "recent_context_size" in bad_value.stderr and "integer" in bad_value.stderr
    bad_key = run("config", "--set", "recnt_context_size=3", env=env)
    assert bad_key.returncode == 1 and "'recnt_context_size'" in bad_key.stderr
    assert not (tmp_path / "conf" / "reservoir.toml").exists()  # nothing written
    usage = run("config", env=env)
    assert usage.returncode == 2 and "one of the arguments" in usage.stderr
    no_equals = run("config", "--set", "recent_context_size", env=env)
    assert no_equals.returncode == 1 and "KEY=VALUE" in no_equals.stderr


def test_help_of_every_command_has_an_example(env: dict[str, str]) -> None:
    top = run("--help", env=env)
    assert top.returncode == 0
    commands = (
        "serve",
        "demo",
        "config",
        "search",
        "view",
        "ingest",
        "export",
        "import",
        "delete",
        "stats",
        "replay",
        "plugins",
    )
    for command in commands:
        shown = run(command, "--help", env=env)
        assert shown.returncode == 0 and "example" in shown.stdout, command
