"""What deleting one scope costs, with few or many other messages stored (embedded Chroma).

    python bench/delete_cost.py                      # 1k and 100k others: about 5 min
    python bench/delete_cost.py --data-dir /work/bench-delete --others 1000,100000

For each count N of other messages (`--others`) a data directory holds N short
synthetic messages in scopes of 1,000, written in batches straight through the
store (`ChromaStore.reservoir_store`, random unit vectors: no embedding model),
so the fill is quick; with `--data-dir` it is kept and reused. Then, one after
the other, `--deletes` scopes of `--scope-size` messages are written and
deleted, each way timed from the call to its return:

* `erase`: what `reservoir delete` does now (`ChromaStore.reservoir_delete`:
  the scope's rows and the file's free pages zeroed by a `secure_delete`
  connection, then Chroma's delete);
* `vacuum`: what it did before: Chroma's delete, then `VACUUM` of the whole
  `chroma.sqlite3` with `secure_delete` on (in a child process, as Chroma's
  SQLite and Python's must not share a process).

It prints a markdown table: median and p99 (the slowest of few) per way and N.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import markdown_table, percentile

from reservoir_middleware.records import MessageRecord, Scope
from reservoir_middleware.storage.chroma import ChromaStore, collection_name

DIM = 384
FILL_SCOPE = 1000
BATCH = 500
WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
]
VACUUM = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
db.execute("PRAGMA secure_delete = ON")
db.execute("VACUUM")
"""


def messages(scope: Scope, start: int, count: int, rng: np.random.Generator) -> list[MessageRecord]:
    out = []
    for n in range(start, start + count):
        words = " ".join(rng.choice(WORDS, 8))
        out.append(
            MessageRecord(
                id=f"{scope.instance}-{n}",
                partition=scope.partition,
                instance=scope.instance,
                role="user" if n % 2 == 0 else "assistant",
                text=f"message {n} of {scope.instance}: {words}",
                seq=n,
            )
        )
    return out


def write(store: ChromaStore, scope: Scope, count: int, rng: np.random.Generator) -> None:
    for start in range(0, count, BATCH):
        part = messages(scope, start, min(BATCH, count - start), rng)
        vectors = rng.standard_normal((len(part), DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.reservoir_store(scope, part, vectors.tolist())


def fill(store: ChromaStore, others: int, rng: np.random.Generator) -> float:
    """Write the other messages (what is missing of them); the seconds it took."""
    began = time.perf_counter()
    for index in range(0, others, FILL_SCOPE):
        scope = Scope("filler", f"s{index // FILL_SCOPE:05d}")
        size = min(FILL_SCOPE, others - index)
        if store.count(scope) < size:
            write(store, scope, size, rng)
    return time.perf_counter() - began


def delete_by_vacuum(store: ChromaStore, scope: Scope) -> None:
    store.client.delete_collection(collection_name(scope))
    store.forget(scope)
    database = store.data_dir / "chroma.sqlite3"
    subprocess.run([sys.executable, "-I", "-S", "-c", VACUUM, str(database)], check=True)


def measure(data_dir: Path, others: int, deletes: int, size: int) -> dict[str, list[float]]:
    rng = np.random.default_rng(others)
    store = ChromaStore(data_dir, None, "bench", chroma_process="inline")
    took = fill(store, others, rng)
    megabytes = (data_dir / "chroma.sqlite3").stat().st_size / 1e6
    print(f"{others} others: filled in {took:.0f} s, chroma.sqlite3 {megabytes:.0f} MB", flush=True)
    times: dict[str, list[float]] = {"vacuum": [], "erase": []}
    for way, times_of_way in times.items():
        for n in range(deletes):
            scope = Scope("target", f"{way}-{n}")
            write(store, scope, size, rng)
            began = time.perf_counter()
            if way == "erase":
                store.reservoir_delete(scope)
            else:
                delete_by_vacuum(store, scope)
            times_of_way.append(time.perf_counter() - began)
    store.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, help="kept and reused (default: a temporary one)")
    parser.add_argument("--others", default="1000,100000", help="other messages stored")
    parser.add_argument("--deletes", type=int, default=5, help="deletes per way and count")
    parser.add_argument("--scope-size", type=int, default=100, help="messages of a deleted scope")
    args = parser.parse_args()
    base = args.data_dir or Path(tempfile.mkdtemp(prefix="delete-cost-"))
    rows = []
    for others in [int(x) for x in args.others.split(",")]:
        times = measure(base / f"others-{others}", others, args.deletes, args.scope_size)
        for way, values in times.items():
            median, slowest = statistics.median(values), percentile(values, 99, nearest=True)
            rows.append([f"{others:,}", way, f"{median * 1000:.0f}", f"{slowest * 1000:.0f}"])
    header = ["other messages", "way", "median ms", "p99 ms"]
    caption, rest = markdown_table(header, rows, "rlrr").split("\n", 1)
    print()
    print(f"{caption}  ({args.scope_size}-message scope)")
    print(rest)


if __name__ == "__main__":
    main()
