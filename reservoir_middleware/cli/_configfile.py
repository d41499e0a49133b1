"""The TOML config file behind `reservoir config`: read, validate, write.

Values are checked by `ReservoirSettings` before the file is written, so a
file written by `reservoir config --set` always loads.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ValidationError

from reservoir_middleware.settings import ReservoirSettings, config_file_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A key or value the settings refuse; the message names it."""


def normalize_key(key: str) -> str:
    name = key.strip().lower().replace("-", "_")
    name = name.removeprefix("rsv_")
    if name not in ReservoirSettings.model_fields:
        known = ", ".join(sorted(ReservoirSettings.model_fields))
        raise ConfigError(f"unknown setting {key!r}; known settings: {known}")
    return name


def parse_value(text: str) -> Any:
    """A TOML value (`7`, `true`, `[1, 2]`, `{a = 1}`, `"x"`), else the text itself."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def read(path: Path | None = None) -> dict[str, Any]:
    path = path or config_file_path()
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def validate(values: dict[str, Any]) -> None:
    """Raise ConfigError naming the first key whose value is refused."""
    try:
        ReservoirSettings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "?"
        raise ConfigError(f"invalid value for {key}: {first['msg']}") from exc


def set_value(key: str, text: str, path: Path | None = None) -> tuple[str, Any]:
    path = path or config_file_path()
    name = normalize_key(key)
    values = read(path)
    values[name] = parse_value(text)
    validate(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(tomli_w.dumps(values), encoding="utf-8")
    os.replace(tmp, path)
    return name, values[name]


def unset_value(key: str, path: Path | None = None) -> bool:
    path = path or config_file_path()
    name = normalize_key(key)
    values = read(path)
    if name not in values:
        return False
    del values[name]
    path.write_text(tomli_w.dumps(values), encoding="utf-8")
    return True


def effective() -> list[tuple[str, Any, str]]:
    """Every setting with its value in force and where that value comes from."""
    settings = ReservoirSettings()
    in_file = read()
    rows = []
    for name in ReservoirSettings.model_fields:
        if f"RSV_{name.upper()}" in os.environ:
            source = "env"
        elif name in in_file:
            source = "file"
        else:
            source = "default"
        rows.append((name, getattr(settings, name), source))
    return rows
