"""The `wildenberg-intake` command line and the demo."""

from .main import main

__all__ = ["main"]
