"""The `reservoir` command."""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from reservoir_middleware.settings import ReservoirSettings

EPILOG = "Settings come from RSV_* variables and the config file; see the README."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reservoir",
        description="Long-term memory for OpenAI-compatible chat.",
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run an OpenAI-compatible gateway with memory",
        description="Run an OpenAI-compatible gateway with memory on 127.0.0.1:3017. Models are "
        "routed by name: gpt-*/o1*/o3*/o4* to OpenAI (OPENAI_API_KEY), mistral-* to Mistral "
        "(MISTRAL_API_KEY), gemini-* to Gemini (GEMINI_API_KEY), llama*, codellama* and "
        "names with a ':' tag to Ollama; 'auto' picks the first reachable one.",
        epilog="example: OPENAI_API_KEY=sk-... reservoir serve --port 3017\n"
        "then use http://127.0.0.1:3017/v1/partition/me/instance/laptop as base URL",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1, RSV_HOST)")
    serve.add_argument("--port", type=int, help="port (default 3017, RSV_PORT)")
    serve.add_argument("--data-dir", type=Path, help="embedded Chroma directory (RSV_DATA_DIR)")
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes (default 1, RSV_WORKERS). More than 1 needs a Chroma server "
        "(`chroma run --path DIR --port 8000`, then RSV_CHROMA_URL=http://127.0.0.1:8000): "
        "the embedded directory belongs to one process. Each worker keeps its own rate limit "
        "(rate_limit_per_minute is counted per worker) and its own caches (provider model "
        "lists, 'auto' probes, keyword indexes)",
    )
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )

    demo = commands.add_parser(
        "demo",
        help="show memory at work across two sessions",
        description="Start the gateway on 127.0.0.1 and send two separate sessions through it: "
        "the second session's request, as the model receives it, carries what was said in "
        "the first. Uses OpenAI when OPENAI_API_KEY is set, else a local stand-in model.",
        epilog="example: reservoir demo",
    )
    demo.add_argument(
        "--data-dir", type=Path, help="keep the demo's memory here (default: a temporary directory)"
    )
    demo.add_argument(
        "--offline",
        action="store_true",
        help="use the local stand-in model even if OPENAI_API_KEY is set",
    )
    config = commands.add_parser(
        "config",
        help="read or change the config file",
        description="Read or change the TOML config file ($RSV_CONFIG_FILE, else "
        "$XDG_CONFIG_HOME/reservoir/reservoir.toml). Values are checked before they are written; "
        "RSV_* variables and keyword arguments still take precedence over the file.",
        epilog="examples:\n  reservoir config --set recent_context_size=10\n"
        "  reservoir config --set 'model_limits={\"my-model\" = 32768}'\n"
        "  reservoir config --get data_dir\n  reservoir config --list",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    action = config.add_mutually_exclusive_group(required=True)
    action.add_argument("--set", metavar="KEY=VALUE", help="write a setting (a TOML value)")
    action.add_argument("--get", metavar="KEY", help="print the value in force")
    action.add_argument("--unset", metavar="KEY", help="remove a setting from the file")
    action.add_argument("--list", action="store_true", help="every setting, its value and source")
    action.add_argument("--path", action="store_true", help="print the config file's path")
    add_memory_commands(commands)
    return parser


def _scope_options(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    default = None if required else "default"
    parser.add_argument(
        "-p",
        "--partition",
        default=default,
        required=required,
        help="partition" + ("" if required else " (default: default)"),
    )
    parser.add_argument(
        "-i",
        "--instance",
        default=default,
        help="instance" + ("" if required else " (default: default)"),
    )


def add_memory_commands(commands: Any) -> None:
    def command(name: str, summary: str, description: str, example: str) -> Any:
        return commands.add_parser(
            name,
            help=summary,
            description=description,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    search = command(
        "search",
        "search stored messages",
        "Keyword search (BM25-ranked, not substring order) or, with --semantic, "
        "search by meaning, in one partition/instance.",
        "reservoir search 'sourdough starter' -p acme -i alice --limit 5",
    )
    search.add_argument("term")
    search.add_argument("--semantic", action="store_true", help="search by meaning (embeddings)")
    _scope_options(search)
    search.add_argument("--limit", type=int, default=10, help="how many results (default 10)")
    search.add_argument("--link", action="store_true", help="add synapse neighbours of the hits")
    search.add_argument("--json", action="store_true", help="one JSON record per line")

    view = command(
        "view",
        "show the last messages",
        "The last N messages of a partition/instance with time, role and trace id.",
        "reservoir view 20 -p acme -i alice",
    )
    view.add_argument("count", type=int, metavar="N")
    _scope_options(view)

    ingest = command(
        "ingest",
        "store standard input as a message",
        "Store what arrives on standard input as one message.",
        "echo 'I moved to Lyon in May.' | reservoir ingest -p acme -i alice",
    )
    _scope_options(ingest)
    ingest.add_argument("--role", choices=["user", "assistant", "system"], default="user")

    export = command(
        "export",
        "write memory as JSON Lines",
        "Every field of every stored message, one JSON record per line, oldest "
        "first; all scopes unless -p/-i narrow it.",
        "reservoir export -p acme -o acme.jsonl",
    )
    export.add_argument("-p", "--partition")
    export.add_argument("-i", "--instance")
    export.add_argument("--with-embeddings", action="store_true", help="include the vectors")
    export.add_argument("-o", "--output", help="file to write (default: standard output)")

    load = command(
        "import",
        "read memory from JSON Lines",
        "Store the records of an export. Idempotent: what is stored already is "
        "skipped. Bad lines are reported by number and skipped; exit code 1 if any.",
        "reservoir import acme.jsonl",
    )
    load.add_argument("file")

    delete = command(
        "delete",
        "forget a partition or one instance",
        "Remove a partition (all its instances) or one instance completely: "
        "afterwards neither search nor enrichment can return any of it.",
        "reservoir delete -p acme -i alice --yes",
    )
    _scope_options(delete, required=True)
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    forget = command(
        "forget",
        "forget one message",
        "Remove one stored message for good (its id: `reservoir search --json`); "
        "the other messages of the partition/instance stay.",
        "reservoir forget 9f86d081884c7d659a2feaa0c55ad015 -p acme -i alice",
    )
    forget.add_argument("id", help="the message id")
    forget.add_argument("-p", "--partition", required=True, help="partition")
    forget.add_argument("-i", "--instance", required=True, help="instance")
    forget.add_argument("-j", "--json", action="store_true", help="the message as JSON")

    retention = command(
        "retention",
        "remove messages past their retention",
        "Messages older than their partition's retention_days (by their stored time): "
        "counted per scope (--dry-run, the default) or removed for good (--apply).",
        "reservoir retention --apply",
    )
    mode = retention.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", dest="apply", action="store_false", help="only count (default)")
    mode.add_argument("--apply", dest="apply", action="store_true", help="remove them")
    retention.set_defaults(apply=False)

    stats = command(
        "stats",
        "scopes, message counts, model, disk size",
        "What is stored: scopes, message counts, embedding model, disk size.",
        "reservoir stats --json",
    )
    stats.add_argument("--json", action="store_true")

    replay = command(
        "replay",
        "re-embed everything with another model",
        "Re-embed every stored message with another embedding model (after a model "
        "change), then record that model in the config file. Resumable: run it "
        "again after an interruption and it continues.",
        "reservoir replay --embedding openai:text-embedding-3-small",
    )
    replay.add_argument("--embedding", required=True, help="the new embedding (see RSV_EMBEDDING)")

    command(
        "plugins",
        "list loaded plugins and their hooks",
        "Every loaded plugin (built-in, from an entry point or given in code) and the hooks it "
        "implements; plugins blocked by RSV_DISABLE_PLUGINS are left out.",
        "RSV_DISABLE_PLUGINS=recent reservoir plugins",
    )


def config(args: argparse.Namespace) -> int:
    from reservoir_middleware.cli import _configfile as configfile
    from reservoir_middleware.settings import config_file_path

    if args.path:
        print(config_file_path())
    elif args.set is not None:
        key, sep, value = args.set.partition("=")
        if not sep:
            raise configfile.ConfigError(f"--set takes KEY=VALUE, not {args.set!r}")
        name, stored = configfile.set_value(key, value)
        print(f"{name} = {stored!r}  (in {config_file_path()})")
    elif args.unset is not None:
        removed = configfile.unset_value(args.unset)
        print(f"{'removed' if removed else 'not in the file:'} {args.unset}")
    elif args.get is not None:
        name = configfile.normalize_key(args.get)
        print(getattr(ReservoirSettings(), name))
    else:
        for name, value, source in configfile.effective():
            secret = "key" in name and value and source != "default"
            shown = "***" if secret else str(value) if isinstance(value, Path) else repr(value)
            print(f"{name} = {shown}  [{source}]")
    return 0


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from reservoir_middleware.gateway.app import create_app
    from reservoir_middleware.storage._datadir_lock import DataDirInUse, lock_data_dir

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.workers is not None:
        overrides["workers"] = args.workers
    settings = ReservoirSettings(**overrides)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if settings.workers > 1 and not settings.chroma_url:
        print(
            f"reservoir serve: {settings.workers} workers need a Chroma server: embedded memory "
            f"({settings.data_dir}) can be opened by one process only. Run "
            f"`chroma run --path {shlex.quote(str(settings.data_dir))} --port 8000` and set "
            "RSV_CHROMA_URL=http://127.0.0.1:8000, or serve with one worker",
            file=sys.stderr,
        )
        return 1
    if not settings.chroma_url:
        try:  # fail now, not with every request un-enriched
            lock_data_dir(settings.data_dir)
        except DataDirInUse as exc:
            print(f"reservoir serve: {exc}", file=sys.stderr)
            return 1
    where = settings.chroma_url or settings.data_dir
    print(f"reservoir: memory in {where}", file=sys.stderr)
    keys = [
        name
        for name in ("OPENAI_API_KEY", "MISTRAL_API_KEY", "GEMINI_API_KEY")
        if os.environ.get(name)
    ]
    if not keys:
        print(
            "reservoir: no provider key set (OPENAI_API_KEY, MISTRAL_API_KEY, GEMINI_API_KEY): "
            f"only Ollama at {settings.ollama_base_url} can answer.\n"
            "reservoir: to see memory at work without any provider, run `reservoir demo`.",
            file=sys.stderr,
        )
    base = f"http://{settings.host}:{settings.port}"
    print(
        f"reservoir: clients use {base}/v1/partition/PARTITION/instance/INSTANCE as base URL",
        file=sys.stderr,
    )
    log_config = uvicorn_log_config(args.log_level)
    if settings.workers == 1:
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=args.log_level,
            log_config=log_config,
        )
        return 0
    # Each worker process builds its own app from the settings, which it reads from the
    # environment and the config file: the command-line values go there too.
    for name, value in overrides.items():
        os.environ[f"RSV_{name.upper()}"] = str(value)
    print(f"reservoir: {settings.workers} worker processes", file=sys.stderr)
    uvicorn.run(
        "reservoir_middleware.gateway.app:create_app",
        factory=True,
        workers=settings.workers,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        log_config=log_config,
    )
    return 0


LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def uvicorn_log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging plus ours (the `reservoir` logger and the libraries), set up
    again in every worker process."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["reservoir"] = {"format": LOG_FORMAT}
    config["handlers"]["reservoir"] = {
        "formatter": "reservoir",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    config["root"] = {"handlers": ["reservoir"], "level": level.upper()}
    # httpx logs every request at INFO: each call to Chroma and to the model
    # (uvicorn's access log already shows the traffic)
    config["loggers"]["httpx"] = {"level": "WARNING"}
    return config


def demo(args: argparse.Namespace) -> int:
    from reservoir_middleware.cli._demo import run_demo

    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(run_demo(args.data_dir, offline=args.offline))


def main(argv: Sequence[str] | None = None) -> int:
    from reservoir_middleware.cli._configfile import ConfigError
    from reservoir_middleware.cli._memory import COMMANDS

    args = build_parser().parse_args(argv)
    handlers = {"serve": serve, "demo": demo, "config": config}
    try:
        if args.command in COMMANDS:
            logging.basicConfig(level=logging.ERROR)
            try:
                return int(asyncio.run(COMMANDS[args.command](args)))
            except (ConfigError, ValidationError, KeyboardInterrupt, BrokenPipeError):
                raise
            except Exception as exc:  # a clear line, not a traceback
                print(f"reservoir {args.command}: {exc}", file=sys.stderr)
                return 1
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"reservoir: {exc}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        print(f"reservoir: invalid setting: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `reservoir ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
