"""Mask-generation micro-benchmark: µs per batch for every registered strategy, and its share of a training step.

    python benchmarks/mask_generation.py [--batch 4] [--roi 96] [--size 16] [--device cpu|cuda] [--step-s 7.3]

Teacher-guided strategies are timed with a stub scorer (the teacher's forward is a training-step cost,
measured by pretrain_throughput.py --teachers), so this isolates the mask arithmetic itself.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from subfore.masking import REGISTRY, TeacherGuidedMask, apply_mask, make_generator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--roi", type=int, default=96)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--step-s", type=float, default=None, help="a measured training step (s) to express shares of")
    args = p.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    r = args.roi
    zz, yy, xx = torch.meshgrid(*(torch.linspace(-1, 1, r, device=dev),) * 3, indexing="ij")
    body = ((xx / 0.8) ** 2 + (yy / 0.6) ** 2 <= 1).float()
    x = (0.5 * body + 0.05 * torch.rand(args.batch, 1, r, r, r, device=dev, generator=g)).clamp(0, 1)
    n = (r // args.size) ** 3
    where = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"# batch {args.batch} × {r}³, {args.size}³ subvolumes ({n} per crop), ρ 0.6; {where}; torch {torch.__version__}")
    print("| strategy | mask µs/batch | mask + apply_mask(noise) µs/batch |" + (" share of a step |" if args.step_s else ""))
    print("|---|---|---|" + ("---|" if args.step_s else ""))
    for name in sorted(REGISTRY):
        gen = make_generator(name, ratio=0.6, size=args.size)
        if isinstance(gen, TeacherGuidedMask):
            gen.scorer = lambda x, cand, generator: torch.rand(cand.shape, device=x.device, generator=generator)
            gen.step, gen.total_steps = 50, 100
        times = {}
        for label, fn in (("mask", lambda: gen(x, g)), ("both", lambda: apply_mask(x, gen(x, g), "noise", g))):
            for _ in range(3):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[label] = (time.perf_counter() - t0) / args.repeats * 1e6
        share = f" {100 * times['both'] / 1e6 / args.step_s:.3f} % |" if args.step_s else ""
        print(f"| {name} | {times['mask']:.0f} | {times['both']:.0f} |{share}")


if __name__ == "__main__":
    main()
