"""Multi-process and resume costs, through the console script as users run it (CPU-sized by default).

1. Seconds per optimiser step of 2-process DDP (gloo on CPU, ``train.devices: 2``) against 1 process at the
   same global batch (1 × B against 2 × B/2), pairs run alternately, the ratio taken pair by pair.
2. Seconds from starting ``subfore pretrain --resume`` to the first resumed step being logged, against a
   fresh start to its first step (both include Python start-up and imports).

Step times come from the ``time`` field of consecutive metrics.jsonl rows (``log_every: 1``), after warm-up.

    python benchmarks/ddp_resume.py                 # BasicUNet fs 8, 48³, global batch 4, 12 steps, 2 pairs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SUBFORE = str(Path(sys.executable).with_name("subfore"))


def config(root: Path, name: str, args, devices: int, steps: int) -> Path:
    tree = {
        "run_dir": str(root / name), "seed": 0,
        "data": {"train": str(root / "ph" / "dataset.json"), "roi": [args.roi] * 3, "num_workers": 0,
                 "cache_dir": str(root / "cache"), "spacing": [3.0, 3.0, 3.0]},
        "model": {"name": args.model, "feature_size": args.feature_size},
        "masking": {"strategy": args.strategy},
        "train": {"max_steps": steps, "batch_size": args.batch // devices, "log_every": 1, "ckpt_every": steps,
                  "progress_bar": False, "accelerator": "cpu", "devices": devices},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def run(*args) -> float:
    t0 = time.time()
    proc = subprocess.run([SUBFORE, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        sys.exit(f"failed: subfore {' '.join(map(str, args))}\n{proc.stderr[-2000:]}")
    return t0


def step_times(run_dir: Path, skip: int) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    t = [r["time"] for r in rows if "loss" in r]
    return [b - a for a, b in zip(t[skip:], t[skip + 1 :])]


def first_step_after(run_dir: Path, step: int) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["time"] for r in rows if "loss" in r and r["step"] == step + 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="basicunet")
    p.add_argument("--feature-size", type=int, default=8)
    p.add_argument("--roi", type=int, default=48)
    p.add_argument("--batch", type=int, default=4, help="global batch (crops per optimiser step)")
    p.add_argument("--strategy", default="foreground")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", type=int, default=2)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="subfore-ddp-"))
    subprocess.run([SUBFORE, "phantoms", root / "ph", "--n", "6", "--spacing", "2,2,3"], check=True,
                   capture_output=True)
    run("pretrain", "--config", config(root, "cache_fill", args, 1, 1))  # fills the preprocessing cache

    one, two, ratios = [], [], []
    for i in range(args.pairs):
        cfg1, cfg2 = config(root, f"one{i}", args, 1, args.steps), config(root, f"two{i}", args, 2, args.steps)
        run("pretrain", "--config", cfg1)
        run("pretrain", "--config", cfg2)
        s1 = statistics.median(step_times(root / f"one{i}", args.warmup))
        s2 = statistics.median(step_times(root / f"two{i}", args.warmup))
        one.append(s1), two.append(s2), ratios.append(s2 / s1)

    half = args.steps // 2
    fresh = config(root, "resume", args, 1, half)
    t_fresh = run("pretrain", "--config", fresh)
    to_first_fresh = first_step_after(root / "resume", 0) - t_fresh
    t_resume = run("pretrain", "--config", fresh, "--resume", "--set", f"train.max_steps={args.steps}")
    to_first_resumed = first_step_after(root / "resume", half) - t_resume

    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "model": f"{args.model} fs {args.feature_size}, {args.roi}³, global batch {args.batch}, {args.strategy}",
        "s_per_step_1proc": [round(x, 3) for x in one], "s_per_step_2proc": [round(x, 3) for x in two],
        "ratio_2proc_over_1proc": [round(x, 3) for x in ratios],
        "s_start_to_first_step_fresh": round(to_first_fresh, 2),
        "s_resume_to_first_resumed_step": round(to_first_resumed, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
