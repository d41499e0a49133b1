"""Keyword search (`reservoir search`, the admin search endpoint,
`Reservoir.search(semantic=False)`) finds a word in any casing, accents, non-Latin
scripts, numbers and identifiers, and ranks as the request path's lexical retrieval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from reservoir_middleware.builtins.lexical import LexicalRetrieval
from reservoir_middleware.context import RetrievalQuery
from reservoir_middleware.memory.keywords import terms
from reservoir_middleware.records import Scope
from tests.conftest import GatewayFactory

SCRIPT = str(Path(sys.executable).with_name("reservoir"))
ADMIN = {"Authorization": "Bearer adm-secret-1"}
P, INST = "acme", "alice"

POSTGRES = "We run PostgreSQL 16 in prod"
GITHUB = "Pushed to GitHub"
IPHONE = "my iPhone"
CAFE = "Café crème à Besançon"
TOKYO = "東京に住んでいます"
HINDI = "मेरी किताब मेज़ पर है"
VERSION = "released v1.2.3"
TICKET = "ticket #4521"
# more messages on PostgreSQL, to rank several hits
BACKUPS = "The PostgreSQL backups run nightly, PostgreSQL backups are kept for a week"
TUNING = "Tuning postgresql: shared buffers and the planner settings of the cluster"
OTHER = ["The garden needs watering", "v1.2.4 is planned", "ticket #4522 is closed"]
MESSAGES = [POSTGRES, GITHUB, IPHONE, CAFE, TOKYO, HINDI, VERSION, TICKET, BACKUPS, TUNING]

EXPECTED = {
    "postgresql": POSTGRES,
    "POSTGRESQL": POSTGRES,
    "PostgreSQL 16": POSTGRES,
    "github": GITHUB,
    "GITHUB": GITHUB,
    "IPHONE": IPHONE,
    "iphone": IPHONE,
    "cafe": CAFE,
    "café": CAFE,
    "CAFÉ": CAFE,
    "besancon": CAFE,
    "Besançon": CAFE,
    "東京": TOKYO,
    "किताब": HINDI,
    "v1.2.3": VERSION,
    "4521": TICKET,
    "#4521": TICKET,
}
MULTI = "postgresql backups"


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([SCRIPT, *args], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stdout


def cli_search(env: dict[str, str], query: str) -> list[str]:
    out = cli(env, "search", query, "-p", P, "-i", INST, "--json", "--limit", "20")
    return [json.loads(line)["text"] for line in out.splitlines()]


async def test_keyword_search_finds_any_casing_script_and_identifier(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    async with gateway_factory(admin_key="adm-secret-1", data_dir=tmp_path / "gateway") as gw:
        reservoir = gw.reservoir
        await reservoir.add(P, INST, [{"role": "user", "content": t} for t in MESSAGES + OTHER])
        await reservoir.settle()

        for query, text in EXPECTED.items():
            found = [h.record.text for h in await reservoir.search(P, INST, query, semantic=False)]
            assert text in found, (query, found)
            if text != POSTGRES:  # the other PostgreSQL messages may rank above it
                assert found[0] == text, (query, found)
            assert OTHER[0] not in found, (query, found)  # nothing in common
            response = await gw.http.get(
                gw.base(P, INST) + "/memory/search",
                params={"term": query, "limit": "20"},
                headers=ADMIN,
            )
            assert response.status_code == 200, response.text
            assert [r["text"] for r in response.json()["results"]] == found, query

        # the request path's lexical ranking of the scope, for a query with several hits
        lexical = reservoir.plugin_manager.get_plugin("lexical")
        assert isinstance(lexical, LexicalRetrieval)
        asked = RetrievalQuery(Scope(P, INST), MULTI, None, frozenset(), 20, 0, 0.0, "instance", {})
        candidates = lexical.reservoir_retrieve(asked, reservoir.store) or []
        by_id = {r.id: r.text for r in await reservoir.recent(P, INST, limit=100)}
        request_order = [by_id[c.record.id] for c in candidates]
        hits = await reservoir.search(P, INST, MULTI, limit=20, semantic=False)
        # the same order, less the messages found by their neighbours' words only
        wanted = set(terms(MULTI))
        holding = [t for t in request_order if not wanted.isdisjoint(terms(t))]
        assert [h.record.text for h in hits] == holding
        assert len(holding) > 1
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert set(holding) == {POSTGRES, BACKUPS, TUNING}
        assert request_order[0] == BACKUPS
        export = await gw.http.get(gw.base(P, INST) + "/memory/export", headers=ADMIN)
        (tmp_path / "export.jsonl").write_text(export.text)
        await reservoir.close()

    env = {k: v for k, v in os.environ.items() if not k.startswith("RSV_")}
    env |= {
        "RSV_CONFIG_FILE": str(tmp_path / "none.toml"),
        "RSV_DATA_DIR": str(tmp_path / "memory"),
    }
    cli(env, "import", str(tmp_path / "export.jsonl"))
    for query in ("POSTGRESQL", "github", "IPHONE", "cafe", "besancon", "東京", "v1.2.3", "#4521"):
        assert EXPECTED[query] in cli_search(env, query), query
    assert cli_search(env, MULTI) == holding  # the CLI ranks as the request path does
