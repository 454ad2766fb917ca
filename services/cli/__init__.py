"""The `tokenrelay` command line: its entry point, `submit` and the token-log tools."""

from services.cli.main import main

__all__ = ["main"]
