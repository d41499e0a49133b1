"""The overhead benchmark runs end to end (servers, fill, measurements, tables).

`--quick` covers every part but the LiteLLM comparison (`--litellm`: two LiteLLM
proxies take too long to start for a smoke test): stored 0 and 200 messages, in
one scope and spread over 10, latency, streaming, the hold-back check, throughput
at concurrency 1, 8 and 32, and peak RSS.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"\s+-?\d+\.\d+\s+\|"
MARK = r"\s+(pass|FAIL)\s+\|"
LAYOUTS = [("0", "1 scope"), ("200", "1 scope"), ("200", "10 scopes")]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def rows(out: str, header: str) -> list[str]:
    """The body lines of the markdown table whose header starts with `header`'s cells."""
    lines = out.splitlines()
    want = cells(header)
    start = next((i for i, line in enumerate(lines) if cells(line)[: len(want)] == want), None)
    assert start is not None, f"no table {header!r} in:\n{out}"
    body = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        body.append(line)
    return body


def key(stored: str, layout: str) -> str:
    return rf"^\|\s+{stored}\s+\|\s+{layout}\s+\|"


def overhead(*args: str) -> str:
    """`bench/overhead.py --quick` with these arguments: its report (it must succeed)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "overhead.py"), "--quick", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.mark.timeout(400)
def test_overhead_benchmark_quick_run() -> None:
    out = overhead()

    latency = rows(
        out,
        "| stored | layout | bare p50 | bare p90 | bare p99 | mw p50 | mw p90 | mw p99 "
        "| added p50 | added p99 |",
    )
    assert len(latency) == len(LAYOUTS), out
    for line, (stored, layout) in zip(latency, LAYOUTS, strict=True):
        assert re.search(rf"{key(stored, layout)}{NUMBER * 8}{MARK * 2}$", line), line

    streaming = rows(out, "| stored | layout | bare TTFB p50 |")
    assert len(streaming) == len(LAYOUTS), out
    for line, (stored, layout) in zip(streaming, LAYOUTS, strict=True):
        assert re.search(rf"{key(stored, layout)}{NUMBER * 9}{MARK}$", line), line

    # 2 streams of 4 events per server; "late" counts bare / mw
    hold = rows(out, "| stored | layout | events | bare delay p50 |")
    assert len(hold) == len(LAYOUTS), out
    for line, (stored, layout) in zip(hold, LAYOUTS, strict=True):
        assert re.search(
            rf"{key(stored, layout)}\s+8\s+\|{NUMBER * 4}\s+\d+ / \d+\s+\|{MARK}$", line
        ), line

    throughput = rows(out, "| stored | layout | concurrency | bare req/s | mw req/s |")
    expected = [(s, layout, c) for s, layout in LAYOUTS for c in (1, 8, 32)]
    assert len(throughput) == len(expected), out
    for line, (stored, layout, concurrency) in zip(throughput, expected, strict=True):
        pattern = rf"{key(stored, layout)}\s+{concurrency}\s+\|{NUMBER * 6}\s+\d+ / \d+\s+\|$"
        assert re.search(pattern, line), line
        bare_rate, mw_rate = (float(v) for v in cells(line)[3:5])
        assert bare_rate > 0 and mw_rate > 0, line

    rss = rows(out, "| stored | layout | bare peak | mw peak |")
    assert len(rss) == len(LAYOUTS), out
    for line, (stored, layout) in zip(rss, LAYOUTS, strict=True):
        assert re.search(rf"{key(stored, layout)}{NUMBER * 4}$", line), line
        bare_peak, mw_peak = (float(v) for v in cells(line)[2:4])
        assert 10 < bare_peak < mw_peak, line

    assert "degraded answers 0" in out, out


@pytest.mark.timeout(400)
def test_overhead_benchmark_rows_with_long_messages(tmp_path: Path) -> None:
    """`--texts lme`: rows whose stored messages are long answers, generated when
    the LongMemEval split is not there; `--cheap-vectors` is said in the report."""
    out = overhead(
        *("--stored", "200", "--scopes", "1", "--texts", "short,lme", "--cheap-vectors"),
        *("--lme-dataset", str(tmp_path / "absent"), "--concurrency", "1"),
    )
    latency = rows(out, "| stored | layout | bare p50 |")
    layouts = [("200", "1 scope"), ("200", "1 scope, LME-like")]
    assert len(latency) == len(layouts), out
    for line, (stored, layout) in zip(latency, layouts, strict=True):
        assert re.search(rf"{key(stored, layout)}{NUMBER * 8}{MARK * 2}$", line), line
    assert "messages: generated (the LongMemEval development split is not there)" in out
    assert "stored vectors: MiniLM of each message's first 48 words (--cheap-vectors)" in out
    assert "degraded answers 0" in out, out
