"""The LongMemEval evidence-recall benchmark runs end to end on a tiny fixture."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "tests" / "fixtures" / "longmemeval"  # small haystacks written for this test


def _run(argv: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.mark.timeout(400)
def test_longmemeval_benchmark_tiny_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RSV_")}
    env["RSV_CONFIG_FILE"] = str(tmp_path / "no-config.toml")
    bench = [sys.executable, str(ROOT / "bench" / "longmemeval.py"), "--dataset", str(DATASET)]
    data = ["--data-dir", str(tmp_path / "data")]
    out = _run([*bench, "--strategies", "default,recent,default@500", *data], env)
    assert "36 turns stored through Reservoir.add" in out, out
    assert "3 questions (knowledge-update 1, single-session-assistant 1, " in out, out
    header = (
        r"^\| strategy \| questions \| turn recall \| session recall \| "
        r"mean injected tokens \| enrich p50 ms \| enrich p99 ms \|$"
    )
    assert re.search(header, out, re.M), out
    fraction, number = r"\s+[01]\.\d{3}\s+\|", r"\s+\d+\.\d\s+\|"
    row = r"\|\s+3\s+\|" + fraction * 2 + number * 3 + "$"
    for label in ("default", "recent only", "default @500"):
        assert re.search(rf"^\| {label} {row}", out, re.M), (label, out)
    # the whole haystack fits the default budget: every evidence turn is injected,
    # the long answer whole, found by its text
    assert re.search(r"^\| default \|\s+3\s+\|\s+1\.000\s+\|\s+1\.000\s+\|", out, re.M), out
    assert re.search(r"^\| strategy \| single-session-user \(n=1\) \|", out, re.M), out
    assert "## Missed evidence" in out, out

    # A second run reuses the filled store instead of storing the turns again.
    again = _run([*bench, "--strategies", "recent", *data], env)
    assert "fill: reused the filled store" in again, again
