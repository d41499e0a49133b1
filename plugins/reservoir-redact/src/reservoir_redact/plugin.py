"""The `redact` plugin: secrets and personal data never reach the memory.

It implements only `reservoir_prepare_record`, which the core calls for every
message about to be stored (request messages, answers, imports), after the
message's id was computed from the original text and before it is embedded,
indexed or written. So the stored text, its embedding, every index built
from it (the built-in lexical index, reservoir-bm25) and every later
enrichment, search or export see only the redacted text, while the request
forwarded upstream is not touched at all.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, Literal

from reservoir_middleware import MessageRecord, hookimpl

from .detectors import KINDS, Detector, detectors_for, redact_text

logger = logging.getLogger("reservoir.redact")


def _env_kinds() -> list[str]:
    raw = os.environ.get("RSV_REDACT_KINDS")
    if raw is None or not raw.strip():
        return list(KINDS)
    return [k.strip().lower() for k in raw.split(",") if k.strip()]


def _env_patterns() -> list[str]:
    raw = os.environ.get("RSV_REDACT_PATTERNS")
    if raw is None or not raw.strip():
        return []
    patterns = json.loads(raw)
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ValueError("RSV_REDACT_PATTERNS must be a JSON list of regular expressions")
    return patterns


class Redaction:
    """Replaces secrets and personal data in records before they are stored.

    `kinds` (default `RSV_REDACT_KINDS`, else all of `secret, email, card,
    iban, phone`) chooses the detectors; `extra_patterns` (default
    `RSV_REDACT_PATTERNS`, a JSON list) are more regular expressions, each
    match replaced by `[secret]`.
    """

    def __init__(
        self,
        kinds: Iterable[str] | None = None,
        *,
        extra_patterns: Sequence[str] | None = None,
        name: str = "redact",
    ) -> None:
        self.name = name
        self.kinds = list(kinds) if kinds is not None else _env_kinds()
        patterns = list(extra_patterns) if extra_patterns is not None else _env_patterns()
        self.detectors: list[Detector] = detectors_for(self.kinds, patterns)

    def redact(self, text: str) -> str:
        return redact_text(text, self.detectors)

    @hookimpl
    def reservoir_prepare_record(
        self, record: MessageRecord
    ) -> MessageRecord | Literal[False] | None:
        try:
            text = self.redact(record.text)
            calls = self._redact_calls(record.tool_calls)
        except Exception:  # fail closed: better not remember a message than leak it
            logger.exception("redaction failed; message %s is not stored", record.id)
            return False
        if text == record.text and calls == record.tool_calls:
            return None
        return replace(record, text=text, tool_calls=calls)

    def _redact_calls(self, calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        """Tool calls with their arguments redacted (ids and names are kept)."""
        if not calls:
            return calls
        out: list[dict[str, Any]] = []
        for call in calls:
            function = call.get("function")
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                function = {**function, "arguments": self.redact(function["arguments"])}
                call = {**call, "function": function}
            out.append(call)
        return out
