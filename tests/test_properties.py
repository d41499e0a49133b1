"""Property-based tests (hypothesis) of the request path, through a real server:
whatever the body or the partition name, the middleware answers cleanly and
loses nothing."""

from __future__ import annotations

import json
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from reservoir_middleware import Reservoir, ReservoirMiddleware
from tests.blocks import unblocked
from tests.conftest import make_settings
from tests.servers import serve_in_thread
from tests.upstream import Upstream

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
CONTENT = st.one_of(
    st.text(max_size=200),
    st.none(),
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=50)}),
            st.fixed_dictionaries(
                {
                    "type": st.just("image_url"),
                    "image_url": st.fixed_dictionaries(
                        {"url": st.just("data:image/png;base64,AAAA")}
                    ),
                }
            ),
        ),
        max_size=3,
    ),
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]),
        "content": CONTENT,
    },
    optional={
        "name": st.text(alphabet=string.ascii_letters, min_size=1, max_size=8),
        "tool_call_id": st.text(max_size=8),
    },
)
EXTRA_FIELDS = st.dictionaries(
    st.text(min_size=1, max_size=12).filter(lambda k: k not in ("messages", "model", "stream")),
    JSON,
    max_size=4,
)
HYPOTHESIS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Upstream]]:
    upstream = Upstream()
    reservoir = Reservoir(make_settings(tmp_path_factory.mktemp("props"), max_body_bytes=65536))
    app = ReservoirMiddleware(upstream.app(), reservoir=reservoir)
    with serve_in_thread(app) as url:
        yield url, upstream


@HYPOTHESIS
@given(messages=st.lists(MESSAGE, min_size=1, max_size=5), extra=EXTRA_FIELDS)
def test_any_chat_body_keeps_every_other_field(
    server: tuple[str, Upstream], messages: list[dict[str, Any]], extra: dict[str, Any]
) -> None:
    url, upstream = server
    body = {"model": "gpt-4o", "messages": messages, **extra}
    before = len(upstream.received)
    response = httpx.post(
        f"{url}/v1/partition/props/instance/bodies/chat/completions",
        content=json.dumps(body),
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert response.status_code in (200, 400), response.text  # the app's answers
    assert "x-reservoir-status" not in response.headers  # no memory failure
    assert len(upstream.received) == before + 1
    sent = upstream.received[-1].json
    assert {k: v for k, v in sent.items() if k != "messages"} == {
        k: v for k, v in body.items() if k != "messages"
    }
    # the last message keeps what it said (memory goes before a user message's text)
    assert unblocked(sent["messages"][-1]) == messages[-1]


@HYPOTHESIS
@given(raw=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
def test_any_other_body_passes_through_byte_for_byte(
    server: tuple[str, Upstream], raw: bytes
) -> None:
    url, upstream = server
    response = httpx.post(
        f"{url}/v1/partition/props/instance/raw/chat/completions", content=raw, timeout=30
    )
    assert response.status_code in (200, 400)
    received = upstream.received[-1]
    if response.status_code == 400 or not _is_chat(raw):
        assert received.body == raw


def _is_chat(raw: bytes) -> bool:
    try:
        body = json.loads(raw.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError):
        return False
    messages = body.get("messages") if isinstance(body, dict) else None
    return (
        bool(messages)
        and isinstance(messages, list)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
    )


@HYPOTHESIS
@given(name=st.text(min_size=0, max_size=300))
@example(name=".")
@example(name="..")
def test_any_partition_name_is_refused_cleanly_or_kept_exactly(
    server: tuple[str, Upstream], name: str
) -> None:
    url, upstream = server
    segment = quote(name, safe="")
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "name check"}]}
    response = httpx.post(
        f"{url}/v1/partition/{segment}/instance/i/chat/completions", json=body, timeout=30
    )
    if response.status_code == 400:
        assert response.json()["error"]["type"] == "invalid_request"
        return
    if segment in ("", ".", ".."):  # no segment (or a dot segment the client resolves
        assert response.status_code == 404  # away): another route, the app's own 404
        return
    assert response.status_code == 200, response.text
    assert upstream.received[-1].path == "/v1/chat/completions"


def test_names_round_trip(tmp_path: Path) -> None:
    """Odd but valid names reach memory exactly as written."""
    upstream = Upstream()
    reservoir = Reservoir(make_settings(tmp_path))
    names = ["a/b", "été", "x y", "100%", "emoji-🦊", "tab\u00a0nbsp", "..."]
    with serve_in_thread(ReservoirMiddleware(upstream.app(), reservoir=reservoir)) as url:
        for name in names:
            response = httpx.post(
                f"{url}/v1/partition/{quote(name, safe='')}/instance/i/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": f"I am {name}"}]},
                timeout=30,
            )
            assert response.status_code == 200, name
        for _ in range(100):  # answers are written just after the response, in the server
            found = {s.partition for s in reservoir.store.scopes()}
            if found == set(names):
                break
            time.sleep(0.05)
    assert found == set(names)
