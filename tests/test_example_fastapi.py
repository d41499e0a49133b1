"""The FastAPI example gateway, run as a user would run it, in front of the stand-in model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from tests.conftest import free_port, running, serve
from tests.upstream import Upstream

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
async def test_fastapi_gateway_example_remembers_across_sessions(tmp_path: Path) -> None:
    upstream = Upstream()
    async with serve(upstream.app()) as upstream_url:
        port = free_port()
        env = {
            **os.environ,
            "UPSTREAM_BASE_URL": f"{upstream_url}/v1",
            "RSV_DATA_DIR": str(tmp_path / "memory"),
            "OPENAI_API_KEY": "sk-from-gateway",
        }
        base = f"http://127.0.0.1:{port}"
        argv = [sys.executable, str(ROOT / "examples/fastapi/gateway.py"), "--port", str(port)]
        async with running(argv, env, f"{base}/v1/models"):
            memory = f"{base}/v1/partition/team/instance/alice"
            async with AsyncOpenAI(base_url=memory, api_key="sk-client", max_retries=0) as ai:
                stream = await ai.chat.completions.create(
                    model="gpt-4o",
                    stream=True,
                    messages=[{"role": "user", "content": "My bike is a red Bianchi."}],
                )
                text = "".join([c.choices[0].delta.content or "" async for c in stream])
                assert text == "Echo: My bike is a red Bianchi."
            # a second, separate session of the same user, with no history: the answer
            # of the first is stored after its last byte, and this request waits for it
            async with AsyncOpenAI(base_url=memory, api_key="sk-client", max_retries=0) as ai:
                await ai.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "What bike?"}]
                )
            received = upstream.received[-1]
            assert "My bike is a red Bianchi." in received.text
            assert "Echo: My bike is a red Bianchi." in received.text
            assert received.headers["authorization"] == "Bearer sk-client"
            assert received.path == "/v1/chat/completions"


def readme_gateway_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("```python\n", text.index("The essential part:")) + len("```python\n")
    return text[start : text.index("```", start)]


async def test_readme_gateway_snippet_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The FastAPI example in the README, run as written against the stand-in model."""
    monkeypatch.setenv("RSV_DATA_DIR", str(tmp_path / "memory"))
    upstream = Upstream()
    async with serve(upstream.app()) as upstream_url:
        code = readme_gateway_snippet().replace("https://api.openai.com/v1", f"{upstream_url}/v1")
        namespace: dict[str, object] = {}
        exec(compile(code, "README.md", "exec"), namespace)
        async with serve(namespace["app"]) as url:  # type: ignore[arg-type]
            base = f"{url}/v1/partition/docs/instance/reader"
            async with AsyncOpenAI(base_url=base, api_key="sk-x", max_retries=0) as ai:
                await ai.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "I am Ada."}]
                )
                stream = await ai.chat.completions.create(
                    model="gpt-4o",
                    stream=True,
                    messages=[{"role": "user", "content": "Who am I?"}],
                )
                text = "".join([c.choices[0].delta.content or "" async for c in stream])
        await namespace["upstream"].aclose()  # type: ignore[attr-defined]
    assert text == "Echo: Who am I?"
    assert "I am Ada." in upstream.received[-1].text
    assert upstream.received[-1].headers["authorization"] == "Bearer sk-x"
