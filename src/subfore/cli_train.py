"""Training commands, registered on the shared ``subfore`` app."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .cli import app
from .preempt import STOP


@app.command()
def pretrain(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config (see configs/pretrain/)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a key: --set masking.ratio=0.5"),
    resume: bool = typer.Option(False, "--resume", help="continue RUN_DIR/checkpoints/last.ckpt"),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="continue from this checkpoint"),
    resume_if_exists: bool = typer.Option(False, "--resume-if-exists",
                                          help="continue last.ckpt when there is one, else start (job scripts)"),
) -> None:
    """Pretrain a backbone by masked image modelling (SubFore and friends).

    Exit status: 0 done, 1 bad input, 75 stopped by SIGTERM/SIGUSR1 after saving last.ckpt (rerun with --resume).
    """
    STOP.install()  # before torch loads: a preemption signal from now on is noted, not fatal
    from .config import load_config
    from .pretrain import pretrain as run

    cfg = load_config(config, set_ or [])
    encoder = run(cfg, resume=_resume(resume, resume_from, resume_if_exists))
    typer.echo(f"done: {encoder}")


@app.command()
def finetune(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config (see configs/finetune/)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a key: --set train.max_steps=500"),
    pretrained: Optional[Path] = typer.Option(None, "--pretrained", help="RUN_DIR/encoder.pt or any checkpoint"),
    resume: bool = typer.Option(False, "--resume", help="continue RUN_DIR/checkpoints/last.ckpt"),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="continue from this checkpoint"),
    resume_if_exists: bool = typer.Option(False, "--resume-if-exists",
                                          help="continue last.ckpt when there is one, else start (job scripts)"),
) -> None:
    """Finetune a segmentation network (optionally from pretrained weights).

    Exit status: 0 done, 1 bad input, 75 stopped by SIGTERM/SIGUSR1 after saving last.ckpt (rerun with --resume).
    """
    STOP.install()  # before torch loads: a preemption signal from now on is noted, not fatal
    from .config import load_config
    from .finetune import FinetuneConfig
    from .finetune import finetune as run

    cfg = load_config(config, set_ or [], FinetuneConfig)
    best = run(cfg, pretrained=pretrained, resume=_resume(resume, resume_from, resume_if_exists))
    typer.echo(f"done: {best}")


def _resume(resume: bool, resume_from: Optional[Path], if_exists: bool):
    """The ``resume`` argument of pretrain()/finetune() for the three mutually exclusive flags."""
    from .errors import SubforeError

    if resume + (resume_from is not None) + if_exists > 1:
        raise SubforeError("give one of --resume, --resume-from PATH and --resume-if-exists")
    if resume_from is not None:
        return str(resume_from)
    return "last" if resume else ("auto" if if_exists else None)


def _device(device: str) -> str:
    from .engine import device_for

    return device_for("cuda") if device == "auto" else device


def _label_map(text: Optional[str]) -> Optional[dict]:
    """--label-map '{5: 6, 7: 11}' (YAML or JSON) → {5: 6, 7: 11}."""
    if not text:
        return None
    import yaml

    from .errors import SubforeError

    try:
        mapping = yaml.safe_load(text)
        return {int(k): int(v) for k, v in mapping.items()}
    except (yaml.YAMLError, AttributeError, TypeError, ValueError):
        raise SubforeError(f"--label-map expects a mapping such as '{{5: 6, 7: 11}}', got {text!r}") from None


@app.command()
def probe(
    encoder: Path = typer.Option(..., "--encoder", help="RUN_DIR/encoder.pt (its encoder.json names the architecture)"),
    data: List[str] = typer.Option(..., "--data", help="labelled datalist (dataset.json, nnU-Net folder, ...)"),
    split: str = typer.Option("training", "--split", help="the cases that train the linear head"),
    test_split: str = typer.Option("validation", "--test-split", help="the held-out cases that are scored"),
    label_map: Optional[str] = typer.Option(None, "--label-map", help="YAML/JSON {src: dst}; others → background"),
    steps: int = typer.Option(300, "--steps", help="optimiser steps of the linear head"),
    seed: int = typer.Option(0, "--seed", help="the probe's seed (head init, voxel draws, baseline init)"),
    out: Path = typer.Option(Path("probe.json"), "--out", help="probe.json; probe.md and probe.png beside it"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Linear probe of a frozen pretrained network vs the same network at random init (per-class Dice)."""
    from .probe import ProbeSettings, markdown_line, probe_encoder

    from pydantic import ValidationError

    from .errors import SubforeError

    try:
        settings = ProbeSettings(data=data if len(data) > 1 else data[0], split=split, test_split=test_split,
                                 label_map=_label_map(label_map), steps=steps, seed=seed)
    except ValidationError as err:
        e = err.errors()[0]
        raise SubforeError(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']} (got {e.get('input')!r})") from None
    result = probe_encoder(encoder, settings, out, _device(device))
    typer.echo(f"{markdown_line(result)} → {out}")


@app.command()
def fingerprint(
    datalist: List[str] = typer.Argument(..., help="the pretraining data (dataset.json, folder, glob, ...)"),
    config: Path = typer.Option(..., "--config", "-c", help="the pretraining config: its preset, ROI, λ, ρ, size"),
    out: Path = typer.Option(..., "--out", help="folder for fingerprint.json and foreground_share.png"),
    crops: int = typer.Option(64, "--crops", help="random training crops to sample"),
    seed: int = typer.Option(0, "--seed"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a key: --set masking.threshold=0.2"),
) -> None:
    """Foreground share of random training crops: will foreground masks differ from random ones on this data?"""
    from .config import load_config
    from .fingerprint import fingerprint as run
    from .fingerprint import summary_line

    cfg = load_config(config, set_ or [])
    result = run(datalist if len(datalist) > 1 else datalist[0], cfg, out, crops, seed)
    typer.echo(f"{summary_line(result)} → {out}/fingerprint.json")


@app.command()
def preprocess(
    config: Path = typer.Option(..., "--config", "-c", help="the pretraining config: data, preset, ROI, λ"),
    workers: int = typer.Option(1, "--workers", min=1, help="worker processes"),
    shard: str = typer.Option("0/1", "--shard", help="K/N: volumes K, K+N, … (SLURM array task K of N, 0-based)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="list unreadable files under 'failed' and go on"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a key: --set data.store_dtype=float32"),
) -> None:
    """Preprocess data.train and data.val once into the chunked crop store under data.cache_dir (resumable)."""
    from .config import load_config
    from .data.store import preprocess_config
    from .errors import SubforeError

    try:
        k, n = (int(v) for v in shard.split("/"))
    except ValueError:
        raise SubforeError(f"--shard takes K/N (e.g. 0/4), got {shard!r}") from None
    cfg = load_config(config, set_ or [])
    spec, c = preprocess_config(cfg, workers=workers, shard=(k, n), skip_bad=skip_bad or None,
                                progress=True)
    busy = f", being built by another process {c['busy']}" if c["busy"] else ""
    typer.echo(f"shard {k}/{n}: built {c['built']}, already there {c['skipped']}, failed {c['failed']}{busy}; "
               f"the store holds {c['volumes']} of the {c['listed']} volumes listed ({c['failed_total']} failed) → "
               f"{spec.root}/manifest.json")


def _roi(roi: Optional[str]):
    from .cli import _floats

    return None if roi is None else tuple(int(v) for v in _floats(roi, 3, "--roi"))


@app.command()
def evaluate(
    checkpoint: List[Path] = typer.Option(..., "--checkpoint", help="'subfore finetune' checkpoint(s); several → one table row each"),
    data: List[str] = typer.Option(..., "--data", help="labelled datalist (dataset.json, nnU-Net folder, ...)"),
    out: Path = typer.Option(Path("metrics.json"), "--out"),
    split: str = typer.Option("validation", "--split"),
    tolerance: float = typer.Option(2.0, "--tolerance", help="NSD tolerance in mm"),
    hd95: bool = typer.Option(False, "--hd95", help="also report the 95th-percentile Hausdorff distance (mm); a "
                              "missed or spurious class scores the image diagonal"),
    grid: str = typer.Option("label", "--grid", help="label: score on each ground truth's own grid (as nnU-Net); "
                             "resampled: on the training spacing (faster, approximate)"),
    roi: Optional[str] = typer.Option(None, "--roi", help="sliding-window size, e.g. 96,96,96"),
    overlap: Optional[float] = typer.Option(None, "--overlap"),
    sw_batch_size: Optional[int] = typer.Option(None, "--sw-batch-size"),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("32", "--precision", help="32, bf16 or fp16 (autocast, for GPU inference)"),
    label_map: Optional[str] = typer.Option(None, "--label-map", help="YAML/JSON {src: dst} for this data's labels"),
    method: Optional[List[str]] = typer.Option(None, "--method", help="row name per checkpoint (default: run dir name)"),
) -> None:
    """Per-case and mean Dice and NSD per class; metrics.json, a Markdown table and a bar chart."""
    from .evaluate import evaluate as run

    from .errors import SubforeError

    mapping = _label_map(label_map)
    from .evaluate import plot_bars, write_table

    methods = list(method or [])
    if methods and len(methods) != len(checkpoint):
        raise SubforeError(f"--method given {len(methods)} times for {len(checkpoint)} checkpoints")
    results = []
    for i, ckpt in enumerate(checkpoint):
        # One checkpoint writes OUT itself; several write OUT.<method>.json each and a shared table.
        target = out if len(checkpoint) == 1 else out.with_name(f"{out.stem}.{i}{out.suffix}")
        result = run(ckpt, list(data), target, split, tolerance, hd95, _roi(roi), overlap, sw_batch_size,
                     _device(device), precision, methods[i] if methods else None, mapping, grid)
        results.append(result)
        m = result["mean"]
        typer.echo(f"{result['method']}: {len(result['cases'])} cases, mean Dice {m['mean_dice']}, "
                   f"mean NSD {m['mean_nsd']} → {target}")
    if len(results) > 1:
        write_table(results, out.with_suffix(".md"))
        plot_bars(results, out.with_suffix(".png"))
        typer.echo(f"table of {len(results)} methods → {out.with_suffix('.md')}")


@app.command()
def predict(
    inputs: List[Path] = typer.Argument(..., help="images, folders or DICOM series folders"),
    checkpoint: Path = typer.Option(..., "--checkpoint"),
    out: Path = typer.Option(..., "--out", help="folder for CASE_seg.nii.gz and CASE_overlay.png"),
    roi: Optional[str] = typer.Option(None, "--roi"),
    overlap: Optional[float] = typer.Option(None, "--overlap"),
    sw_batch_size: Optional[int] = typer.Option(None, "--sw-batch-size"),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("32", "--precision", help="32, bf16 or fp16 (autocast, for GPU inference)"),
) -> None:
    """Segment images; labels are written on each input's own grid (shape, affine, orientation)."""
    from .evaluate import predict as run

    paths = run(checkpoint, [str(p) for p in inputs], out, _roi(roi), overlap, sw_batch_size, _device(device), precision)
    typer.echo(f"wrote {len(paths)} label files to {out}")


@app.command()
def study(
    config: Path = typer.Option(..., "--config", "-c", help="YAML study config (see configs/study/)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a key: --set study.seeds=[0]"),
    check: bool = typer.Option(False, "--check", help="resolve the protocol (which case plays which role) and exit; "
                               "fails when a test case also trains or selects the checkpoint"),
) -> None:
    """Pretrain, finetune and score every masking arm over seeds; resumable (finished arms are skipped)."""
    STOP.install()  # before torch loads: a preemption signal from now on is noted, not fatal
    from .config import load_config
    from .study import StudyConfig, check_protocol, describe_protocol
    from .study import study as run

    cfg = load_config(config, set_ or [], StudyConfig)
    if check:
        for line in describe_protocol(check_protocol(cfg)):
            typer.echo(line)
        typer.echo(f"{config}: protocol ok")
        return
    out = run(cfg)
    typer.echo(f"done: {out}/results.md, results.json, dice.png, curves.png")
