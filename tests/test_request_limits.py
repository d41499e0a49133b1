"""The request limit: a large `max_tokens` or an unknown model is the provider's to judge,
never a "too long" answer; memory only takes what fits beside a capped reserve."""

from __future__ import annotations

from typing import Any

from openai import AsyncOpenAI

from reservoir_middleware.memory.tokens import count_message, count_messages
from tests.blocks import memory_of, unblocked
from tests.conftest import GatewayFactory

SENTENCE = "The quick brown fox jumps over the lazy dog near the old mill by the river. "
TOO_LONG = "Your last message is too long"


async def remember(gw: object, n: int) -> None:
    reservoir = gw.reservoir  # type: ignore[attr-defined]
    for i in range(n):
        await reservoir.add(
            "p",
            "i",
            [
                {"role": "user", "content": f"Memory {i}: the fox likes {SENTENCE}"},
                {"role": "assistant", "content": f"Noted fact {i}."},
            ],
        )


async def test_large_max_tokens_and_unknown_models_reach_the_model(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory() as gw:
        await remember(gw, 3)
        async with AsyncOpenAI(base_url=gw.base(), api_key="k", max_retries=0) as ai:
            for model, max_tokens in (("my-local-model", 9000), ("gpt-4o", 200_000)):
                reply = await ai.chat.completions.create(
                    model=model,
                    max_tokens=max_tokens,
                    messages=[{"role": "user", "content": "hi, what does the fox like?"}],
                )
                assert reply.choices[0].message.content == "Echo: hi, what does the fox like?"
                sent = gw.upstream.received[-1].json
                assert (sent["model"], sent["max_tokens"]) == (model, max_tokens)
                # memory still fits beside the (capped) reserve, so it is injected
                assert memory_of(sent["messages"]), model
            # an unknown window: never refused, even far over the default window
            huge = SENTENCE * 2000  # about 34 000 tokens, over 8192
            reply = await ai.chat.completions.create(
                model="my-local-model", messages=[{"role": "user", "content": huge}]
            )
            assert reply.choices[0].message.content == f"Echo: {huge}"
            sent_messages = gw.upstream.received[-1].messages
            assert sent_messages == [{"role": "user", "content": huge}]  # no memory injected
        assert len(gw.upstream.received) == 3


async def test_a_known_window_trims_memory_to_what_fits_beside_a_capped_reserve(
    gateway_factory: GatewayFactory,
) -> None:
    # window 1000; max_tokens 5000 reserves at most half of it: 500 prompt tokens
    async with gateway_factory(model_limits={"tiny": 1000}) as gw:
        await remember(gw, 12)
        question = {"role": "user", "content": "What does the fox like?"}
        response = await gw.chat([question], model="tiny", max_tokens=5000)
        assert response.status_code == 200
        assert TOO_LONG not in response.text
        sent = gw.upstream.received[-1]
        assert sent.json["max_tokens"] == 5000
        assert unblocked(sent.messages[-1]) == question and memory_of(sent.messages)
        assert count_messages(sent.messages, "tiny") <= 500
        # a last message over what memory may use, yet within the window: sent alone
        long_question = {"role": "user", "content": SENTENCE * 35}
        assert 500 < count_message(long_question, "tiny") < 750
        response = await gw.chat([long_question], model="tiny", max_tokens=5000)
        assert response.status_code == 200 and TOO_LONG not in response.text
        assert gw.upstream.received[-1].messages == [long_question]
        # past the window minus the default reserve it is still "too long", max_tokens or not
        too_long = {"role": "user", "content": SENTENCE * 60}
        extras: list[dict[str, Any]] = [{}, {"max_tokens": 5000}]
        for extra in extras:
            response = await gw.chat([too_long], model="tiny", **extra)
            message = response.json()["choices"][0]["message"]["content"]
            assert "exceeds the maximum limit of 750" in message
        assert len(gw.upstream.received) == 2
