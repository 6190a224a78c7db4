"""Export commands: pretrained weights for another framework."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app

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
    from ..api import export_nnunet

    typer.echo(str(export_nnunet(run_dir, out, plans, configuration, in_channels)))
