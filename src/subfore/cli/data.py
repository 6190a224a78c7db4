"""Data commands: phantoms, show-mask, analyze, preprocess, fingerprint."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import SubforeError
from .app import _floats, _preset, _threshold, app


@app.command()
def phantoms(
    out_dir: Path = typer.Argument(..., help="folder to write imagesTr/, labelsTr/ and dataset.json into"),
    n: int = typer.Option(8, "--n", help="number of phantoms"),
    seed: int = typer.Option(0, "--seed", help="shapes and positions vary with the seed"),
    spacing: Optional[str] = typer.Option(None, "--spacing", help="voxel spacing in mm, e.g. 0.8,0.8,2.5"),
    orientation: str = typer.Option("RAS", "--orientation", help="RAS or LPS storage order"),
) -> None:
    """Write synthetic abdominal CT phantoms (HU, BTCV labels) as NIfTI with a decathlon dataset.json."""
    from ..phantoms import PhantomSpec, write_phantoms

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
    from ..data.datalist import load_datalist
    from ..visualize import show_mask

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
    from ..data.datalist import load_datalist
    from ..visualize import analyze as run

    files = [load_datalist(p)[0]["image"] for p in images]
    label_files = [load_datalist(p)[0]["image"] for p in labels] if labels else None
    result = run(files, out, _preset(preset, spacing), label_files, size, threshold)
    ent = result["mean_entropy_bits"]
    typer.echo(f"mean entropy (bits): foreground {ent['foreground']}, background {ent['background']} → {out}")


@app.command()
def preprocess(
    config: Path = typer.Option(..., "--config", "-c", help="the pretraining config: data, preset, ROI, λ"),
    workers: int = typer.Option(1, "--workers", min=1, help="worker processes"),
    shard: str = typer.Option("0/1", "--shard", help="K/N: volumes K, K+N, … (SLURM array task K of N, 0-based)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="list unreadable files under 'failed' and go on"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a key: --set data.store_dtype=float32"),
) -> None:
    """Preprocess data.train and data.val once into the chunked crop store under data.cache_dir (resumable)."""
    from ..api import load_config
    from ..data.store import preprocess_config

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


@app.command()
def fingerprint(
    datalist: List[str] = typer.Argument(..., help="the pretraining data (dataset.json, folder, glob, ...)"),
    config: Path = typer.Option(..., "--config", "-c", help="the pretraining config: its preset, ROI, λ, ρ, size"),
    out: Path = typer.Option(..., "--out", help="folder for fingerprint.json and foreground_share.png"),
    crops: int = typer.Option(64, "--crops", help="random training crops to sample"),
    seed: int = typer.Option(0, "--seed"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a key: --set masking.threshold=0.2"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar and no line per volume"),
) -> None:
    """Foreground share of random training crops: will foreground masks differ from random ones on this data?"""
    from ..api import fingerprint as run, load_config
    from ..fingerprint import summary_line

    cfg = load_config(config, set_ or [])
    result = run(datalist if len(datalist) > 1 else datalist[0], cfg, out, crops, seed, progress=not quiet)
    typer.echo(f"{summary_line(result)} → {out}/fingerprint.json, {out}/foreground_share.png")
