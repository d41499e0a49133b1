"""The `reservoir` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .settings import ReservoirSettings

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
    return parser


def config(args: argparse.Namespace) -> int:
    from . import configfile
    from .settings import config_file_path

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

    from .gateway import create_app

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    settings = ReservoirSettings(**overrides)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
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
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level
    )
    return 0


def demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(run_demo(args.data_dir, offline=args.offline))


def main(argv: Sequence[str] | None = None) -> int:
    from .configfile import ConfigError

    args = build_parser().parse_args(argv)
    handlers = {"serve": serve, "demo": demo, "config": config}
    try:
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
