"""The LoCoMo evidence-recall benchmark runs end to end on a tiny slice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "tests" / "fixtures" / "locomo"  # a small conversation written for this test


@pytest.mark.timeout(400)
def test_locomo_benchmark_tiny_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RSV_")}
    env["RSV_CONFIG_FILE"] = str(tmp_path / "no-config.toml")
    argv = [
        sys.executable,
        str(ROOT / "bench" / "locomo.py"),
        "--dataset",
        str(DATASET),
        "--conversations",
        "fixture",
        "--limit-questions",
        "5",
        "--strategies",
        "default,recent,previous@1000",
        "--data-dir",
        str(tmp_path / "data"),
    ]
    done = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert "--conversations fixture" in out, out
    assert "24 turns stored through Reservoir.add" in out, out
    header = (
        r"^\| strategy \| questions \| evidence recall \| all-evidence hit rate \| "
        r"mean injected tokens \| latency p50 ms \| latency p99 ms \|$"
    )
    assert re.search(header, out, re.M), out
    fraction, number = r"\s+[01]\.\d{3}\s+\|", r"\s+\d+\.\d\s+\|"
    row = r"\|\s+5\s+\|" + fraction * 2 + number * 3 + "$"
    for label in ("default", "recent only", r"previous default @1000 \(comparison\)"):
        assert re.search(rf"^\| {label} {row}", out, re.M), (label, out)
    assert re.search(r"^\| strategy \| 1 multi-hop \(n=\d+\) \|", out, re.M), out
    assert re.search(r"^\| strategy \| fixture\.json \(n=5\) \|$", out, re.M), out
    assert "reference (dataset README" in out, out

    # A second run reuses the filled store instead of storing the turns again.
    again = subprocess.run(
        [*argv[:-4], "--strategies", "recent", "--data-dir", str(tmp_path / "data")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert "fill: reused the filled store" in again.stdout, again.stdout
