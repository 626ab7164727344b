"""The command line: the Typer app (``app``) and how it prints (``output``)."""

from .app import app, main

__all__ = ["app", "main"]
