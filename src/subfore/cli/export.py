"""Export commands: pretrained weights for another framework."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app

export_app = typer.Typer(no_args_is_help=True, help="Write pretrained weights for nnU-Net, nnssl or publishing.")
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


@export_app.command("nnssl")
def export_nnssl_cmd(
    run_dir: Path = typer.Argument(..., help="a 'subfore pretrain' run_dir (model.name resenc or resenc_l)"),
    out: Path = typer.Option(..., "--out", help="the .pth to write, for nnUNetv2_preprocess_like_nnssl -pc"),
) -> None:
    """Write an nnssl checkpoint (nnU-Net main's PretrainedTrainer route) and check it loads as nnU-Net loads it."""
    from ..api import export_nnssl

    typer.echo(str(export_nnssl(run_dir, out)))


@export_app.command("hub")
def export_hub_cmd(
    run_dir: Path = typer.Argument(..., help="a 'subfore pretrain' run_dir"),
    out: Path = typer.Option(..., "--out", help="the model folder to write (model.safetensors, config.json, README.md)"),
) -> None:
    """Write a model folder to publish (the Hugging Face Hub layout); nothing is uploaded."""
    from ..api import export_hub

    path = export_hub(run_dir, out)
    typer.echo(f"wrote {path}/model.safetensors, config.json, README.md (publish: huggingface-cli upload USER/NAME "
               f"{path})")
