"""One name check for every entry point: what the HTTP layer answers 400 to, the
engine API refuses too, and two scopes never share their memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from reservoir_middleware import Reservoir
from reservoir_middleware.memory.validation import InvalidName
from tests.conftest import Gateway, make_settings

BAD_NAMES = ["", ".", "..", "x" * 5000, "a\x00b", "new\nline", "lone \ud800"]
MESSAGE = [{"role": "user", "content": "my locker code is 4471"}]


@pytest.mark.parametrize("bad", BAD_NAMES)
async def test_the_engine_refuses_the_names_http_refuses(tmp_path: Path, bad: str) -> None:
    engine = Reservoir(make_settings(tmp_path, chroma_process="inline"))
    try:
        for partition, instance in ((bad, "i"), ("p", bad)):
            with pytest.raises(InvalidName):
                await engine.add(partition, instance, MESSAGE)
            with pytest.raises(InvalidName):
                await engine.recent(partition, instance)
            with pytest.raises(InvalidName):
                await engine.search(partition, instance, "locker", semantic=False)
            with pytest.raises(InvalidName):
                await engine.delete(partition, instance)
            with pytest.raises(InvalidName):
                body = {"model": "gpt-4o", "messages": MESSAGE}
                await engine.enrich(partition, instance, body, store=False)
        with pytest.raises(InvalidName):
            await engine.delete(bad)
        assert engine.store.scopes() == []  # nothing was stored
    finally:
        await engine.close()


async def test_a_nul_in_a_name_cannot_reach_another_scope(tmp_path: Path) -> None:
    engine = Reservoir(make_settings(tmp_path, chroma_process="inline"))
    try:
        with pytest.raises(InvalidName):
            await engine.add("x\x00y", "z", MESSAGE)
        await engine.add("x", "y", [{"role": "user", "content": "mine"}])
        with pytest.raises(InvalidName):
            await engine.recent("x", "y\x00z")
        assert [r.text for r in await engine.recent("x", "y")] == ["mine"]
    finally:
        await engine.close()


async def test_the_http_layer_and_the_engine_agree(gateway: Gateway) -> None:
    """The longest name HTTP takes is taken by the engine, one more character by neither."""
    longest, longer = "n" * 256, "n" * 257
    await gateway.reservoir.add(longest, "i", MESSAGE)
    with pytest.raises(InvalidName):
        await gateway.reservoir.add(longer, "i", MESSAGE)
    body = {"model": "gpt-4o", "messages": MESSAGE}
    ok = await gateway.http.post(f"{gateway.base(longest)}/chat/completions", json=body)
    refused = await gateway.http.post(f"{gateway.base(longer)}/chat/completions", json=body)
    assert ok.status_code == 200 and refused.status_code == 400
    assert "longer than 256" in refused.text
