"""Peak memory and wall time of scoring one clinical-size case: ``subfore evaluate --predictions`` beside nnU-Net's
``compute_metrics_on_folder`` on the same two files, each as its own process, measured by ``/usr/bin/time -v``.

    python benchmarks/evaluate_memory.py [--shape 512,512,200] [--classes 13] [--shift 2] [--out /tmp/evalmem]

The case: a 512×512×200 CT-sized label map at 0.78×0.78×2.5 mm with 13 organ-like ellipsoids, and its
prediction, the same map shifted by 2 voxels along every axis (NIfTI, uint8). subfore scores Dice + NSD (and, in
a second run, HD95 too); nnU-Net scores Dice (and IoU, counts) only, with one worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

NNUNET = """
import sys
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
compute_metrics_on_folder(sys.argv[1], sys.argv[2], sys.argv[3], SimpleITKIO(), ".nii.gz",
                          list(range(1, int(sys.argv[4]))), num_processes=1)
"""


def write_case(out: Path, shape: tuple[int, int, int], classes: int, shift: int) -> Path:
    """labelsTr/case_000.nii.gz, pred/case_000.nii.gz (shifted) and a dataset.json under ``out``."""
    rng = np.random.default_rng(0)
    spacing = (0.78, 0.78, 2.5)
    label = np.zeros(shape, np.uint8)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    for c in range(1, classes):
        centre = [rng.uniform(0.25, 0.75) * n for n in shape]
        radii_mm = rng.uniform(12, 45, size=3)
        inside = sum(((g - m) * s / r) ** 2 for g, m, s, r in zip(grid, centre, spacing, radii_mm)) <= 1
        label[inside] = c
    pred = np.roll(label, shift=(shift, shift, shift), axis=(0, 1, 2))
    affine = np.diag([*spacing, 1.0])
    for folder, array in (("labelsTr", label), ("pred", pred)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, affine), out / folder / "case_000.nii.gz")
    (out / "imagesTr").mkdir(exist_ok=True)  # --predictions reads no image; the datalist names one that exists
    (out / "imagesTr" / "case_000.nii.gz").write_bytes((out / "labelsTr" / "case_000.nii.gz").read_bytes())
    (out / "dataset.json").write_text(json.dumps({
        "labels": {"background": 0, **{f"organ_{c}": c for c in range(1, classes)}},
        "training": [{"image": "imagesTr/case_000.nii.gz", "label": "labelsTr/case_000.nii.gz"}]}))
    return out


def measured(command: list[str]) -> tuple[float, float, str]:
    """(peak RSS GB, wall s, the command's last output line) of one process under /usr/bin/time -v."""
    proc = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    return rss_kb / 1e6, seconds, (proc.stdout.strip().splitlines() or [""])[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="512,512,200")
    p.add_argument("--classes", type=int, default=14, help="label ids 0…N−1 (14: 13 organs and background)")
    p.add_argument("--shift", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("/tmp/subfore_evaluate_memory"))
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    root = write_case(args.out, shape, args.classes, args.shift)
    subfore = str(Path(sys.executable).parent / "subfore")
    runs = [
        ("subfore evaluate --predictions (Dice + NSD)",
         [subfore, "evaluate", "--predictions", str(root / "pred"), "--data", str(root / "dataset.json"),
          "--split", "training", "--out", str(root / "m.json")]),
        ("subfore evaluate --predictions --hd95 (Dice + NSD + HD95)",
         [subfore, "evaluate", "--predictions", str(root / "pred"), "--data", str(root / "dataset.json"),
          "--split", "training", "--out", str(root / "m_hd.json"), "--hd95"]),
        ("nnU-Net compute_metrics_on_folder (Dice only, 1 process)",
         [sys.executable, "-c", NNUNET, str(root / "labelsTr"), str(root / "pred"), str(root / "nnunet.json"),
          str(args.classes)]),
    ]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# one case {shape[0]}×{shape[1]}×{shape[2]} at 0.78×0.78×2.5 mm, {args.classes - 1} classes, prediction "
          f"shifted by {args.shift} voxels; {cpu}, {os.cpu_count()} cores")
    print("| tool | peak RSS (GB) | wall (s) |")
    print("|---|---|---|")
    figures = {}
    for name, command in runs:
        rss, wall, _ = measured(command)
        figures[name] = (rss, wall)
        print(f"| {name} | {rss:.2f} | {wall:.1f} |")
    ours, hd, theirs = figures.values()
    print(f"\nratios to nnU-Net: Dice+NSD peak RSS {ours[0] / theirs[0]:.2f}×, wall {ours[1] / theirs[1]:.2f}×; "
          f"with HD95 peak RSS {hd[0] / theirs[0]:.2f}×, wall {hd[1] / theirs[1]:.2f}×")
    mean = json.loads((root / "m.json").read_text())["mean"]
    print(f"subfore mean Dice {mean['mean_dice']}, mean NSD {mean['mean_nsd']}")


if __name__ == "__main__":
    main()
