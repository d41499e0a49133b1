"""The built-in `reservoir_authorize`: the `partition_keys` table (RSV_PARTITION_KEYS).

The table maps a key to partition names or `fnmatch` patterns (`*`, `?`,
`[seq]`; case-sensitive; `*` also matches `/`). A key grants a partition when
one of its entries equals the name or matches it as a pattern.

This plugin only grants (True) or has no opinion (None); it never vetoes, so
another plugin may grant what the table does not. The core denies a request
that nobody granted whenever the table is not empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

from reservoir_middleware._credentials import KeyTable
from reservoir_middleware.hookspecs import hookimpl
from reservoir_middleware.records import Scope


def grants(patterns: Sequence[str], partition: str) -> bool:
    """Whether one of the entries names the partition (exactly, or as a pattern)."""
    return any(p == partition or fnmatchcase(partition, p) for p in patterns)


class PartitionKeys:
    name = "partition-keys"

    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        self._table = KeyTable((key, tuple(patterns)) for key, patterns in table.items())

    @hookimpl
    async def reservoir_authorize(self, scope: Scope, key: str | None) -> bool | None:
        """Async and cheap: it runs on the event loop for every chat request.
        The key's digest is compared with every entry's: timing tells nothing of a key."""
        if key is None or not self._table:
            return None
        patterns = self._table.find(key) or ()
        if grants(patterns, scope.partition):
            return True
        return None
