"""The ``subfore`` command line: ``app`` (the Typer app and entry point) and one module per command group."""

from . import data, evaluate, export, train  # noqa: F401 - each registers its commands on the app
from .app import app, main


__all__ = ["app", "main"]
