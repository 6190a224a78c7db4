"""Pretraining throughput: the Lightning engine vs a plain PyTorch loop over the same MONAI network.

Both variants train on the same in-memory crops (so data loading is not measured), with the same
mask generator, fill, loss, AdamW, gradient clipping and batch. Each variant runs in its own
subprocess so that peak memory (max RSS on CPU, max allocated on CUDA) is its own. Also reports the
share of a step spent building masks (generator + apply_mask).

    python benchmarks/pretrain_throughput.py                       # SwinUNETR fs 12, 64³, batch 2 (CPU-sized)
    python benchmarks/pretrain_throughput.py --paper               # SwinUNETR fs 48, 96³, batch 4 (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch
from _common import engine_fit, peak, phantom_crops, plain_loop  # benchmarks/_common.py


def make_config(args):
    from subfore.config import load_config

    tree = {
        "run_dir": args.run_dir,
        "seed": 0,
        "data": {"train": "unused", "roi": [args.roi] * 3, "num_workers": 0, "cache_dir": None},
        "model": {"name": args.model, "feature_size": args.feature_size, "hidden_size": 96 if args.model == "unetr" else 768,
                  "mlp_dim": 192 if args.model == "unetr" else 3072, "num_heads": 4 if args.model == "unetr" else 12},
        "masking": {"strategy": args.strategy},
        "train": {"max_steps": args.warmup + args.steps, "batch_size": args.batch, "progress_bar": False,
                  "ckpt_every": 10**9, "log_every": 10**9, "grad_clip": 1.0, "precision": args.precision},
    }
    return load_config(None, [], base=tree)


def crops(args) -> list[torch.Tensor]:
    """Phantom-like crops: a body ellipse of soft tissue in air, so foreground masking has work to do."""
    return phantom_crops(args.batch * (args.warmup + args.steps), args.roi)


def run_plain(args) -> dict:
    """A hand-written loop: the minimum the engine's step has to do."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    r = plain_loop(make_config(args), crops(args), args.warmup, args.steps, device, precision=args.precision,
                   time_masks=True)
    return {"samples_per_s": r["samples_per_s"], "step_s": r["step_s"], "mask_s": r["mask_s"], **peak(device)}


def run_engine(args) -> dict:
    """The real engine: Lightning Trainer + MaskedImageModel, fed the same crops."""
    import lightning.pytorch as pl

    from subfore.pretrain import MaskedImageModel, resolve_precision

    cfg = make_config(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def trainer(callbacks):
        return pl.Trainer(max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                          precision=resolve_precision(args.precision), callbacks=callbacks,
                          default_root_dir=args.run_dir)

    r = engine_fit(MaskedImageModel(cfg), crops(args), args.batch, args.warmup, args.steps, device, trainer)
    return {"samples_per_s": r["samples_per_s"], "step_s": r["step_s"], **peak(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="swinunetr", choices=["swinunetr", "unetr", "basicunet"])
    p.add_argument("--feature-size", type=int, default=12)
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--strategy", default="foreground")
    p.add_argument("--precision", default="auto")
    p.add_argument("--paper", action="store_true", help="SwinUNETR fs 48, 96³, batch 4")
    p.add_argument("--variant", choices=["plain", "engine"], help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default="/tmp/subfore-bench")
    p.add_argument("--teachers", action="store_true", help="also time the engine with anatomask and hpm")
    args = p.parse_args()
    if args.paper:
        args.model, args.feature_size, args.roi, args.batch = "swinunetr", 48, 96, 4
    if args.precision == "auto":
        from subfore.pretrain import resolve_precision

        args.precision = resolve_precision("auto")
    if args.variant:
        print(json.dumps(run_plain(args) if args.variant == "plain" else run_engine(args)))
        return
    results = {}
    runs = [("plain", "plain", args.strategy), ("engine", "engine", args.strategy)]
    if args.teachers:
        runs += [(f"engine:{s}", "engine", s) for s in ("anatomask", "hpm")]
    for name, variant, strategy in runs:
        cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--model", args.model, "--feature-size", str(args.feature_size), "--roi", str(args.roi),
               "--batch", str(args.batch), "--precision", args.precision, "--strategy", strategy,
               "--run-dir", args.run_dir]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.returncode:
            sys.exit(out.stderr)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    plain, engine = results["plain"], results["engine"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"
    print(f"# {args.model} fs {args.feature_size}, {args.roi}³, batch {args.batch}, {args.strategy} masking, "
          f"precision {args.precision}, {args.steps} timed steps after {args.warmup} warm-up; {device}; torch {torch.__version__}")
    print("| variant | samples/s | s/step | peak memory (MB) |")
    print("|---|---|---|---|")
    for name, r in (("plain PyTorch loop", plain), ("subfore engine (Lightning)", engine)):
        print(f"| {name} | {r['samples_per_s']:.3f} | {r['step_s']:.2f} | {r['peak_mem_mb']:.0f} ({r['mem_kind']}) |")
    print(f"| engine / plain | {engine['samples_per_s'] / plain['samples_per_s']:.3f} | "
          f"{engine['step_s'] / plain['step_s']:.3f} | {engine['peak_mem_mb'] / plain['peak_mem_mb']:.3f} |")
    print(f"mask generation + apply_mask: {plain['mask_s'] * 1e3:.1f} ms per batch = "
          f"{100 * plain['mask_s'] / plain['step_s']:.2f} % of a plain training step")
    if args.teachers:
        print(f"\n| engine strategy | s/step | vs {args.strategy} |")
        print("|---|---|---|")
        for s in (args.strategy, "anatomask", "hpm"):
            r = results["engine" if s == args.strategy else f"engine:{s}"]
            print(f"| {s} | {r['step_s']:.2f} | {r['step_s'] / engine['step_s']:.3f} |")


if __name__ == "__main__":
    main()
