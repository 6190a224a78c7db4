"""Files a run writes: every write goes to a temporary file first and is renamed into place, so a reader (or a
resumed run) never sees a half-written file; plus the metrics.jsonl append/truncate pair.

Reading weights lives here too: :func:`load_torch` never runs code from a pickle (``weights_only=True``), and
safetensors files are read and written with their string metadata.

Imports nothing of subfore's beyond errors; torch, safetensors and matplotlib load only when called.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed.

    The temporary name (``.NAME.HOST-PID`` + ``suffix``) carries host and pid, so concurrent writers (ranks, nodes)
    never share one; a process killed mid-write leaves it behind, never ``path``. ``fsync`` flushes the data to disk
    before the rename (a store shared over NFS, a crash between write and rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}{suffix}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, fsync: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path, fsync) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 2, fsync: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent), fsync)


def write_with(path: str | Path, writer: Callable[[Path], Any], suffix: str = "") -> Path:
    """Atomically write ``path`` with ``writer(tmp)`` (torch.save, nib.save, fig.savefig, ...).

    suffix: appended to the temporary name, for writers that choose the format by extension (``.png``, ``.nii.gz``).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        target = tmp.with_name(tmp.name + suffix) if suffix else tmp
        try:
            writer(target)
            if suffix:
                os.replace(target, tmp)
        finally:
            if suffix:
                target.unlink(missing_ok=True)
    return path


def torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically."""
    import torch

    return write_with(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: str | Path, what: str = "checkpoint", safetensors: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, numbers, strings, lists and dicts only.

    A file whose pickle asks for anything else (a class, ``os.system``) is refused in one line naming the file and
    the global, before any of it runs; an unreadable file likewise. safetensors: the caller takes a ``.safetensors``
    file too (the messages then offer it).
    """
    import pickle

    import torch

    from .errors import SubforeError

    path = Path(path)
    if not path.is_file():
        raise SubforeError(f"{path}: no such {what}" + (" (a folder; give a file)" if path.is_dir() else ""))
    with open(path, "rb") as fh:
        head = fh.read(4)
    # torch.save writes a zip archive; older files are a bare pickle (protocol byte 0x80). Anything else is not a
    # weights file at all, whatever the pickle reader would say about its first byte.
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise SubforeError(f"{path}: not a weights file (neither a PyTorch zip archive nor a pickle); give a "
                           f"{what} written by torch.save" + (", or a .safetensors file" if safetensors else ""))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        asked = f"the global {found.group(1)}" if found else "an object that is not a tensor or plain data"
        raise SubforeError(
            f"{path}: refused, its pickle asks for {asked}, which could run code; subfore loads only tensors, "
            f"numbers, strings, lists and dicts (weights_only=True). If you trust the file, re-save its weights as a "
            f"plain state_dict (torch.save(model.state_dict(), 'weights.pt'))"
            + (" or as safetensors" if safetensors else "")) from None
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files fail in many ways
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise SubforeError(f"{path}: not a readable PyTorch {what} ({type(exc).__name__}: {first})") from None


def read_safetensors(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors on the CPU, the header's string metadata) of a ``.safetensors`` file; unreadable → one line."""
    from safetensors import safe_open

    from .errors import SubforeError

    path = Path(path)
    if not path.is_file():
        raise SubforeError(f"{path}: no such safetensors file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001
        raise SubforeError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def write_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (each its own contiguous storage) as safetensors atomically, with string metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return write_with(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def save_figure(fig, path: str | Path, **kwargs) -> Path:
    """Save a matplotlib figure atomically (PNG by the path's suffix) and close it."""
    import matplotlib.pyplot as plt

    try:
        return write_with(path, lambda tmp: fig.savefig(tmp, **kwargs), suffix=Path(path).suffix)
    finally:
        plt.close(fig)


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line (a single short write)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Every row of a JSON-lines file ([] when it does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def truncate_jsonl(path: str | Path, step: int) -> None:
    """Keep the rows of ``path`` up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    write_text(path, "".join(ln + "\n" for ln in keep))


def check_output(path: str | Path, kind: str = "file", option: str = "--out") -> Path:
    """Refuse an output path before any work is done: a folder where a file goes (or the reverse), a parent that is a
    file, or a place this process cannot write (tried with a file made and removed). kind: ``file`` or ``folder``."""
    from .errors import SubforeError

    path = Path(path)
    if kind == "file" and path.is_dir():
        raise SubforeError(f"{option} {path}: is a folder; name the file to write in it")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise SubforeError(f"{option} {path}: exists and is not a folder")
    existing = path if kind == "folder" else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SubforeError(f"{option} {path}: {existing} is a file, not a folder, so nothing can be written under it")
    # os.access passes root everywhere; a file made and removed again is the answer for read-only mounts too.
    try:
        fd, probe = tempfile.mkstemp(prefix=".subfore-write-check-", dir=existing)
    except OSError as exc:
        why = {errno.EACCES: "is not writable by this user", errno.EPERM: "is not writable by this user",
               errno.EROFS: "is on a read-only file system", errno.ENOSPC: "is on a full disk",
               errno.EDQUOT: "is over its disk quota"}.get(exc.errno, f"takes no new file ({exc.strerror})")
        raise SubforeError(f"{option} {path}: the folder {existing} {why}") from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)
    return path
