"""The ``subfore`` command line: ``app`` (the Typer app and entry point) and one module per command group."""

from . import data, evaluate, export, train  # noqa: F401 - each registers its commands on the app
from .app import app, keep_eof, main

# The order ``subfore --help`` lists them in: the README's order of use.
_ORDER = ["phantoms", "show-mask", "analyze", "pretrain", "finetune", "probe", "fingerprint", "preprocess", "evaluate",
          "predict", "study"]
app.registered_commands.sort(key=lambda c: _ORDER.index(c.name or c.callback.__name__))
for _command in app.registered_commands:
    _command.callback = keep_eof(_command.callback)

__all__ = ["app", "main"]
