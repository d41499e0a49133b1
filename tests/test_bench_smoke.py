"""The overhead benchmark runs end to end (servers, fill, measurements, table)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(400)
def test_overhead_benchmark_quick_run() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "overhead.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert re.search(r"^\| stored \| bare p50 \| .* \| mw p50 \| .* \| added p50 \|", out, re.M), (
        out
    )
    number = r"\s+-?\d+\.\d+\s+\|"
    assert re.search(rf"^\|\s+0\s+\|{number * 8}\s+(pass|FAIL)\s+\|", out, re.M), out
    assert re.search(rf"^\|\s+200\s+\|{number * 8}", out, re.M), out
    assert re.search(r"^\| stored \| bare TTFB p50 \|", out, re.M), out
    assert re.search(rf"^\|\s+200\s+\|{number * 9}\s*$", out, re.M), out
