"""The ``subfore`` Typer app, its shared option parsers and the entry point (commands live beside this file).

The command line is a thin layer over the Python API (``subfore.api``).

User errors (bad files, bad config) print one line to stderr and exit 1, and so does every other exception (out of
memory names the settings that lower it; anything else is reported as a bug); Ctrl-C prints one line and exits 130;
``--debug`` shows the traceback.
A run stopped by SIGTERM/SIGUSR1 saves its checkpoint and exits 75 (``subfore.preempt.EXIT_PREEMPTED``).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from ..errors import SubforeError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="The ``subfore`` command line: a thin layer over the Python API."
)
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show full tracebacks for errors")) -> None:
    _state["debug"] = debug


def _floats(value: Optional[str], n: int, option: str) -> Optional[tuple[float, ...]]:
    """Parse '1.5,1.5,2' (or '1.5x1.5x2') into n floats."""
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        out = ()
    if len(out) != n:
        raise SubforeError(f"{option} takes {n} comma-separated numbers, got {value!r}")
    return out


def _preset(name: str, spacing: Optional[str] = None):
    from ..data.presets import make_preset

    sp = _floats(spacing, 3, "--spacing")
    return make_preset(name, **({"spacing": sp} if sp else {}))


def _threshold(value: str) -> float | str:
    if value == "otsu":
        return value
    try:
        return float(value)
    except ValueError:
        raise SubforeError(f"--threshold must be a number or 'otsu', got {value!r}") from None


def _resume(resume: bool, resume_from: Optional[Path], if_exists: bool):
    """The ``resume`` argument of pretrain()/finetune() for the three mutually exclusive flags."""
    if resume + (resume_from is not None) + if_exists > 1:
        raise SubforeError("give one of --resume, --resume-from PATH and --resume-if-exists")
    if resume_from is not None:
        return str(resume_from)
    return "last" if resume else ("auto" if if_exists else None)


def _device(device: str) -> str:
    from ..engine.run import device_for

    return device_for("cuda") if device == "auto" else device


def _label_map(text: Optional[str]) -> Optional[dict]:
    """--label-map '{5: 6, 7: 11}' (YAML or JSON) → {5: 6, 7: 11}."""
    if not text:
        return None
    import yaml

    try:
        mapping = yaml.safe_load(text)
        return {int(k): int(v) for k, v in mapping.items()}
    except (yaml.YAMLError, AttributeError, TypeError, ValueError):
        raise SubforeError(f"--label-map expects a mapping such as '{{5: 6, 7: 11}}', got {text!r}") from None


def _roi(roi: Optional[str]):
    return None if roi is None else tuple(int(v) for v in _floats(roi, 3, "--roi"))


class _Escaped(Exception):
    """An EOFError raised by a command, carried past Typer (which would print a bare 'Aborted.' for it)."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def keep_eof(command: Callable) -> Callable:
    """Wrap a command so that an EOFError from inside it (a truncated gzip file, say) reaches :func:`main`."""
    @functools.wraps(command)
    def wrapped(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except EOFError as exc:
            raise _Escaped(exc) from exc

    return wrapped


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: run the app, turning user errors into one line on stderr and exit code 1."""
    from .. import _quiet

    _quiet.apply()
    args = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in args
    try:
        _old_resume_form(args)
        app(args=argv)
    except (SubforeError, FileNotFoundError, ValueError, OSError) as exc:
        # ValueError/OSError reach here from argument checks in the API (bad ratio, unwritable --out, ...).
        if debug:
            raise
        code = getattr(exc, "exit_code", 1)
        typer.echo(f"{'stopped' if code != 1 else 'error'}: {_one_line(exc)}", err=True)
        sys.exit(code)
    except (KeyboardInterrupt, SystemExit) as exc:
        # Typer turns Ctrl-C into a silent exit 130; every other exit passes through as it is.
        if debug or (isinstance(exc, SystemExit) and exc.code != 130):
            raise
        # Every file is written under a temporary name and renamed when complete: nothing half-written remains.
        typer.echo("stopped: interrupted (Ctrl-C); files written so far are complete, a run resumes from its last "
                   "checkpoint with --resume", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the boundary: every exception leaves as one line
        if debug:
            raise
        exc = exc.original if isinstance(exc, _Escaped) else exc
        if _out_of_memory(exc):
            typer.echo(f"error: out of memory ({_one_line(exc)[:200]}); lower train.batch_size, data.roi or "
                       f"--sw-batch-size, or set model.checkpointing: true", err=True)
        elif _collective_timeout(exc):
            typer.echo(f"error: a rank waited longer than train.timeout_min for the others ({_one_line(exc)[:200]}); "
                       f"raise train.timeout_min if one rank's work (the probe, a save) is that long, else look for "
                       f"the rank that is slow or gone", err=True)
        else:
            typer.echo(f"error: internal error, a bug in subfore ({type(exc).__name__}: {_one_line(exc)[:300]}); "
                       f"rerun with --debug for the traceback and report it", err=True)
        sys.exit(1)


def _out_of_memory(exc: BaseException) -> bool:
    """CPU (MemoryError, an allocator's RuntimeError) or CUDA (torch.OutOfMemoryError) out of memory."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc).lower()
                                              or "can't allocate memory" in str(exc).lower())


def _collective_timeout(exc: BaseException) -> bool:
    """A collective that outlived the process group's timeout (gloo's 'Timed out waiting … for recv')."""
    return isinstance(exc, RuntimeError) and "timed out" in str(exc).lower() and (
        type(exc).__name__ == "DistBackendError" or "gloo" in str(exc).lower() or "recv" in str(exc).lower()
        or "collective" in str(exc).lower())


def _old_resume_form(args: list[str]) -> None:
    """``--resume PATH`` (an earlier form) → one line naming ``--resume-from`` instead of click's usage error."""
    for flag, value in zip(args, args[1:] + [""]):
        if flag == "--resume" and value and not value.startswith("-"):
            raise SubforeError(f"--resume takes no value (it continues RUN_DIR/checkpoints/last.ckpt); to continue "
                               f"from {value}, give --resume-from {value}")


def _one_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    # An error re-raised from a DataLoader worker carries the worker's traceback; its last line is the message.
    if "Original Traceback" in lines[0] and len(lines) > 1:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return lines[0]
