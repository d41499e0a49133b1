"""The memory commands of `reservoir`, as real subprocesses, on embedded Chroma and on a
real `chroma run` server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import serve

SCRIPT = str(Path(sys.executable).with_name("reservoir"))

FACTS = [
    ("user", "I adopted a rescue greyhound named Comet."),
    ("assistant", "Comet is a lovely name for a greyhound."),
    ("user", "My sister Ines lives in Porto and teaches chemistry."),
    ("user", "The sourdough starter needs feeding every twelve hours."),
]


def run(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *args], env=env, input=stdin, capture_output=True, text=True, timeout=180
    )


@pytest.fixture(params=["embedded", "server"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RSV_")}
    env = {
        **clean,
        "RSV_CONFIG_FILE": str(tmp_path / "reservoir.toml"),
        "RSV_DATA_DIR": str(tmp_path / "memory"),
    }
    if request.param == "server":
        env["RSV_CHROMA_URL"] = request.getfixturevalue("chroma_server")
        # one server for the module: each test gets its own partition names
        env["TEST_PARTITION"] = f"p{tmp_path.name[-12:]}".replace("-", "")
    return env


def partition(env: dict[str, str]) -> str:
    return env.get("TEST_PARTITION", "acme")


def ingest_facts(env: dict[str, str], instance: str = "alice") -> None:
    for role, text in FACTS:
        done = run(env, "ingest", "-p", partition(env), "-i", instance, "--role", role, stdin=text)
        assert done.returncode == 0, done.stderr


def test_ingest_view_search_stats(env: dict[str, str]) -> None:
    ingest_facts(env)
    p = partition(env)
    view = run(env, "view", "2", "-p", p, "-i", "alice").stdout.splitlines()
    assert len(view) == 2 and view[-1].endswith(FACTS[-1][1]) and " user " in view[-1]
    keyword = run(env, "search", "rescue greyhound", "-p", p, "-i", "alice", "--json").stdout
    texts = [json.loads(line)["text"] for line in keyword.splitlines()]
    assert texts[0] == FACTS[0][1] and set(texts) == {FACTS[0][1], FACTS[1][1]}
    semantic = run(
        env,
        "search",
        "Where does my sibling live?",
        "--semantic",
        "-p",
        p,
        "-i",
        "alice",
        "--limit",
        "1",
    ).stdout
    assert "Porto" in semantic
    assert run(env, "search", "greyhound", "-p", p, "-i", "bob").stdout == ""
    stats = json.loads(run(env, "stats", "--json").stdout)
    row = next(r for r in stats["scopes"] if r["partition"] == p)
    assert row == {
        "partition": p,
        "instance": "alice",
        "messages": 4,
        "embedding_model": "all-MiniLM-L6-v2-int8",
    }


def test_export_import_roundtrip_gives_the_same_search_results(
    env: dict[str, str], tmp_path: Path
) -> None:
    ingest_facts(env)
    p = partition(env)
    dump = tmp_path / "dump.jsonl"
    done = run(env, "export", "-p", p, "--with-embeddings", "-o", str(dump))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [r["text"] for r in lines] == [t for _, t in FACTS]
    assert len(lines[0]["embedding"]) == 384 and lines[0]["seq"] == 0
    other = {**env, "RSV_DATA_DIR": str(tmp_path / "other"), "TEST_PARTITION": p}
    if "RSV_CHROMA_URL" in other:
        run(env, "delete", "-p", p, "--yes")  # the same server: import into the emptied one
    first = run(other, "import", str(dump))
    assert first.returncode == 0 and "imported 4 new message(s)" in first.stdout, first.stderr
    again = run(other, "import", str(dump))
    assert "imported 0 new message(s), 4 already stored" in again.stdout
    for query in ("greyhound", "chemistry teacher"):
        before = [
            json.loads(x)["id"]
            for x in run(
                env, "search", query, "--semantic", "-p", p, "-i", "alice", "--json"
            ).stdout.splitlines()
        ]
        after = [
            json.loads(x)["id"]
            for x in run(
                other, "search", query, "--semantic", "-p", p, "-i", "alice", "--json"
            ).stdout.splitlines()
        ]
        if "RSV_CHROMA_URL" not in env:
            assert before == after and before


def test_import_reports_bad_lines_and_keeps_the_good(env: dict[str, str], tmp_path: Path) -> None:
    p = partition(env)
    good = {
        "id": "a" * 32,
        "partition": p,
        "instance": "carol",
        "role": "user",
        "text": "I collect vintage postcards.",
    }
    dump = tmp_path / "mixed.jsonl"
    dump.write_text(
        "\n".join(
            [
                json.dumps(good),
                "not json",
                json.dumps({**good, "id": 5}),
                json.dumps({**good, "id": "b" * 32, "role": "wizard"}),
                json.dumps({**good, "id": "c" * 32, "text": "I also like stamps."}),
            ]
        )
        + "\n"
    )
    done = run(env, "import", str(dump))
    assert done.returncode == 1
    assert "imported 2 new message(s)" in done.stdout
    assert f"{dump}:2: skipped: not JSON" in done.stderr
    assert f"{dump}:3: skipped: 'id'" in done.stderr
    assert f"{dump}:4: skipped: unknown role 'wizard'" in done.stderr
    view = run(env, "view", "10", "-p", p, "-i", "carol").stdout
    assert "vintage postcards" in view and "stamps" in view


def test_delete_removes_everything_of_the_scope(env: dict[str, str]) -> None:
    ingest_facts(env, "alice")
    ingest_facts(env, "bob")
    p = partition(env)
    refused = run(env, "delete", "-p", p, "-i", "alice")
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert run(env, "delete", "-p", p, "-i", "alice", "--yes").returncode == 0
    assert run(env, "view", "10", "-p", p, "-i", "alice").stdout == ""
    assert run(env, "search", "greyhound", "--semantic", "-p", p, "-i", "alice").stdout == ""
    assert "greyhound" in run(env, "view", "10", "-p", p, "-i", "bob").stdout
    assert run(env, "delete", "-p", p, "--yes").returncode == 0
    assert run(env, "view", "10", "-p", p, "-i", "bob").stdout == ""


def test_plugins_lists_hooks_and_honours_blocking(env: dict[str, str]) -> None:
    listed = run(env, "plugins").stdout
    assert "chroma-store: reservoir_delete, reservoir_store" in listed
    assert "semantic: reservoir_retrieve" in listed
    blocked = run({**env, "RSV_DISABLE_PLUGINS": "semantic"}, "plugins").stdout
    assert "semantic:" not in blocked and "recent: reservoir_retrieve" in blocked


def embedding_app(fail_after: list[int]) -> Starlette:
    """A stand-in OpenAI-compatible embedding endpoint (8 dims, from a hash)."""

    async def embeddings(request: Request) -> Response:
        body = await request.json()
        if fail_after[0] <= 0:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        fail_after[0] -= 1
        data = []
        for index, text in enumerate(body["input"]):
            digest = hashlib.sha256(text.encode()).digest()
            data.append({"index": index, "embedding": [b / 255 for b in digest[:8]]})
        return JSONResponse({"data": data, "model": body["model"]})

    return Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"])])


async def test_replay_reembeds_and_resumes(env: dict[str, str]) -> None:
    import asyncio

    p = partition(env)
    for number in range(3):
        await asyncio.to_thread(run, env, "ingest", "-p", p, "-i", "dave", stdin=f"note {number}")
    rows = [  # 300 messages in all: more than one page of 256
        {
            "id": f"{n:032x}",
            "partition": p,
            "instance": "dave",
            "role": "user",
            "text": f"bulk note {n}",
            "seq": n,
        }
        for n in range(3, 300)
    ]
    lines = "\n".join(json.dumps(row) for row in rows)
    bulk = Path(env["RSV_CONFIG_FILE"]).with_name("bulk.jsonl")
    bulk.write_text(lines + "\n")
    assert (await asyncio.to_thread(run, env, "import", str(bulk))).returncode == 0
    budget = [1]  # the first run fails after one page
    async with serve(embedding_app(budget)) as url:
        replay_env = {**env, "RSV_EMBEDDING_URL": f"{url}/v1"}
        failed = await asyncio.to_thread(run, replay_env, "replay", "--embedding", "openai:fake")
        assert failed.returncode != 0
        budget[0] = 100
        done = await asyncio.to_thread(run, replay_env, "replay", "--embedding", "openai:fake")
        assert done.returncode == 0, done.stderr
        assert "re-embedded" in done.stdout
        config = await asyncio.to_thread(Path(env["RSV_CONFIG_FILE"]).read_text)
        assert 'embedding = "openai:fake"' in config
        stats = json.loads((await asyncio.to_thread(run, replay_env, "stats", "--json")).stdout)
        row = next(r for r in stats["scopes"] if r["partition"] == p)
        assert row["messages"] == 300 and row["embedding_model"] == "openai:fake"
        found = await asyncio.to_thread(
            run,
            replay_env,
            "search",
            "bulk note 42",
            "--semantic",
            "-p",
            p,
            "-i",
            "dave",
            "--limit",
            "1",
        )
        assert "bulk note 42" in found.stdout


def test_search_link_adds_synapse_neighbours(env: dict[str, str]) -> None:
    p = partition(env)
    for text in (
        "The budget review meeting is on Friday at 10.",
        "The budget review meeting is on Friday at 10am.",
        "Penguins mostly live in the southern hemisphere.",
    ):
        run(env, "ingest", "-p", p, "-i", "erin", stdin=text)
    plain = run(env, "search", "10am", "-p", p, "-i", "erin", "--json").stdout.splitlines()
    assert [json.loads(x)["text"] for x in plain] == [
        "The budget review meeting is on Friday at 10am."
    ]
    linked = run(env, "search", "10am", "-p", p, "-i", "erin", "--json", "--link").stdout
    texts = [json.loads(x)["text"] for x in linked.splitlines()]
    assert texts == [
        "The budget review meeting is on Friday at 10am.",
        "The budget review meeting is on Friday at 10.",
    ]
