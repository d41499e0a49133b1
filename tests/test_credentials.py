"""How each caller reads a key from the request headers, and that every key is compared
through the constant-time path.

Three readers, each with its own accepted headers (all in `_credentials.py`):
- the partition key of a chat request: `X-Reservoir-Key`, else `Authorization: Bearer`
  (the first non-blank of each), handed to `reservoir_authorize` as text;
- the admin key of the admin endpoints: `Authorization: Bearer` or `X-Reservoir-Admin-Key`,
  any of the headers sent;
- the API key of `reservoir serve`: `x-api-key` as sent, else `Authorization` (the Bearer
  token, or the whole value), the last header of each name.

The edge cases are raw header bytes an ASGI server may hand over, so the real middlewares
are called with the ASGI scope directly; the HTTP round trips are in test_access_hardening.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reservoir_middleware._credentials import KeySet, app_headers, header_token
from reservoir_middleware.asgi._authorization import check_access
from reservoir_middleware.builtins.partition_keys import PartitionKeys
from reservoir_middleware.gateway.access import AccessMiddleware
from reservoir_middleware.plugins import Hooks, make_plugin_manager
from reservoir_middleware.records import Scope
from reservoir_middleware.settings import ReservoirSettings

KEY = "sk-team-4b2a"
ADMIN = "adm-7c1e-secret"
NON_ASCII = "clé-ü-鍵"
Headers = list[tuple[bytes, bytes]]


def asgi_scope(headers: Headers, path: str = "/v1/chat/completions", method: str = "POST") -> Any:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode("latin-1"),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
    }


async def partition_status(headers: Headers, key: str = KEY) -> int:
    """200 when the partition key read from the headers grants the partition, else 401
    (no key read) or 403 (a key read, not the one in the table)."""
    pm = make_plugin_manager(
        [("partition-keys", PartitionKeys({key: ["team"]}))], load_entry_points=False
    )
    refusal = await check_access(
        Hooks(pm), Scope("team", "bob"), asgi_scope(headers), required=True, timeout=5.0
    )
    return 200 if refusal is None else refusal.status


async def gateway_status(
    headers: Headers, tmp_path: Path, *, keys: tuple[str, ...] = (KEY,), path: str = "/v1/models"
) -> int:
    """The status `reservoir serve`'s access check gives (200: passed on to the app)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    settings = ReservoirSettings(data_dir=tmp_path / "memory", api_keys=list(keys), admin_key=ADMIN)
    statuses: list[int] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await AccessMiddleware(app, settings=settings)(asgi_scope(headers, path, "GET"), receive, send)
    return statuses[0]


ADMIN_PATH = "/v1/partition/team/instance/bob/memory/recent"


async def admin_status(headers: Headers, tmp_path: Path) -> int:
    """200 when the admin key is read (an admin route passes the API keys with it), else 401."""
    return await gateway_status(headers, tmp_path, keys=("some-other-api-key",), path=ADMIN_PATH)


# --- the partition key (X-Reservoir-Key, else Authorization: Bearer) ---------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(b"x-reservoir-key", KEY.encode())], 200),
        ([(b"X-Reservoir-Key", KEY.encode())], 200),
        ([(b"x-reservoir-key", b"  " + KEY.encode() + b"\t")], 200),
        ([(b"authorization", b"Bearer " + KEY.encode())], 200),
        ([(b"authorization", b"bEARER " + KEY.encode())], 200),
        ([(b"Authorization", b"  Bearer    " + KEY.encode() + b"  ")], 200),
        ([(b"authorization", b"Bearer\t" + KEY.encode())], 401),  # the scheme ends at a space
        ([(b"authorization", KEY.encode())], 401),  # no scheme: not a partition key
        ([(b"authorization", b"Basic " + KEY.encode())], 401),
        ([(b"authorization", b"Bearer ")], 401),
        ([(b"authorization", b"Bearer")], 401),
        ([(b"x-reservoir-key", b"")], 401),
        ([(b"x-reservoir-key", b"   ")], 401),
        ([], 401),
        ([(b"x-reservoir-key", b"wrong")], 403),
        ([(b"x-reservoir-key", KEY.encode() + b"x")], 403),
        # X-Reservoir-Key wins over the Bearer token, whatever their order
        ([(b"authorization", b"Bearer " + KEY.encode()), (b"x-reservoir-key", b"wrong")], 403),
        ([(b"x-reservoir-key", KEY.encode()), (b"authorization", b"Bearer wrong")], 200),
        # a blank X-Reservoir-Key is absent: the Bearer token is used
        ([(b"x-reservoir-key", b" "), (b"authorization", b"Bearer " + KEY.encode())], 200),
        # two headers of one name: the first non-blank one
        ([(b"x-reservoir-key", KEY.encode()), (b"x-reservoir-key", b"wrong")], 200),
        ([(b"x-reservoir-key", b"wrong"), (b"x-reservoir-key", KEY.encode())], 403),
        ([(b"x-reservoir-key", b""), (b"x-reservoir-key", KEY.encode())], 200),
        ([(b"authorization", b"Basic x"), (b"authorization", b"Bearer " + KEY.encode())], 200),
        ([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer " + KEY.encode())], 403),
    ],
)
async def test_partition_key_headers(headers: Headers, status: int) -> None:
    assert await partition_status(headers) == status


async def test_partition_key_bytes() -> None:
    """UTF-8 is read as UTF-8; bytes that are not UTF-8 as latin-1 (never an error)."""
    assert await partition_status([(b"x-reservoir-key", NON_ASCII.encode())], NON_ASCII) == 200
    bearer = [(b"authorization", b"Bearer " + NON_ASCII.encode())]
    assert await partition_status(bearer, NON_ASCII) == 200
    assert await partition_status([(b"x-reservoir-key", b"\xff\xfe")], "\xff\xfe") == 200
    assert (
        await partition_status([(b"x-reservoir-key", NON_ASCII.encode("latin-1", "replace"))])
        == 403
    )


# --- the admin key (Authorization: Bearer or X-Reservoir-Admin-Key, any header) -----------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(b"authorization", b"Bearer " + ADMIN.encode())], 200),
        ([(b"Authorization", b"BEARER " + ADMIN.encode())], 200),
        ([(b"authorization", b"Bearer    " + ADMIN.encode() + b" \t")], 200),
        ([(b"x-reservoir-admin-key", ADMIN.encode())], 200),
        ([(b"X-Reservoir-Admin-Key", b" " + ADMIN.encode() + b" ")], 200),
        ([(b"authorization", ADMIN.encode())], 401),  # no scheme
        ([(b"authorization", b" Bearer " + ADMIN.encode())], 401),  # Bearer opens the value
        ([(b"authorization", b"Bearer\t" + ADMIN.encode())], 401),
        ([(b"authorization", b"Token " + ADMIN.encode())], 401),
        ([(b"x-reservoir-key", ADMIN.encode())], 401),  # the partition key's header
        ([(b"x-api-key", ADMIN.encode())], 401),
        ([(b"authorization", b"Bearer ")], 401),
        ([(b"x-reservoir-admin-key", b"")], 401),
        ([], 401),
        # any of the headers may carry it
        ([(b"authorization", b"Bearer " + ADMIN.encode()), (b"authorization", b"Bearer x")], 200),
        ([(b"authorization", b"Bearer x"), (b"authorization", b"Bearer " + ADMIN.encode())], 200),
        ([(b"x-reservoir-admin-key", b"x"), (b"authorization", b"Bearer " + ADMIN.encode())], 200),
        ([(b"authorization", b"Bearer x"), (b"x-reservoir-admin-key", ADMIN.encode())], 200),
    ],
)
async def test_admin_key_headers(headers: Headers, status: int, tmp_path: Path) -> None:
    assert await admin_status(headers, tmp_path) == status


async def test_admin_key_bytes(tmp_path: Path) -> None:
    """Compared on the header's bytes with the key's UTF-8."""
    settings_key = ADMIN
    assert await admin_status([(b"x-reservoir-admin-key", settings_key.encode())], tmp_path) == 200
    latin = [(b"x-reservoir-admin-key", (ADMIN + "é").encode("latin-1"))]
    assert await admin_status(latin, tmp_path) == 401


# --- the API key of `reservoir serve` (x-api-key, else Authorization) ---------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(b"x-api-key", KEY.encode())], 200),
        ([(b"X-API-Key", KEY.encode())], 200),
        ([(b"authorization", b"Bearer " + KEY.encode())], 200),
        ([(b"authorization", b"bearer   " + KEY.encode() + b" ")], 200),
        ([(b"authorization", b" " + KEY.encode() + b" ")], 200),  # no scheme: the whole value
        ([(b"authorization", b"Basic " + KEY.encode())], 401),
        ([(b"authorization", b"Bearer\t" + KEY.encode())], 401),
        ([(b"x-api-key", b" " + KEY.encode())], 401),  # x-api-key as sent, not stripped
        ([(b"x-api-key", b"")], 401),
        ([(b"authorization", b"Bearer ")], 401),
        ([(b"x-reservoir-key", KEY.encode())], 401),
        ([], 401),
        # x-api-key first; an empty one is absent
        ([(b"x-api-key", b"wrong"), (b"authorization", b"Bearer " + KEY.encode())], 401),
        ([(b"x-api-key", b""), (b"authorization", b"Bearer " + KEY.encode())], 200),
        # two headers of one name: the last one
        ([(b"x-api-key", b"wrong"), (b"x-api-key", KEY.encode())], 200),
        ([(b"x-api-key", KEY.encode()), (b"x-api-key", b"wrong")], 401),
        ([(b"authorization", b"Bearer " + KEY.encode()), (b"authorization", b"Bearer x")], 401),
    ],
)
async def test_api_key_headers(headers: Headers, status: int, tmp_path: Path) -> None:
    assert await gateway_status(headers, tmp_path) == status


async def test_api_key_bytes(tmp_path: Path) -> None:
    headers = [(b"x-api-key", NON_ASCII.encode())]
    assert await gateway_status(headers, tmp_path, keys=(NON_ASCII,)) == 200
    headers = [(b"authorization", b"Bearer " + NON_ASCII.encode())]
    assert await gateway_status(headers, tmp_path, keys=(NON_ASCII,)) == 200
    headers = [(b"x-api-key", "clé".encode("latin-1"))]
    assert await gateway_status(headers, tmp_path, keys=("clé",)) == 401


def test_header_token() -> None:
    """The gateway's reading of `Authorization` (is it one of its own keys?)."""
    assert header_token(b"Bearer abc") == b"abc"
    assert header_token(b"  bearer   abc  ") == b"abc"
    assert header_token(b"abc") == b"abc"
    assert header_token(b" Basic abc ") == b"Basic abc"
    assert header_token(b"Bearer") == b""
    assert header_token(b"Bearer ") == b""
    assert header_token(b"") == b""


def test_app_headers_drop_ours_and_the_admin_key() -> None:
    admin = KeySet([ADMIN])
    headers: Headers = [
        (b"x-reservoir-key", KEY.encode()),
        (b"X-Reservoir-Partition", b"team"),
        (b"authorization", b"Bearer " + ADMIN.encode()),
        (b"x-custom", b" " + ADMIN.encode() + b" "),
        (b"authorization", b"Bearer sk-provider"),
        (b"accept", b"*/*"),
    ]
    assert app_headers(headers, admin) == [
        (b"authorization", b"Bearer sk-provider"),
        (b"accept", b"*/*"),
    ]
    assert app_headers([(b"accept", b"*/*")], admin) is None
    assert app_headers([(b"authorization", b"Bearer " + ADMIN.encode())], KeySet([])) is None


# --- every comparison through digests and hmac.compare_digest -----------------------------


def near_misses(key: str) -> list[str | bytes]:
    """Keys an early-exit comparison would tell apart by timing, and one that types differ."""
    return [
        key[:-1] + chr(ord(key[-1]) + 1),  # only the last byte differs
        key[:-1],  # shorter
        key + "x",  # longer
        "x" + key,
        key.upper(),
        "",
        (key[:-1] + chr(ord(key[-1]) + 1)).encode(),
    ]


def test_keyset_refuses_near_misses() -> None:
    keys = KeySet([KEY, None, "", ADMIN])
    assert KEY in keys and KEY.encode() in keys and ADMIN in keys
    assert NON_ASCII not in keys
    for miss in near_misses(KEY) + near_misses(ADMIN):
        assert miss not in keys, miss
    assert None not in keys and 1 not in keys
    assert not KeySet([None, ""])
    assert "" not in KeySet([None, ""])


async def test_partition_keys_refuse_near_misses() -> None:
    plugin = PartitionKeys({KEY: ["team"], NON_ASCII: ["other"]})
    assert await plugin.reservoir_authorize(Scope("team", "bob"), KEY) is True
    assert await plugin.reservoir_authorize(Scope("other", "bob"), NON_ASCII) is True
    assert await plugin.reservoir_authorize(Scope("team", "bob"), NON_ASCII) is None
    for miss in near_misses(KEY):
        if isinstance(miss, str):
            assert await plugin.reservoir_authorize(Scope("team", "bob"), miss) is None, miss


@pytest.mark.parametrize("reader", ["partition", "admin", "api"])
async def test_every_reader_refuses_near_misses(reader: str, tmp_path: Path) -> None:
    """A key one byte off, or of another length, is refused by each reader."""
    for miss in near_misses(ADMIN if reader == "admin" else KEY):
        raw = miss if isinstance(miss, bytes) else miss.encode()
        if reader == "partition":
            assert await partition_status([(b"x-reservoir-key", raw)]) in (401, 403)
        elif reader == "admin":
            assert await admin_status([(b"x-reservoir-admin-key", raw)], tmp_path) == 401
        else:
            assert await gateway_status([(b"x-api-key", raw)], tmp_path) == 401
