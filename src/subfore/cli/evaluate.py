"""Scoring commands: evaluate, predict, probe."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import SubforeError
from .app import _device, _label_map, _roi, app


@app.command()
def evaluate(
    checkpoint: Optional[List[Path]] = typer.Option(None, "--checkpoint", help="'subfore finetune' checkpoint(s); "
                                                    "several → one table row each"),
    predictions: Optional[List[Path]] = typer.Option(None, "--predictions", help="folder(s) of label files written by "
                                                     "any tool (CASE.nii.gz or CASE_seg.nii.gz), instead of "
                                                     "--checkpoint; several → one table row each"),
    data: List[str] = typer.Option(..., "--data", help="labelled datalist (dataset.json, nnU-Net folder, ...)"),
    out: Path = typer.Option(Path("metrics.json"), "--out"),
    split: str = typer.Option("validation", "--split"),
    tolerance: float = typer.Option(2.0, "--tolerance", help="NSD tolerance in mm"),
    hd95: bool = typer.Option(False, "--hd95", help="also report the 95th-percentile Hausdorff distance (mm); a "
                              "missed or spurious class scores the image diagonal"),
    grid: str = typer.Option("label", "--grid", help="label: score on each ground truth's own grid (as nnU-Net); "
                             "resampled: on the training spacing (faster, approximate; --checkpoint only)"),
    roi: Optional[str] = typer.Option(None, "--roi", help="sliding-window size, e.g. 96,96,96"),
    overlap: Optional[float] = typer.Option(None, "--overlap"),
    sw_batch_size: Optional[int] = typer.Option(None, "--sw-batch-size"),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("auto", "--precision", help="auto (the run's train.precision on this device: "
                                  "bf16 on a GPU that has it, 32 on the CPU), 32, bf16 or fp16 (autocast)"),
    label_map: Optional[str] = typer.Option(None, "--label-map", help="YAML/JSON {src: dst} for this data's labels"),
    prediction_label_map: Optional[str] = typer.Option(None, "--prediction-label-map", help="YAML/JSON {src: dst} "
                                                       "for the --predictions files' ids (default: as written)"),
    method: Optional[List[str]] = typer.Option(None, "--method", help="row name per checkpoint or predictions "
                                               "folder (default: run dir or folder name)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar and no line per case"),
) -> None:
    """Per-case and mean Dice and NSD per class; metrics.json, a Markdown table and a bar chart."""
    checkpoints, folders = list(checkpoint or []), list(predictions or [])
    if checkpoints and folders:
        raise SubforeError("--checkpoint and --predictions exclude each other: score a network or label files")
    if not checkpoints and not folders:
        raise SubforeError("give --checkpoint (a finetuned network) or --predictions (a folder of label files)")
    if folders:
        network_only = {"--grid": grid != "label", "--roi": roi is not None, "--overlap": overlap is not None,
                        "--sw-batch-size": sw_batch_size is not None}
        given = [k for k, v in network_only.items() if v]
        if given:
            raise SubforeError(f"{given[0]} applies to --checkpoint only; --predictions are scored on each label's "
                               f"own grid")
    elif prediction_label_map:
        raise SubforeError("--prediction-label-map applies to --predictions only; a checkpoint predicts its own "
                           "training ids")
    mapping = _label_map(label_map)
    try:
        pred_mapping = _label_map(prediction_label_map)
    except SubforeError as exc:  # the parser names --label-map
        raise SubforeError(str(exc).replace("--label-map", "--prediction-label-map")) from None
    sources = checkpoints or folders
    methods = list(method or [])
    if methods and len(methods) != len(sources):
        what = "checkpoints" if checkpoints else "predictions folders"
        raise SubforeError(f"--method given {len(methods)} times for {len(sources)} {what}")
    if len(checkpoints) > 1:  # a bad second checkpoint stops the command before the first one is scored
        from ..inference import check_window, load_finetuned

        for source in checkpoints:
            check_window(load_finetuned(source)[0], _roi(roi))
    results = []
    for i, source in enumerate(sources):
        # One source writes OUT itself; several write OUT.<i>.json each and a shared table.
        target = out if len(sources) == 1 else out.with_name(f"{out.stem}.{i}{out.suffix}")
        name = methods[i] if methods else None
        if checkpoints:
            from ..api import evaluate as run

            result = run(source, list(data), target, split, tolerance, hd95, _roi(roi), overlap, sw_batch_size,
                         _device(device), precision, name, mapping, grid, progress=not quiet)
        else:
            from ..api import evaluate_predictions

            result = evaluate_predictions(source, list(data), target, split, tolerance, hd95, name, mapping,
                                          pred_mapping, progress=not quiet)
        results.append(result)
        m = result["mean"]
        typer.echo(f"{result['method']}: {len(result['cases'])} cases, mean Dice {m['mean_dice']}, "
                   f"mean NSD {m['mean_nsd']} → {target} (per case; {target.with_suffix('.md')} and "
                   f"{target.with_suffix('.png')} beside it)")
        moved = [c["case"] for c in result["cases"] if c.get("resampled")]
        if moved:
            typer.echo(f"  {len(moved)} prediction(s) resampled onto their label's grid (nearest neighbour; the "
                       f"files' affines differ): {', '.join(moved[:5])}{' …' if len(moved) > 5 else ''}")
    if len(results) > 1:
        from ..report import plot_bars, write_table

        write_table(results, out.with_suffix(".md"))
        plot_bars(results, out.with_suffix(".png"))
        typer.echo(f"table of {len(results)} methods → {out.with_suffix('.md')}")


@app.command()
def predict(
    inputs: List[Path] = typer.Argument(..., help="images, folders or DICOM series folders"),
    checkpoint: Path = typer.Option(..., "--checkpoint"),
    out: Path = typer.Option(..., "--out", help="folder for CASE_seg.nii.gz and CASE_overlay.png (two inputs of "
                             "one CASE name are refused before any inference)"),
    roi: Optional[str] = typer.Option(None, "--roi"),
    overlap: Optional[float] = typer.Option(None, "--overlap"),
    sw_batch_size: Optional[int] = typer.Option(None, "--sw-batch-size"),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("auto", "--precision", help="auto (the run's train.precision on this device: "
                                  "bf16 on a GPU that has it, 32 on the CPU), 32, bf16 or fp16 (autocast)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar and no line per case"),
) -> None:
    """Segment images; labels are written on each input's own grid (shape, affine, orientation).

    An input that fails does not stop the others; the command then exits 1 naming each failed input."""
    from ..api import predict as run

    paths = run(checkpoint, [str(p) for p in inputs], out, _roi(roi), overlap, sw_batch_size, _device(device), precision,
                progress=not quiet)
    typer.echo(f"wrote {len(paths)} label files (CASE_seg.nii.gz, with CASE_overlay.png) to {out}")


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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar and no line per case"),
) -> None:
    """Linear probe of a frozen pretrained network vs the same network at random init (per-class Dice)."""
    from pydantic import ValidationError

    from ..api import ProbeSettings, probe as run
    from ..probe import markdown_line

    try:
        settings = ProbeSettings(data=data if len(data) > 1 else data[0], split=split, test_split=test_split,
                                 label_map=_label_map(label_map), steps=steps, seed=seed)
    except ValidationError as err:
        e = err.errors()[0]
        raise SubforeError(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']} (got {e.get('input')!r})") from None
    result = run(encoder, settings, out, _device(device), progress=not quiet)
    typer.echo(f"{markdown_line(result)} → {out} ({out.with_suffix('.md')} and {out.with_suffix('.png')} beside it)")
