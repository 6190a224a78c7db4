"""Training commands: pretrain, finetune, study."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import ConfigError
from ..preempt import STOP
from .app import _resume, app

# The three ways to continue a run (give at most one), shared by the training commands.
RESUME = typer.Option(False, "--resume", help="continue RUN_DIR/checkpoints/last.ckpt")
RESUME_FROM = typer.Option(None, "--resume-from", help="continue from this checkpoint")
RESUME_IF_EXISTS = typer.Option(False, "--resume-if-exists",
                                help="continue last.ckpt when there is one, else start (job scripts)")


@app.command()
def pretrain(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config (see configs/pretrain/)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a key: --set masking.ratio=0.5"),
    resume: bool = RESUME,
    resume_from: Optional[Path] = RESUME_FROM,
    resume_if_exists: bool = RESUME_IF_EXISTS,
    init_from: Optional[Path] = typer.Option(
        None, "--init-from", help="start from these weights (step 0, fresh optimiser): a subfore run or model "
        "folder, an nnssl checkpoint (e.g. OpenMind ResEnc-L), nnU-Net or other weights; ignored when resuming"),
) -> None:
    """Pretrain a backbone by masked image modelling (SubFore and friends).

    Exit status: 0 done, 1 bad input, 75 stopped by SIGTERM/SIGUSR1 after saving last.ckpt (rerun with --resume).
    """
    STOP.install()  # before torch loads: a preemption signal from now on is noted, not fatal
    from ..api import load_config, pretrain as run

    cfg = load_config(config, (set_ or []) + ([f"init_from={init_from}"] if init_from else []))
    encoder = run(cfg, resume=_resume(resume, resume_from, resume_if_exists))
    typer.echo(f"done: {encoder}")


@app.command()
def finetune(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config (see configs/finetune/)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a key: --set train.max_steps=500"),
    pretrained: Optional[Path] = typer.Option(None, "--pretrained", help="RUN_DIR/encoder.pt (or .safetensors), a "
                                              "model folder, an nnssl or nnU-Net checkpoint, any state_dict"),
    resume: bool = RESUME,
    resume_from: Optional[Path] = RESUME_FROM,
    resume_if_exists: bool = RESUME_IF_EXISTS,
) -> None:
    """Finetune a segmentation network (optionally from pretrained weights).

    Exit status: 0 done, 1 bad input, 75 stopped by SIGTERM/SIGUSR1 after saving last.ckpt (rerun with --resume).
    """
    STOP.install()  # before torch loads: a preemption signal from now on is noted, not fatal
    from ..api import FinetuneConfig, load_config, finetune as run

    cfg = load_config(config, set_ or [], FinetuneConfig)
    best = run(cfg, pretrained=pretrained, resume=_resume(resume, resume_from, resume_if_exists))
    typer.echo(f"done: {best}")


@app.command()
def study(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML study config (see configs/study/)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a key: --set study.seeds=[0]"),
    check: bool = typer.Option(False, "--check", help="resolve the protocol (which case plays which role) and exit; "
                               "fails when a test case also trains or selects the checkpoint"),
    reproduce: Optional[Path] = typer.Option(None, "--reproduce", help="a study's results.json: rerun one of its runs "
                                             "(--arm, --seed) from the config it records (with --set overrides) "
                                             "and compare every number: exactly on the platform that recorded "
                                             "it, against the arm's seed spread on another"),
    arm: Optional[str] = typer.Option(None, "--arm", help="with --reproduce: the arm"),
    seed: Optional[int] = typer.Option(None, "--seed", help="with --reproduce: the seed"),
    labels: Optional[int] = typer.Option(None, "--labels", help="with --reproduce: the number of labelled cases "
                                         "(studies with label_fractions)"),
    out: Optional[Path] = typer.Option(None, "--out", help="with --reproduce: a new directory for the rerun "
                                       "(default runs/reproduce/ARM_seedS)"),
) -> None:
    """Pretrain, finetune and score every masking arm over seeds; resumable (finished arms are skipped).

    With --reproduce RESULTS.json --arm A --seed S: rerun that one run and say, number by number, whether it matches
    (exit 1 when any differs); on another platform than the one that recorded it, whether each difference lies within
    the arm's seed spread (exit 1 when one lies outside).
    """
    STOP.install()  # before torch loads: a preemption signal from now on is noted, not fatal
    from ..api import StudyConfig, load_config, study as run
    from ..study import check_protocol, describe_protocol

    if reproduce is not None:
        from ..study import reproduce as rerun

        if arm is None or seed is None:
            raise ConfigError("--reproduce needs --arm and --seed (the run to rerun)")
        cfg = load_config(config, set_ or [], StudyConfig) if config else None
        report = rerun(reproduce, arm, seed, labels, out, cfg, overrides=None if config else set_)
        for line in report["lines"]:
            typer.echo(line)
        if not report["passed"]:
            raise typer.Exit(1)
        return
    if config is None:
        raise ConfigError("give --config (a study config), or --reproduce RESULTS.json --arm A --seed S")
    given = [name for name, v in (("--arm", arm), ("--seed", seed), ("--labels", labels), ("--out", out)) if v is not None]
    if given:
        raise ConfigError(f"{' and '.join(given)}: only with --reproduce RESULTS.json")
    cfg = load_config(config, set_ or [], StudyConfig)
    if check:
        for line in describe_protocol(check_protocol(cfg)):
            typer.echo(line)
        typer.echo(f"{config}: protocol ok")
        return
    out_dir = run(cfg)
    typer.echo(f"done: {out_dir}/results.md, results.json, dice.png, curves.png")
