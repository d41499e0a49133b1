"""The `reservoir` commands that look at, move, fix and delete stored memory.

They run on the engine the middleware uses, with the same settings (embedded
Chroma directory or Chroma server). Long work shows a progress bar on a
terminal and stays quiet when piped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from reservoir_middleware.cli import _configfile as configfile
from reservoir_middleware.cli._transfer import import_lines
from reservoir_middleware.engine import Reservoir
from reservoir_middleware.records import MessageRecord, Scope
from reservoir_middleware.settings import ReservoirSettings, config_file_path
from reservoir_middleware.storage import maintenance
from reservoir_middleware.storage.transfer import export_lines, numbered_lines


class Progress:
    """`label: done/total` on stderr, redrawn at most 10 times a second, on a terminal only."""

    def __init__(self, label: str, total: int | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.enabled = sys.stderr.isatty()
        self._drawn = 0.0

    def __call__(self, step: int = 1) -> None:
        self.done += step
        now = time.monotonic()
        if self.enabled and now - self._drawn > 0.1:
            self._drawn = now
            self._draw()

    def _draw(self) -> None:
        if self.total:
            width = 30
            filled = int(width * min(self.done, self.total) / self.total)
            bar = "#" * filled + "." * (width - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total}")
        else:
            sys.stderr.write(f"\r{self.label} {self.done}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            sys.stderr.write("\n")


def engine() -> Reservoir:
    return Reservoir(ReservoirSettings(chroma_process="inline"))  # short-lived: no child server


def scopes_of(reservoir: Reservoir, partition: str | None, instance: str | None) -> list[Scope]:
    if partition is not None and instance is not None:
        return [Scope(partition, instance)]
    found = reservoir.store.scopes(partition)
    if instance is not None:
        found = [s for s in found if s.instance == instance]
    return found


def when(record: MessageRecord) -> str:
    """The record's local time; one stored before times were checked may have none."""
    try:
        stamp = datetime.fromtimestamp(record.timestamp, tz=timezone.utc).astimezone()
    except (OverflowError, OSError, ValueError, TypeError):
        return f"{'(no valid time)':<19}"
    return stamp.strftime("%Y-%m-%d %H:%M:%S")


def show(record: MessageRecord, score: float | None = None) -> str:
    head = f"{when(record)}  {record.role:<9} {record.trace_id[:12]:<12}"
    if score is not None:
        head += f"  {score:6.3f}"
    text = record.text if not record.tool_calls else record.to_message()["content"]
    return f"{head}  {text}"


async def search(args: argparse.Namespace) -> int:
    reservoir = engine()
    hits = await reservoir.search(
        args.partition, args.instance, args.term, limit=args.limit, semantic=args.semantic
    )
    rows: list[tuple[MessageRecord, float | None]] = [(h.record, h.score) for h in hits]
    if args.link:
        linked = await maintenance.linked(reservoir.store, [h.record for h in hits])
        seen = {r.id for r, _ in rows}
        rows += [(r, None) for r in linked if r.id not in seen]
    if args.json:
        for record, score in rows:
            print(json.dumps({**record.to_dict(), "score": score}, ensure_ascii=False))
    else:
        for record, score in rows:
            print(show(record, score))
    return 0


async def view(args: argparse.Namespace) -> int:
    records = await engine().recent(args.partition, args.instance, limit=args.count)
    for record in records:
        print(show(record))
    return 0


async def ingest(args: argparse.Namespace) -> int:
    text = sys.stdin.read()
    if not text.strip():
        print("reservoir: nothing on standard input to store", file=sys.stderr)
        return 1
    written = await engine().add(
        args.partition, args.instance, [{"role": args.role, "content": text.rstrip("\n")}]
    )
    print(f"stored {len(written)} message(s) in {args.partition}/{args.instance}")
    return 0


async def export(args: argparse.Namespace) -> int:
    reservoir = engine()
    scopes = scopes_of(reservoir, args.partition, args.instance)
    total = sum(reservoir.store.count(s) for s in scopes)
    progress = Progress("export", total)
    with _output(args.output) as out:
        async for line in export_lines(reservoir.store, scopes, embeddings=args.with_embeddings):
            out.write(line)
            progress()
    progress.close()
    if args.output:
        print(f"exported {progress.done} message(s) to {args.output}", file=sys.stderr)
    return 0


async def import_(args: argparse.Namespace) -> int:
    reservoir = engine()
    path = Path(args.file)
    with path.open(encoding="utf-8", errors="replace") as stream:
        total = sum(1 for _ in stream)
        stream.seek(0)
        progress = Progress("import", total)
        report = await import_lines(reservoir, numbered_lines(stream), progress=progress)
    progress.close()
    for number, problem in report.bad:
        print(f"{path}:{number}: skipped: {problem}", file=sys.stderr)
    print(
        f"imported {report.imported} new message(s), {report.existing} already stored, "
        f"{len(report.bad)} bad line(s)"
    )
    return 1 if report.bad else 0


async def delete(args: argparse.Namespace) -> int:
    reservoir = engine()
    scopes = scopes_of(reservoir, args.partition, args.instance)
    if not scopes and args.partition is not None:  # a crash may have left it in a journal
        await reservoir.delete(args.partition, args.instance)
    if not scopes:
        print("nothing to delete")
        return 0
    if not args.yes:
        names = ", ".join(str(s) for s in scopes[:5]) + (" ..." if len(scopes) > 5 else "")
        if not sys.stdin.isatty():
            print(
                f"reservoir: refusing to delete {len(scopes)} scope(s) ({names}) without --yes",
                file=sys.stderr,
            )
            return 1
        answer = input(f"Delete {len(scopes)} scope(s) ({names}) for good? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    # one delete of the partition (or instance): it also covers what only a journal
    # or another process's queue holds, and instances made meanwhile
    deleted = await reservoir.delete(args.partition, args.instance)
    print(f"deleted {deleted} scope(s)")
    return 0


async def forget(args: argparse.Namespace) -> int:
    record = await engine().forget(args.partition, args.instance, args.id)
    if record is None:
        print(
            f"reservoir forget: {args.partition}/{args.instance} holds no message {args.id}",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps({"forgotten": record.to_dict()}, ensure_ascii=False))
    else:
        print(f"forgot 1 message of {args.partition}/{args.instance}:")
        print(show(record))
    return 0


async def retention(args: argparse.Namespace) -> int:
    reservoir = engine()
    found = await reservoir.retention(apply=args.apply)
    settings = reservoir.settings
    if not settings.retention_days and not any(
        p.retention_days for p in settings.partitions.values()
    ):
        print("no retention set (retention_days = 0: messages are kept for ever)")
        return 0
    verb = "removed" if args.apply else "would remove"
    for row in found:
        count = row.removed if args.apply else row.expired
        print(
            f"  {row.scope.partition}/{row.scope.instance}: {verb} {count} message(s) "
            f"older than {row.retention_days:g} day(s)"
        )
    total = sum(r.removed if args.apply else r.expired for r in found)
    print(f"{verb} {total} message(s) in {len(found)} scope(s)")
    if not args.apply and total:
        print("run with --apply to remove them")
    return 0


def stats_of(reservoir: Reservoir) -> dict[str, Any]:
    """What `reservoir stats` shows: the store's figures and what is set aside."""
    return maintenance.stats(reservoir.store, dead_letters=reservoir.dead_letters.count())


async def stats(args: argparse.Namespace) -> int:
    reservoir = engine()
    summary = await asyncio.to_thread(stats_of, reservoir)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
        return 0
    print(f"storage:   {summary['storage']}")
    if summary.get("disk_bytes") is not None:
        print(f"disk:      {summary['disk_bytes'] / 1e6:.1f} MB")
    print(f"embedding: {summary['embedding_model']}")
    print(f"scopes:    {len(summary['scopes'])}, messages: {summary['messages']}")
    if summary["dead_letters"]:
        path = reservoir.dead_letters.path
        print(f"set aside: {summary['dead_letters']} exchange(s) the store refused, in {path}")
    for row in summary["scopes"]:
        print(
            f"  {row['partition']}/{row['instance']}: {row['messages']} message(s), "
            f"{row['embedding_model']}"
        )
    return 0


async def replay(args: argparse.Namespace) -> int:
    reservoir = engine()
    progress = Progress("replay")
    done = await maintenance.replay(
        reservoir.store, reservoir.settings, args.embedding, progress=progress
    )
    progress.close()
    print(f"re-embedded {done} message(s) with {args.embedding}")
    if "RSV_EMBEDDING" in os.environ:
        print(f"now set RSV_EMBEDDING={args.embedding} where the middleware runs")
    else:
        configfile.set_value("embedding", args.embedding)
        print(f"embedding = {args.embedding!r} written to {config_file_path()}")
    return 0


async def plugins(args: argparse.Namespace) -> int:
    for name, hooks in engine().hooks.describe():
        print(f"{name}: {', '.join(hooks)}")
    return 0


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    if path is None or path == "-":
        yield sys.stdout
        return
    with open(path, "w", encoding="utf-8") as handle:
        yield handle


COMMANDS: dict[str, Any] = {
    "search": search,
    "view": view,
    "ingest": ingest,
    "export": export,
    "import": import_,
    "delete": delete,
    "forget": forget,
    "retention": retention,
    "stats": stats,
    "replay": replay,
    "plugins": plugins,
}
