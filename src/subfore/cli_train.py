"""Training commands, registered on the shared ``subfore`` app."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .cli import app


@app.command()
def pretrain(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config (see configs/pretrain/)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a key: --set masking.ratio=0.5"),
    resume: Optional[str] = typer.Option(
        None, "--resume", flag_value="last", help="continue RUN_DIR/checkpoints/last.ckpt, or --resume PATH"
    ),
) -> None:
    """Pretrain a backbone by masked image modelling (SubFore and friends)."""
    from .config import load_config
    from .pretrain import pretrain as run

    cfg = load_config(config, set_ or [])
    encoder = run(cfg, resume=resume)
    typer.echo(f"done: {encoder}")
