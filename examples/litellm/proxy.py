"""LiteLLM's proxy with long-term memory: the `litellm` command plus one middleware.

    export LITELLM_MASTER_KEY="sk-$(python -c 'import secrets; print(secrets.token_hex(24))')"
    OPENAI_API_KEY=sk-... python examples/litellm/proxy.py --config examples/litellm/config.yaml

It takes the options of the `litellm` command (`--config`, `--port`, `--host`,
...) and runs LiteLLM's own command line in this process, after adding
ReservoirMiddleware to LiteLLM's FastAPI app. So the config is loaded exactly as
`litellm --config` loads it (the command sets up the database and secret managers
it names, stores its options in the WORKER_CONFIG environment variable, and the
app reads the config from there when it starts). Differences: `--host` defaults
to 127.0.0.1; `--num_workers N` (N > 1) needs RSV_CHROMA_URL (a Chroma server
the workers share) and makes each worker import `memory_app.py`, LiteLLM's app
with the middleware added.

Clients use http://HOST:PORT/v1/partition/{partition}/instance/{instance} as
their OpenAI base URL, and the master key (or a LiteLLM virtual key) as their API
key. Memory settings come from RSV_* variables (see the repository's README).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
from litellm.proxy.proxy_cli import ProxyInitializationHelpers, run_server
from litellm.proxy.proxy_server import app

from reservoir_middleware import ReservoirMiddleware, ReservoirSettings


def serve_with_memory(**options: Any) -> None:
    if options["reload"] or options["run_granian"] or options["run_gunicorn"]:
        raise click.UsageError(
            "memory runs under uvicorn: drop --reload, --run_granian, --run_gunicorn"
        )
    workers = options["num_workers"]
    if workers > 1:
        if not ReservoirSettings().chroma_url:
            raise click.UsageError(
                f"{workers} workers need a Chroma server: embedded memory is opened by one "
                "process only. Run `chroma run --path DIR --port 8000` and set "
                "RSV_CHROMA_URL=http://127.0.0.1:8000"
            )
        # Workers import the app by name: ours, so each adds the middleware itself.
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        defaults = ProxyInitializationHelpers.get_default_unvicorn_init_args

        def with_memory(*args: Any, **kwargs: Any) -> dict[str, Any]:
            return {**defaults(*args, **kwargs), "app": "memory_app:app"}

        ProxyInitializationHelpers.get_default_unvicorn_init_args = with_memory  # type: ignore[method-assign]
    else:
        # uvicorn imports "litellm.proxy.proxy_server:app": the object changed here.
        app.add_middleware(ReservoirMiddleware)  # settings from RSV_* and the config file
    run_server.callback(**options)


command = click.Command(
    "proxy.py",
    params=run_server.params,  # the options and arguments of `litellm`
    callback=serve_with_memory,
    help="LiteLLM's proxy with long-term memory; the options are those of `litellm`.",
)

if __name__ == "__main__":
    os.environ.setdefault("HOST", "127.0.0.1")  # the default of --host (its envvar is HOST)
    command()
