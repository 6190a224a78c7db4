"""Where a result came from: the code version (commit, dirty flag) and digests of the files a run read."""

from __future__ import annotations

import hashlib
import os
import subprocess
from functools import lru_cache
from pathlib import Path

from . import __version__

_SOURCE = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def code_version() -> dict:
    """{"version", "commit", "dirty"}: the git commit of this package's source tree and whether its source, configs
    or dependency pins have uncommitted changes; commit and dirty are None for an installed (non-git) copy."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(_SOURCE), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    top = git("rev-parse", "--show-toplevel")
    tracked = git("ls-files", "--error-unmatch", "--", str(Path(__file__).resolve()))
    # A copy installed into a venv inside some checkout is not that checkout's code.
    if commit is None or top is None or Path(top.strip()).resolve() != _SOURCE.parents[1] or tracked is None:
        return {"version": __version__, "commit": None, "dirty": None}
    # What can move a number: the package's source, the shipped configs and the pinned dependencies. Docs, tests
    # and untracked run directories do not count.
    root = _SOURCE.parents[1]
    status = git("status", "--porcelain", "--untracked-files=no", "--", str(_SOURCE),
                 *(str(root / p) for p in ("configs", "pyproject.toml", "constraints.txt")))
    return {"version": __version__, "commit": commit.strip(), "dirty": bool(status and status.strip())}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_key(path: str | Path) -> str:
    """A file's name in a record: relative to the working directory (``../shared/data/…`` too), so that a study run
    from the root of another clone names the same files."""
    return os.path.relpath(Path(path).resolve(), Path.cwd().resolve())


def items_digest(items: list[dict], keys: tuple[str, ...] = ("image", "label")) -> dict[str, str]:
    """{file (:func:`data_key`): sha256} of every file the datalist items name under ``keys``."""
    paths: list[str] = []
    for item in items:
        for key in keys:
            value = item.get(key)
            paths += [] if value is None else value if isinstance(value, list) else [value]
    return {data_key(p): file_digest(p) for p in dict.fromkeys(paths) if Path(p).is_file()}
