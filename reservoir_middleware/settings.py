"""One settings object for the middleware, the engine and the CLI.

Precedence: keyword arguments > `RSV_*` environment variables > the TOML config
file (`$RSV_CONFIG_FILE`, else `$XDG_CONFIG_HOME/reservoir/reservoir.toml`,
else `~/.config/reservoir/reservoir.toml`) > defaults.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


def config_file_path() -> Path:
    """Where `reservoir config --set` writes and the settings read."""
    explicit = os.environ.get("RSV_CONFIG_FILE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "reservoir" / "reservoir.toml"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "reservoir"


DEFAULT_AUTO_MODELS = (
    "ollama:*",
    "openai:gpt-4o-mini",
    "mistral:mistral-small-latest",
    "gemini:gemini-2.0-flash",
)


KEY_TABLE_SHAPE = (
    "partition_keys maps each key to a list of partition names or patterns, e.g. "
    '{"sk-team-a": ["team-a", "shared-*"]}'
)


class ProviderSettings(BaseModel):
    """An OpenAI-compatible provider for `reservoir serve` (config file `[providers.NAME]`)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str
    api_key_env: str | None = None


MemoryMode = Literal["on", "off", "read", "write"]
"""What memory does for a request: `on` reads and stores, `read` injects but
stores nothing, `write` stores but injects nothing, `off` neither (incognito)."""

MEMORY_MODES: tuple[MemoryMode, ...] = ("on", "off", "read", "write")


class PartitionPolicy(BaseModel):
    """What the operator decides for the partitions a `[partitions."NAME"]` table
    names (a name or an fnmatch pattern); unset fields follow the global setting."""

    model_config = ConfigDict(extra="forbid")

    memory_mode: MemoryMode | None = None
    retention_days: float | None = Field(default=None, ge=0)


class ReservoirSettings(BaseSettings):
    """Every knob of reservoir-middleware; each is documented in the README."""

    model_config = SettingsConfigDict(
        env_prefix="RSV_",
        extra="forbid",
        validate_default=True,
        arbitrary_types_allowed=True,
    )

    # storage
    data_dir: Path = Field(default_factory=default_data_dir)
    chroma_url: str | None = None
    # Without chroma_url: "child" runs Chroma's server on data_dir in a child
    # process (writes never stall requests); "inline" opens it in this process.
    chroma_process: Literal["child", "inline"] = "child"
    embedding: Any = "minilm"
    embedding_url: str | None = None
    embedding_api_key: str | None = None
    embedding_threads: int = Field(default=2, ge=1, le=64)

    # enrichment
    semantic_context_size: int = Field(default=7, ge=0, le=200)
    semantic_candidates: int = Field(default=20, ge=1, le=500)
    fill_budget: bool = True
    recent_context_size: int = Field(default=15, ge=0, le=500)
    recent_budget_share: float = Field(default=0.25, ge=0.0, le=1.0)
    # The share fades with the age of the scope's newest message: whole for an
    # hour, none once it is this old (0: never fades).
    recent_fade_hours: float = Field(default=24.0, ge=0.0)
    # Under a budget, a hit's answer (or question, or neighbours) costing more
    # tokens than this waits until every hit that fits is in (0: never waits).
    long_message_tokens: int = Field(default=150, ge=0)
    lexical_max_messages: int = Field(default=500_000, ge=0)
    # BM25 keys each message with its neighbours' words at this weight (0: its own only)
    lexical_neighbour_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    min_similarity: float = Field(default=0.2, ge=-1.0, le=1.0)
    # Per question, by its best cosine similarity to the searched scopes: below
    # `relevance_floor` no semantic memory (-1: never); below `relevance_full` only
    # messages of at most `relevance_band_message_tokens` tokens, the best hits'
    # first, up to `relevance_band_tokens` in all; from `relevance_full` up, all
    # the budget holds. Calibrated by bench/calibrate_relevance.py (README,
    # "Relevance floor").
    relevance_floor: float = Field(default=0.33, ge=-1.0, le=1.0)
    relevance_full: float = Field(default=0.44, ge=-1.0, le=1.0)
    relevance_band_tokens: int = Field(default=300, ge=0)
    relevance_band_message_tokens: int = Field(default=160, ge=0)
    semantic_scope: Literal["instance", "partition"] = "instance"
    synapse_threshold: float = Field(default=0.85, ge=0.0, le=1.0)
    synapse_neighbours: int = Field(default=2, ge=0, le=20)
    pair_answers: bool = True
    merge_system_messages: bool = False
    # on: read and store; read: inject, store nothing; write: store, inject
    # nothing; off: neither. A request's `X-Reservoir-Memory` header and a
    # partition's policy can only narrow it (see `policy_for`).
    memory_mode: MemoryMode = "on"
    # Messages older than this many days are deleted (0: kept for ever).
    retention_days: float = Field(default=0, ge=0)
    # Per partition (a name or an fnmatch pattern): memory_mode, retention_days.
    # Config file: `[partitions."team-a"]` then `retention_days = 30`;
    # env: JSON, `RSV_PARTITIONS='{"guest-*": {"memory_mode": "off"}}'`.
    partitions: dict[str, PartitionPolicy] = Field(default_factory=dict)

    # token budget
    context_token_budget: int | None = Field(default=2000, ge=0)
    model_limits: dict[str, int] = Field(default_factory=dict)
    default_context_window: int = Field(default=8192, ge=256)
    default_output_reserve: int = Field(default=1024, ge=0)

    # traffic
    max_body_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    fail_open: bool = True
    memory_timeout_ms: int = Field(default=5000, ge=1)
    # Answers are stored in batches: an exchange waits at most this long (less
    # when several are queued) before its scope is written.
    write_delay_ms: int = Field(default=100, ge=0, le=60_000)
    # Exchanges answered but not yet stored are kept in `<data_dir>/journal`
    # and replayed after a crash or a kill.
    journal: bool = True
    disable_plugins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    load_entry_points: bool = True
    admin_key: str | None = None
    # Who may use which partitions: key -> partition names or fnmatch patterns.
    # Env: JSON, `RSV_PARTITION_KEYS='{"sk-team-a": ["team-a", "shared-*"]}'`;
    # config file: a table, `[partition_keys]` then `"sk-team-a" = ["team-a"]`.
    # Empty (the default): no key is needed. See `builtins/partition_keys.py`.
    partition_keys: dict[str, list[str]] = Field(default_factory=dict)

    # `reservoir serve`: the standalone gateway
    host: str = "127.0.0.1"
    port: int = Field(default=3017, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)  # more than 1 needs chroma_url
    openai_base_url: str = "https://api.openai.com/v1"
    mistral_base_url: str = "https://api.mistral.ai/v1"
    gemini_base_url: str = "https://generativelanguage.googleapis.com/v1beta/openai"
    ollama_base_url: str = "http://127.0.0.1:11434/v1"
    providers: dict[str, ProviderSettings] = Field(default_factory=dict)
    model_routes: dict[str, str] = Field(default_factory=dict)
    auto_models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_AUTO_MODELS)
    )
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    upstream_timeout_s: float = Field(default=600.0, gt=0)
    rate_limit_per_minute: int = Field(default=0, ge=0)

    @field_validator("disable_plugins", "auto_models", "api_keys", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("partition_keys", mode="before")
    @classmethod
    def _key_table(cls, value: Any) -> Any:
        """`{"sk-a": "team-a"}` means `{"sk-a": ["team-a"]}`. A key a client cannot
        send, or an empty pattern, is a typo: refused, without repeating the key."""
        if not isinstance(value, dict):
            raise ValueError(KEY_TABLE_SHAPE)
        table = {}
        for key, patterns in value.items():
            if isinstance(patterns, str):
                patterns = [patterns]
            if not isinstance(key, str) or not isinstance(patterns, list):
                raise ValueError(KEY_TABLE_SHAPE)
            if not key or key != key.strip() or any(ord(ch) < 32 for ch in key):
                raise ValueError(
                    "a partition key must be non-empty, without surrounding spaces "
                    "or control characters"
                )
            if not all(isinstance(p, str) and p.strip() for p in patterns):
                raise ValueError("a partition name or pattern must be a non-empty string")
            table[key] = patterns
        return table

    def policy_for(self, partition: str) -> PartitionPolicy:
        """The policy in force for a partition, every field filled in: its own
        table, else the most specific pattern that matches (the longest), else
        the global settings, field by field."""
        tables = [self.partitions[partition]] if partition in self.partitions else []
        patterns = sorted(
            (p for p in self.partitions if p != partition and fnmatch.fnmatchcase(partition, p)),
            key=lambda p: (-len(p), p),
        )
        tables += [self.partitions[p] for p in patterns]
        mode = next((t.memory_mode for t in tables if t.memory_mode is not None), self.memory_mode)
        days = next(
            (t.retention_days for t in tables if t.retention_days is not None), self.retention_days
        )
        return PartitionPolicy(memory_mode=mode, retention_days=days)

    @field_validator("embedding", mode="before")
    @classmethod
    def _embedding_spec(cls, value: Any) -> Any:
        if value is None or value == "":
            return "minilm"
        if isinstance(value, str):
            return value.strip()
        if callable(value):
            return value
        raise ValueError(
            "embedding must be a name such as 'minilm', 'openai:MODEL', "
            "'ollama:MODEL', 'chroma-default', or an EmbeddingFunction"
        )

    @field_validator("chroma_url", "embedding_url", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file_path())
        return (init_settings, _Replaced(env_settings), _Replaced(toml))


class _Replaced(PydanticBaseSettingsSource):
    """A source whose access tables give way, whole, to a higher-precedence one.

    pydantic-settings merges dicts across sources; for `partition_keys` that
    would keep a key of the config file valid after the environment (or the
    code) replaced the table, so a revoked key would still open partitions.
    """

    TABLES = ("partition_keys", "partitions")

    def __init__(self, inner: PydanticBaseSettingsSource) -> None:
        super().__init__(inner.settings_cls)
        self.inner = inner

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        self.inner._set_current_state(self.current_state)
        self.inner._set_settings_sources_data(self.settings_sources_data)
        values = self.inner()
        taken = [name for name in self.TABLES if name in self.current_state]
        return {k: v for k, v in values.items() if k not in taken}
