"""The `reservoir` command."""

from reservoir_middleware.cli.main import main

__all__ = ["main"]
