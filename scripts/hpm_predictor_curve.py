"""Short CPU hard-patch-mining run on phantoms; plots the loss predictor's Spearman correlation over steps.

    python scripts/hpm_predictor_curve.py --steps 150 --out docs/hpm_spearman.png

Writes the PNG and prints a Markdown table of Spearman (mean over windows of logged steps).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from subfore.config import load_config  # noqa: E402
from subfore.pretrain import pretrain  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--run-dir", default="runs/hpm_curve")
    p.add_argument("--phantoms", default="data/phantoms")
    p.add_argument("--out", default="docs/hpm_spearman.png")
    args = p.parse_args()
    tree = {
        "run_dir": args.run_dir,
        "seed": 0,
        "data": {"train": f"{args.phantoms}/dataset.json", "roi": [48, 48, 48], "samples_per_volume": 4,
                 "num_workers": 1, "phantoms": {"dir": args.phantoms, "n": 6}},
        "model": {"name": "basicunet", "feature_size": 8},
        "masking": {"strategy": "hpm", "subvolume_size": 8},
        "optim": {"lr": 1e-3, "warmup_steps": 10},
        "train": {"max_steps": args.steps, "batch_size": 4, "log_every": 5, "ckpt_every": args.steps,
                  "progress_bar": False},
    }
    cfg = load_config(None, [], base=tree)
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    t0 = time.time()
    pretrain(cfg)
    wall = time.time() - t0
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if "spearman" in x]
    steps = [r["step"] for r in rows]
    rho = [r["spearman"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(steps, rho, marker=".")
    ax[0].axhline(0, color="k", lw=0.5)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("Spearman(predicted, true loss)")
    ax[0].set_title("HPM loss predictor, masked 8³ subvolumes")
    ax[1].plot(steps, [r["loss"] for r in rows], label="reconstruction L1")
    ax[1].plot(steps, [r["predictor_loss"] for r in rows], label="ranking BCE")
    ax[1].set_xlabel("step")
    ax[1].legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wall {wall:.0f} s for {args.steps} steps")
    print("| steps | mean Spearman | mean ranking BCE |")
    print("|---|---|---|")
    w = max(1, len(rows) // 5)
    for i in range(0, len(rows), w):
        chunk = rows[i : i + w]
        print(f"| {chunk[0]['step']}–{chunk[-1]['step']} | {sum(r['spearman'] for r in chunk) / len(chunk):.3f} | "
              f"{sum(r['predictor_loss'] for r in chunk) / len(chunk):.3f} |")


if __name__ == "__main__":
    main()
