"""The soak benchmark, run short: steady traffic with no errors, no lost or
duplicated message, and bounded memory growth of the server process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MAX_GROWTH_MB = 150


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
@pytest.mark.timeout(240)
def test_soak_short_run(tmp_path: Path) -> None:
    summary_file = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "soak.py"),
            "--seconds",
            "15",
            "--max-growth-mb",
            str(MAX_GROWTH_MB),
            "--json",
            str(summary_file),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"^\| interval +\| requests +\| errors +\| degraded +\|", out, re.M), out
    assert re.search(r"^\| +12-15 s \| +\d+ \| +0 \| +0 \|", out, re.M), out  # the last interval
    summary = json.loads(summary_file.read_text())
    assert summary["requests"] >= 150, summary  # real traffic, not an idle server
    assert summary["errors"] == 0 and summary["failures"] == {}, summary
    assert summary["degraded"] == 0, summary
    assert summary["stored"] == summary["expected_stored"] == 2 * summary["requests"], summary
    assert summary["injected_mean"] > 1, summary  # memory was injected all along
    assert 50 < summary["rss_start_mb"] <= summary["rss_peak_mb"], summary  # really measured
    assert summary["rss_growth_mb"] < MAX_GROWTH_MB, summary
