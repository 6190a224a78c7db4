"""Where a result came from: the code version (commit, dirty flag), the platform it ran on and digests of the files a
run read."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
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


# The fields that must all agree for two runs to be on the same platform: float results are bit-identical only for
# the same CPU kernels (model, the instruction set torch dispatches to, thread count), the same accelerator stack
# and the same library versions.
PLATFORM_FIELDS = ("cpu", "cpu_capability", "threads", "device", "gpu", "cuda", "cudnn", "python", "torch", "numpy",
                   "monai", "lightning")


def platform_info(device: object = "cpu") -> dict:
    """The platform a run on ``device`` computes on, as JSON (:data:`PLATFORM_FIELDS`; gpu/cuda/cudnn null off CUDA)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def dist(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    kind = getattr(device, "type", None) or str(device).split(":")[0]
    cuda = kind == "cuda" and torch.cuda.is_available()
    return {"cpu": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "device": kind,
            "gpu": torch.cuda.get_device_name(torch.device(str(device))) if cuda else None,
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "python": platform.python_version(), "torch": torch.__version__, "numpy": dist("numpy"),
            "monai": dist("monai"), "lightning": dist("lightning")}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or sys.platform


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
