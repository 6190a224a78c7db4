"""The ``subfore`` command line: a thin layer over the Python API.

User errors (bad files, bad config) print one line to stderr and exit 1; ``--debug`` shows the traceback.
A run stopped by SIGTERM/SIGUSR1 saves its checkpoint and exits 75 (``subfore.preempt.EXIT_PREEMPTED``).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from .errors import SubforeError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__.splitlines()[0]
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
    from .data.presets import make_preset

    sp = _floats(spacing, 3, "--spacing")
    return make_preset(name, **({"spacing": sp} if sp else {}))


def _threshold(value: str) -> float | str:
    if value == "otsu":
        return value
    try:
        return float(value)
    except ValueError:
        raise SubforeError(f"--threshold must be a number or 'otsu', got {value!r}") from None


@app.command()
def phantoms(
    out_dir: Path = typer.Argument(..., help="folder to write imagesTr/, labelsTr/ and dataset.json into"),
    n: int = typer.Option(8, "--n", help="number of phantoms"),
    seed: int = typer.Option(0, "--seed", help="shapes and positions vary with the seed"),
    spacing: Optional[str] = typer.Option(None, "--spacing", help="voxel spacing in mm, e.g. 0.8,0.8,2.5"),
    orientation: str = typer.Option("RAS", "--orientation", help="RAS or LPS storage order"),
) -> None:
    """Write synthetic abdominal CT phantoms (HU, BTCV labels) as NIfTI with a decathlon dataset.json."""
    from .phantoms import PhantomSpec, write_phantoms

    sp = _floats(spacing, 3, "--spacing")
    spec = PhantomSpec(orientation=orientation, **({"spacing": sp} if sp else {}))
    path = write_phantoms(out_dir, n=n, seed=seed, spec=spec)
    typer.echo(f"wrote {n} phantoms and {path}")


@app.command("show-mask")
def show_mask_cmd(
    image: Path = typer.Argument(..., help="a NIfTI/NRRD file or a DICOM series folder"),
    out: Path = typer.Option(..., "--out", help="PNG to write"),
    strategy: str = typer.Option("foreground", "--strategy"),
    ratio: float = typer.Option(0.6, "--ratio"),
    threshold: str = typer.Option("0.1", "--threshold", help="λ in normalised units, or 'otsu'"),
    size: int = typer.Option(16, "--size", help="subvolume edge in voxels"),
    roi: int = typer.Option(96, "--roi", help="edge of the central crop in voxels"),
    seed: int = typer.Option(0, "--seed"),
    preset: str = typer.Option("ct", "--preset", help="ct or mri"),
    spacing: Optional[str] = typer.Option(None, "--spacing", help="resample to this spacing in mm (default 1.5,1.5,1.5)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write counts as JSON"),
) -> None:
    """Draw the foreground grid and the mask over three mid planes of a central crop."""
    from .data.datalist import load_datalist
    from .visualize import show_mask

    item = load_datalist(image)[0]
    stats = show_mask(
        item["image"], out, _preset(preset, spacing), strategy, ratio, _threshold(threshold), size, (roi,) * 3, seed,
        json_out,
    )
    typer.echo(
        f"{stats['masked']} of {stats['subvolumes']} subvolumes masked "
        f"({stats['foreground']} foreground, λ={stats['threshold']:.3f}) → {out}"
    )


@app.command()
def analyze(
    images: List[Path] = typer.Argument(..., help="one or more volumes"),
    out: Path = typer.Option(..., "--out", help="folder for intensity.png and analysis.json"),
    labels: Optional[List[Path]] = typer.Option(None, "--labels", help="one label file per image"),
    preset: str = typer.Option("ct", "--preset"),
    spacing: Optional[str] = typer.Option(None, "--spacing", help="resample to this spacing in mm"),
    threshold: float = typer.Option(0.1, "--threshold"),
    size: int = typer.Option(16, "--size"),
) -> None:
    """Histograms of organ vs background intensity and mean entropy per subvolume class."""
    from .data.datalist import load_datalist
    from .visualize import analyze as run

    files = [load_datalist(p)[0]["image"] for p in images]
    label_files = [load_datalist(p)[0]["image"] for p in labels] if labels else None
    result = run(files, out, _preset(preset, spacing), label_files, size, threshold)
    ent = result["mean_entropy_bits"]
    typer.echo(f"mean entropy (bits): foreground {ent['foreground']}, background {ent['background']} → {out}")


export_app = typer.Typer(no_args_is_help=True, help="Write pretrained weights for another framework.")
app.add_typer(export_app, name="export")


@export_app.command("nnunet")
def export_nnunet_cmd(
    run_dir: Path = typer.Argument(..., help="a 'subfore pretrain' run_dir (model.name resenc or resenc_l)"),
    out: Path = typer.Option(..., "--out", help="the .pth to write, for nnUNetv2_train -pretrained_weights"),
    plans: Optional[Path] = typer.Option(None, "--plans",
                                         help="the finetuning's plans JSON (default: the pretraining's)"),
    configuration: Optional[str] = typer.Option(None, "--configuration", help="configuration of --plans (3d_fullres)"),
    in_channels: Optional[int] = typer.Option(None, "--in-channels",
                                              help="channels of the finetuning data (stem repeated, divided by C)"),
) -> None:
    """Write {'network_weights': ...} that nnU-Net's load_pretrained_weights accepts, and check it loads."""
    from .nnunet import export_nnunet

    typer.echo(str(export_nnunet(run_dir, out, plans, configuration, in_channels)))


def _register_optional_commands() -> None:
    """Commands that live in heavier modules register themselves here (imported lazily)."""
    from . import cli_train  # noqa: F401


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: run the app, turning user errors into one line on stderr and exit code 1."""
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    logging.getLogger("monai").setLevel(logging.ERROR)
    _register_optional_commands()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        app(args=argv)
    except (SubforeError, FileNotFoundError, ValueError, OSError) as exc:
        # ValueError/OSError reach here from argument checks in the API (bad ratio, unwritable --out, ...).
        if debug:
            raise
        code = getattr(exc, "exit_code", 1)
        typer.echo(f"{'stopped' if code != 1 else 'error'}: {_one_line(exc)}", err=True)
        sys.exit(code)


def _one_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    # An error re-raised from a DataLoader worker carries the worker's traceback; its last line is the message.
    if "Original Traceback" in lines[0] and len(lines) > 1:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return lines[0]
