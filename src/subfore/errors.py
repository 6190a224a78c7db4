"""User-facing errors: each carries a one-line message that names the file and the problem."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path


class SubforeError(Exception):
    """An error caused by the user's input; the CLI prints its message alone and exits non-zero."""


class ConfigError(SubforeError):
    """A configuration key is unknown, missing or of the wrong type."""


class DataError(SubforeError):
    """A data file is missing, unreadable or not what the task needs."""

    def __init__(self, path: str | Path | None = None, problem: str = "") -> None:
        # DataLoader workers rebuild exceptions from a single message string: accept that form too.
        self.path = None if path is None or problem == "" else str(path)
        self.problem = problem if problem else str(path)
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)


def root_message(exc: BaseException) -> str:
    """Return the first line of the deepest cause of ``exc``, as ``Type: message``."""
    seen = set()
    while True:
        nxt = exc.__cause__ or exc.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(exc))
        exc = nxt
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def source_name(data: Mapping, key: Hashable) -> str:
    """The file a (loaded or not yet loaded) item came from, for error messages."""
    value = data.get(key)
    meta = getattr(value, "meta", None)
    if meta and "filename_or_obj" in meta:
        return str(meta["filename_or_obj"])
    if isinstance(value, (list, tuple)):
        return str(value[0])
    return str(value)
