"""Memory modes: what memory may do for a request, and how two choices combine.

A mode is a pair of permissions, reading (retrieve and inject) and writing
(store the request and its answer): `on` both, `read`, `write`, `off` neither.
A request's choice (the `X-Reservoir-Memory` header, `enrich(memory=...)`)
only narrows what the partition's policy allows: each permission holds when
every side allows it, so policy `read` with header `write` is `off`.
"""

from __future__ import annotations

from collections.abc import Iterable

from reservoir_middleware.settings import MEMORY_MODES, MemoryMode, ReservoirSettings

_MODES: dict[tuple[bool, bool], MemoryMode] = {
    (True, True): "on",
    (True, False): "read",
    (False, True): "write",
    (False, False): "off",
}


class InvalidMemoryMode(ValueError):
    """A memory mode that is none of `on`, `off`, `read`, `write`."""


def reads(mode: MemoryMode) -> bool:
    """Memory is retrieved and injected."""
    return mode in ("on", "read")


def writes(mode: MemoryMode) -> bool:
    """The request and its answer are stored (journalled, shown in flight)."""
    return mode in ("on", "write")


def narrow(*modes: MemoryMode) -> MemoryMode:
    """What every mode allows (none given: `on`)."""
    return _MODES[(all(reads(m) for m in modes), all(writes(m) for m in modes))]


def policy_mode(settings: ReservoirSettings, partition: str) -> MemoryMode:
    """The operator's `memory_mode` for a partition (its table, a pattern's, the global)."""
    return settings.policy_for(partition).memory_mode or settings.memory_mode


def parse_mode(value: object) -> MemoryMode:
    """A mode named case-insensitively, with surrounding spaces; InvalidMemoryMode else."""
    if isinstance(value, str):
        name = value.strip().lower()
        for mode in MEMORY_MODES:
            if name == mode:
                return mode
    shown = repr(value) if not isinstance(value, str) or len(value) <= 40 else repr(value[:40])
    allowed = ", ".join(MEMORY_MODES)
    raise InvalidMemoryMode(f"memory mode must be one of {allowed}; got {shown}")


def parse_modes(values: Iterable[str]) -> MemoryMode:
    """Comma-separated modes (a header sent twice, or as a list): the narrowest of them."""
    return narrow(*(parse_mode(part) for value in values for part in value.split(",")))
