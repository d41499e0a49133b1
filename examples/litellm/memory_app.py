"""LiteLLM's app with memory, as an import string for worker processes.

`proxy.py --num_workers N` points uvicorn at `memory_app:app` instead of
`litellm.proxy.proxy_server:app`: each worker process imports this module,
so each adds the middleware to its own copy of LiteLLM's app.
"""

from litellm.proxy.proxy_server import app

from reservoir_middleware import ReservoirMiddleware

app.add_middleware(ReservoirMiddleware)  # settings from RSV_* and the config file
