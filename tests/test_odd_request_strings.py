"""Odd strings in a request neither degrade it nor lose its exchange, through the
real middleware (uvicorn, Chroma, the embedding model; only the model is a stand-in).

A lone surrogate (JSON allows the escape `"\\ud800"`) in the last user message
or in `model`, and a `name` that is an object: the request is enriched and
trimmed as any other, and its question and answer are stored.
"""

from __future__ import annotations

import json
from typing import Any

from reservoir_middleware.memory.tokens import count_messages
from tests.blocks import sections
from tests.conftest import Gateway, GatewayFactory
from tests.test_budget_and_faults import TINY, long_history, remember
from tests.upstream import Reply

STATUS = "x-reservoir-status"


async def post_raw(gw: Gateway, body: dict[str, Any]) -> Any:
    raw = json.dumps(body).encode()  # lone surrogates as escapes, as a lenient client sends them
    response = await gw.http.post(
        f"{gw.base()}/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    await gw.reservoir.settle()
    return response


async def test_a_lone_surrogate_in_the_last_user_message(gateway_factory: GatewayFactory) -> None:
    async with gateway_factory(model_limits=TINY) as gw:
        await remember(gw)
        gw.upstream.replies.append(Reply(content="By the old mill."))
        last = {"role": "user", "content": "Where is the fox \ud800 now?"}
        response = await post_raw(gw, {"model": "tiny", "messages": [*long_history(), last]})
        assert response.status_code == 200, response.text
        assert response.headers.get(STATUS) != "degraded"
        sent = gw.upstream.received[-1].messages
        assert sent[-1] == last  # the client's own message, untouched
        assert count_messages(sent, "tiny") <= 750  # trimmed to the window
        texts = [r.text for r in await gw.stored()]
        assert texts[-2:] == ["Where is the fox \ufffd now?", "By the old mill."]

        # a short request gets memory injected, as usual
        gw.upstream.replies.append(Reply(content="Still by the mill."))
        again = {"role": "user", "content": "And the fox \udfff today?"}
        response = await post_raw(gw, {"model": "tiny", "messages": [again]})
        assert response.headers.get(STATUS) != "degraded"
        assert sections(gw.upstream.received[-1].messages[-1])["recent"]
        assert gw.reservoir.dead_letters.count() == 0


async def test_a_lone_surrogate_in_model(gateway_factory: GatewayFactory) -> None:
    async with gateway_factory() as gw:
        gw.upstream.replies.append(Reply(content="Noted."))
        body = {
            "model": "gpt-4o-\ud800",
            "stream": True,  # the stand-in's stream escapes the surrogate it echoes as `model`
            "messages": [{"role": "user", "content": "my locker is number 31"}],
        }
        response = await post_raw(gw, body)
        assert response.status_code == 200 and response.headers.get(STATUS) != "degraded"
        stored = await gw.stored()
        assert [(r.text, r.model) for r in stored] == [
            ("my locker is number 31", "gpt-4o-\ufffd"),
            ("Noted.", "gpt-4o-\ufffd"),
        ]
        assert gw.reservoir.dead_letters.count() == 0
        # the scope was not blocked behind it
        response = await gw.chat([{"role": "user", "content": "which locker is mine?"}])
        assert response.headers.get(STATUS) != "degraded"
        assert "my locker is number 31" in gw.upstream.received[-1].text


async def test_a_name_that_is_an_object(gateway_factory: GatewayFactory) -> None:
    async with gateway_factory(model_limits=TINY) as gw:
        await remember(gw)
        for name in ({"first": "Ana"}, ["Ana", "Lima"]):
            question = f"Where is the fox, asks {json.dumps(name)}?"
            last = {"role": "user", "content": question, "name": name}
            response = await gw.chat([*long_history(), last], model="tiny")
            assert response.status_code == 200
            assert response.headers.get(STATUS) != "degraded"
            sent = gw.upstream.received[-1].messages
            assert sent[-1] == last
            assert count_messages(sent, "tiny") <= 750  # trimmed to the window
            stored = await gw.stored()
            assert [(r.text, r.name) for r in stored[-2:]] == [
                (question, None),  # a name that is no string is not kept
                (f"Echo: {question}", None),
            ]


async def test_a_lone_surrogate_in_model_of_a_message_too_long(
    gateway_factory: GatewayFactory,
) -> None:
    """The middleware's own "too long" answer echoes `model`: it is still sent, as
    JSON with the surrogate escaped, streamed or not."""
    model = "tiny-\ud800"
    async with gateway_factory(model_limits={model: 1000}) as gw:
        for stream in (False, True):
            body = {
                "model": model,
                "stream": stream,
                "messages": [{"role": "user", "content": "the fox by the mill " * 400}],
            }
            response = await post_raw(gw, body)
            assert response.status_code == 200, response.text
            assert "Your last message is too long" in response.text
            if not stream:
                assert response.json()["model"] == model
        assert gw.upstream.received == []
