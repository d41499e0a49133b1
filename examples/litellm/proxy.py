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
with the middleware added; `--timeout_worker_healthcheck` defaults to
HEALTHCHECK_TIMEOUT seconds instead of uvicorn's 5.

Clients use http://HOST:PORT/v1/partition/{partition}/instance/{instance} as
their OpenAI base URL, and the master key (or a LiteLLM virtual key) as their API
key. Memory settings come from RSV_* variables (see the repository's README).
"""

from __future__ import annotations

# Only light imports at the top: uvicorn starts each worker with multiprocessing's
# "spawn", which first runs this file again (as `__mp_main__`), and the worker
# answers uvicorn's health checks only after that. LiteLLM and chromadb take
# seconds to import (over 20 s with a few workers on a busy 2-core machine):
# imported here, the supervisor killed the workers as hung before they started.
import os
import sys
from pathlib import Path
from typing import Any

import click

# Seconds a worker may take to answer uvicorn's health check (uvicorn: 5). Its
# main thread imports LiteLLM and loads the embedding model while another thread
# answers, but both share the GIL, and a loaded machine slows both.
HEALTHCHECK_TIMEOUT = 60


def serve_with_memory(**options: Any) -> None:
    from litellm.proxy.proxy_cli import ProxyInitializationHelpers, run_server

    if options["reload"] or options["run_granian"] or options["run_gunicorn"]:
        raise click.UsageError(
            "memory runs under uvicorn: drop --reload, --run_granian, --run_gunicorn"
        )
    workers = options["num_workers"]
    if workers > 1:
        from reservoir_middleware import ReservoirSettings

        if not ReservoirSettings().chroma_url:
            raise click.UsageError(
                f"{workers} workers need a Chroma server: embedded memory is opened by one "
                "process only. Run `chroma run --path DIR --port 8000` and set "
                "RSV_CHROMA_URL=http://127.0.0.1:8000"
            )
        if options["timeout_worker_healthcheck"] is None:  # neither the option nor its variable
            options["timeout_worker_healthcheck"] = HEALTHCHECK_TIMEOUT
        # Workers import the app by name: ours, so each adds the middleware itself.
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        defaults = ProxyInitializationHelpers.get_default_unvicorn_init_args

        def with_memory(*args: Any, **kwargs: Any) -> dict[str, Any]:
            return {**defaults(*args, **kwargs), "app": "memory_app:app"}

        ProxyInitializationHelpers.get_default_unvicorn_init_args = with_memory  # type: ignore[method-assign]
    else:
        from litellm.proxy.proxy_server import app

        from reservoir_middleware import ReservoirMiddleware

        # uvicorn imports "litellm.proxy.proxy_server:app": the object changed here.
        app.add_middleware(ReservoirMiddleware)  # settings from RSV_* and the config file
    run_server.callback(**options)


def build_command() -> click.Command:
    """The `litellm` command's options and arguments, with memory added."""
    from litellm.proxy.proxy_cli import run_server

    return click.Command(
        "proxy.py",
        params=run_server.params,
        callback=serve_with_memory,
        help="LiteLLM's proxy with long-term memory; the options are those of `litellm`.",
    )


if __name__ == "__main__":
    os.environ.setdefault("HOST", "127.0.0.1")  # the default of --host (its envvar is HOST)
    build_command()()
