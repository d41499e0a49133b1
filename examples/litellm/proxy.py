"""LiteLLM's proxy with long-term memory: the `litellm` command plus one middleware.

    export LITELLM_MASTER_KEY="sk-$(python -c 'import secrets; print(secrets.token_hex(24))')"
    OPENAI_API_KEY=sk-... python examples/litellm/proxy.py --config examples/litellm/config.yaml

It takes the options of the `litellm` command (`--config`, `--port`, `--host`,
...) and runs LiteLLM's own command line in this process, after adding
ReservoirMiddleware to LiteLLM's FastAPI app. So the config is loaded exactly as
`litellm --config` loads it (the command sets up the database and secret managers
it names, stores its options in the WORKER_CONFIG environment variable, and the
app reads the config from there when it starts). Differences: `--host` defaults
to 127.0.0.1, and the proxy runs as one process.

Clients use http://HOST:PORT/v1/partition/{partition}/instance/{instance} as
their OpenAI base URL, and the master key (or a LiteLLM virtual key) as their API
key. Memory settings come from RSV_* variables (see the repository's README).
"""

from __future__ import annotations

import os
from typing import Any

import click
from litellm.proxy.proxy_cli import run_server
from litellm.proxy.proxy_server import app

from reservoir_middleware import ReservoirMiddleware


def serve_with_memory(**options: Any) -> None:
    # uvicorn imports "litellm.proxy.proxy_server:app", the object changed here, only
    # in this process; worker processes would import it afresh, without memory (and
    # an embedded Chroma directory is for one process anyway).
    if options["num_workers"] != 1 or options["reload"] or options["run_granian"]:
        raise click.UsageError(
            "memory needs a single process: drop --num_workers, --reload, --run_granian"
        )
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
