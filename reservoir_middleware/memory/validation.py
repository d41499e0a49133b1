"""The rules for what may be stored, the same at every entry point.

The HTTP routes, `Reservoir.add/enrich/search/recent/delete/preload`,
`reservoir import` and the journal replay check names with `checked_scope`
and records with `record_from_dict`, so what one of them refuses none accepts.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from dataclasses import fields
from datetime import datetime, timezone
from typing import Any

from reservoir_middleware.records import MessageRecord, Scope

STORED_ROLES = ("user", "assistant", "tool")  # system prompts are not memory
MAX_ID_LENGTH = 256
MAX_NAME_LENGTH = 256
# 9999-12-31T23:59:59Z: the last second `datetime` (and so `view`, `search`) can show
MAX_TIMESTAMP = 253_402_300_799.0

REQUIRED: dict[str, type] = {"id": str, "partition": str, "instance": str, "role": str, "text": str}
OPTIONAL_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "tool_calls": (list,),
    "tool_call_id": (str,),
    "trace_id": (str,),
    "seq": (int,),
    "timestamp": (int, float),
    "model": (str,),
    "embedding_model": (str,),
    "finish_reason": (str,),
    "complete": (bool,),
    "source": (str,),
    "prev_id": (str,),
    "before_id": (str,),
    "after_id": (str,),
    "synapse_prev": (str,),
    "choices": (int,),
    "memory": (str,),
}
_FIELDS = frozenset(f.name for f in fields(MessageRecord))


class InvalidName(ValueError):
    """A partition or instance name the middleware refuses (answered with 400)."""


class BadRecord(ValueError):
    """A record (an imported line, a journalled message) that is not stored."""


def check_name(kind: str, name: str) -> str:
    """Names are free text, but not empty, not huge, no control characters,
    and not a path step (`.`/`..`)."""
    if not name:
        raise InvalidName(f"{kind} name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"{kind} name is longer than {MAX_NAME_LENGTH} characters")
    if name in (".", ".."):
        raise InvalidName(f"{kind} name {name!r} is not allowed")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise InvalidName(f"{kind} name contains control characters")
    return name


def checked_name(kind: str, name: Any) -> str:
    """A partition or instance name, checked by the HTTP layer's rules (`check_name`)."""
    if not isinstance(name, str):
        raise InvalidName(f"{kind} name is not a string")
    return check_name(kind, name)


def checked_scope(partition: Any, instance: Any) -> Scope:
    """The scope of two checked names. Control characters, NUL included, are
    refused, so `Scope.key` (`partition NUL instance`) names one scope only."""
    return Scope(checked_name("partition", partition), checked_name("instance", instance))


def check_timestamp(value: Any) -> float:
    """A record's time: a finite number of seconds from 1970 to the end of year 9999."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRecord("'timestamp' is not a number")
    if not (math.isfinite(value) and 0 <= value <= MAX_TIMESTAMP):
        raise BadRecord(f"'timestamp' {value!r} is not a time from 1970 to 9999")
    return float(value)


def message_time(value: Any) -> float:
    """A message's original time as `Reservoir.add` accepts it: seconds since
    1970, a `datetime` (naive means UTC) or an ISO 8601 string. Raises ValueError."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"timestamp {value!r} is not an ISO 8601 time") from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.timestamp()
    try:
        return check_timestamp(value)
    except BadRecord as exc:
        raise ValueError(str(exc).replace("'timestamp' ", "timestamp ")) from None


def check_id(key: str, value: str) -> str:
    if not value:
        raise BadRecord(f"'{key}' is empty")
    if len(value) > MAX_ID_LENGTH:
        raise BadRecord(f"'{key}' is longer than {MAX_ID_LENGTH} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        raise BadRecord(f"'{key}' contains control characters")
    return value


def record_from_dict(
    data: Any, scope: Scope | None = None, *, answer: bool = False
) -> MessageRecord:
    """A stored message from its dict (an export line, a journal entry), checked:
    field types, a stored role, names, id, time; with `scope`, the record's
    partition and instance must be the scope's. A journalled `answer` gets its
    id when written, so it may have none yet. BadRecord says what is wrong."""
    if not isinstance(data, Mapping):
        raise BadRecord("a record is not a JSON object")
    unknown = set(data) - _FIELDS
    if unknown:
        raise BadRecord(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    for key, kind in REQUIRED.items():
        if not isinstance(data.get(key), kind):
            raise BadRecord(f"'{key}' is missing or not a {kind.__name__}")
    for key, kinds in OPTIONAL_TYPES.items():
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise BadRecord(f"'{key}' has the wrong type")
    if data["role"] not in STORED_ROLES:
        raise BadRecord(f"unknown role {data['role']!r} (memory keeps {', '.join(STORED_ROLES)})")
    try:
        found = checked_scope(data["partition"], data["instance"])
    except InvalidName as exc:
        raise BadRecord(str(exc)) from exc
    if scope is not None and found != scope:
        raise BadRecord(f"the record's scope {found} is not the entry's {scope}")
    if data["id"] or not answer:
        check_id("id", data["id"])
    tool_calls = data.get("tool_calls")
    if tool_calls is not None and not all(isinstance(c, dict) for c in tool_calls):
        raise BadRecord("'tool_calls' is not a list of objects")
    if data.get("timestamp") is not None:
        check_timestamp(data["timestamp"])
    return MessageRecord(**{k: v for k, v in data.items() if v is not None or k in REQUIRED})
