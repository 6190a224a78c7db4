"""Peak memory and wall time of one clinical-size case: ``subfore evaluate --predictions`` beside nnU-Net's
``compute_metrics_on_folder`` on the same two files, and ``subfore predict`` / ``subfore evaluate --checkpoint`` of
a small finetuned network on the same case, each as its own process, measured by ``/usr/bin/time -v``.

    python benchmarks/evaluate_memory.py [--shape 512,512,200] [--classes 14] [--shift 2] [--out /tmp/evalmem]
                                         [--checkpoint CKPT] [--no-checkpoint]

The case: a 512×512×200 CT-sized label map at 0.78×0.78×2.5 mm with 13 organ-like ellipsoids, and its
prediction, the same map shifted by 2 voxels along every axis (NIfTI, uint8), and a CT-like image of it (int16 HU:
air outside a body cylinder, soft tissue inside, a mean per organ, Gaussian noise; same affine). subfore scores
Dice + NSD (and, in a second run, HD95 too); nnU-Net scores Dice (and IoU, counts) only, with one worker.

The checkpoint rows run the network on CPU with its config's preprocessing (configs/finetune/demo_cpu.yaml: preset
ct, 1.5×1.5×2 mm, 64³ windows, overlap 0.5, sw batch 4; SwinUNETR v2, feature size 12, 14 classes). Without
--checkpoint that network is finetuned here for 2 steps from scratch on 2 small phantoms (about a minute; its
weights do not matter for memory), once: a later run reuses OUT/finetune/checkpoints/last.ckpt. Each checkpoint
row segments the whole case (267×267×250 after preprocessing, 448 windows): about 40 min on 2 busy CPU cores.
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


REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "finetune" / "demo_cpu.yaml"


def ct_image(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int16 HU of a label map: air outside a body cylinder, fat-ish tissue inside, one mean per organ, noise."""
    x, y = np.ogrid[: label.shape[0], : label.shape[1]]
    body = ((x - label.shape[0] / 2) / (0.45 * label.shape[0])) ** 2 + \
        ((y - label.shape[1] / 2) / (0.38 * label.shape[1])) ** 2 <= 1
    hu = np.empty(label.shape, np.float32)
    hu[...] = np.where(body, np.float32(-80), np.float32(-1000))[..., None]
    means = np.concatenate([[0.0], rng.uniform(20, 180, size=int(label.max()))]).astype(np.float32)
    organ = label > 0
    hu[organ] = means[label[organ]]
    hu += rng.standard_normal(label.shape, dtype=np.float32) * np.float32(20)
    return np.clip(hu, -1024, 3071).astype(np.int16)


def write_case(out: Path, shape: tuple[int, int, int], classes: int, shift: int) -> Path:
    """labelsTr/case_000.nii.gz, pred/case_000.nii.gz (shifted), imagesTr/case_000.nii.gz (CT-like int16) and a
    dataset.json under ``out``."""
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
    (out / "imagesTr").mkdir(exist_ok=True)  # --predictions reads no image; --checkpoint and predict do
    nib.save(nib.Nifti1Image(ct_image(label, rng), affine), out / "imagesTr" / "case_000.nii.gz")
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


def finetuned(out: Path, subfore: str) -> Path:
    """A small 14-class network of configs/finetune/demo_cpu.yaml, finetuned for 2 steps on 2 phantoms (reused)."""
    ckpt = out / "finetune" / "checkpoints" / "last.ckpt"
    if ckpt.exists():
        return ckpt
    phantoms = out / "phantoms"
    if not (phantoms / "dataset.json").exists():
        subprocess.run([subfore, "phantoms", str(phantoms), "--n", "2", "--spacing", "1.5,1.5,2"], check=True,
                       capture_output=True)
    sets = {"run_dir": out / "finetune", "data.train": phantoms / "dataset.json", "data.val": "null",
            "data.phantoms": "null", "data.cache_dir": out / "cache", "data.num_workers": 0,
            "finetune.pretrained": "null", "train.max_steps": 2, "train.ckpt_every": 2, "train.val_every": 2}
    command = [subfore, "finetune", "--config", str(CONFIG)]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0 or not ckpt.exists():
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout[-1000:]}{proc.stderr[-2000:]}")
    return ckpt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="512,512,200")
    p.add_argument("--classes", type=int, default=14, help="label ids 0…N−1 (14: 13 organs and background)")
    p.add_argument("--shift", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("/tmp/subfore_evaluate_memory"))
    p.add_argument("--checkpoint", type=Path, help="a subfore finetune checkpoint with --classes outputs "
                   "(default: a small one finetuned here for 2 steps)")
    p.add_argument("--no-checkpoint", action="store_true", help="only the --predictions and nnU-Net rows")
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
    if not args.no_checkpoint:
        ckpt = str(args.checkpoint or finetuned(args.out, subfore))
        evaluate = [subfore, "evaluate", "--checkpoint", ckpt, "--data", str(root / "dataset.json"), "--split",
                    "training", "--device", "cpu"]
        runs += [
            ("subfore predict --checkpoint (1 image → CASE_seg.nii.gz + overlay)",
             [subfore, "predict", "--checkpoint", ckpt, str(root / "imagesTr" / "case_000.nii.gz"), "--out",
              str(root / "pred_ckpt"), "--device", "cpu"]),
            ("subfore evaluate --checkpoint (Dice + NSD)", [*evaluate, "--out", str(root / "c.json")]),
            ("subfore evaluate --checkpoint --hd95 (Dice + NSD + HD95)",
             [*evaluate, "--out", str(root / "c_hd.json"), "--hd95"]),
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
    ours, hd, theirs = list(figures.values())[:3]
    print(f"\nratios to nnU-Net: Dice+NSD peak RSS {ours[0] / theirs[0]:.2f}×, wall {ours[1] / theirs[1]:.2f}×; "
          f"with HD95 peak RSS {hd[0] / theirs[0]:.2f}×, wall {hd[1] / theirs[1]:.2f}×")
    mean = json.loads((root / "m.json").read_text())["mean"]
    print(f"subfore mean Dice {mean['mean_dice']}, mean NSD {mean['mean_nsd']}")
    above = [name for name, (rss, _) in figures.items() if rss > 4.0]
    print("every row within 4 GB peak RSS" if not above else f"above 4 GB peak RSS: {'; '.join(above)}")


if __name__ == "__main__":
    main()
