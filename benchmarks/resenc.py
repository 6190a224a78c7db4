"""Seconds per pretraining step: nnU-Net's ResEnc-M (as nnU-Net plans it) against SwinUNETR fs 12, both at 64³.

Plans a ResEnc-M with nnU-Net's own fingerprint extractor and nnUNetPlannerResEncM on two phantoms at 1.5 mm
(unless --plans is given), then times the same pretraining step (foreground masking, noise fill, masked L1,
backward, gradient clipping, AdamW) for both networks on the same crops in one process, alternating
ResEnc, SwinUNETR, ResEnc, … so that both see the same machine load; the ratio is the median of the pairs.
Wall-clock and process CPU seconds are both reported: on a shared machine the CPU seconds (summed over
threads) are the steadier measure of the work, the wall-clock ones what a user waits.

    python benchmarks/resenc.py                    # CPU: 64³, batch 2, 3 timed pairs after 1 warm-up
    python benchmarks/resenc.py --plans nnUNetResEncUNetMPlans.json --steps 5
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

import torch

PLAN = """
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncM)
nnUNetPlannerResEncM(502).plan_experiment()
"""


def plan_resenc_m(root: Path) -> Path:
    """nnU-Net's ResEnc-M plans for two phantoms at 1.5 mm (fingerprint + nnUNetPlannerResEncM)."""
    from subfore.phantoms import PhantomSpec, write_nnunet_raw, write_phantoms

    src = root / "phantoms"
    write_phantoms(src, n=2, seed=0, spec=PhantomSpec(spacing=(1.5, 1.5, 1.5)))
    write_nnunet_raw(src, root / "raw" / "Dataset502_Phantoms")
    env = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
               nnUNet_results=str(root / "results"))
    bin_dir = Path(sys.executable).parent
    for cmd in ([str(bin_dir / "nnUNetv2_extract_fingerprint"), "-d", "502", "-np", "1"], [sys.executable, "-c", PLAN]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
    return root / "pre" / "Dataset502_Phantoms" / "nnUNetResEncUNetMPlans.json"


def module(model: dict, roi: int, batch: int):
    from subfore.config import load_config
    from subfore.pretrain import MaskedImageModel

    tree = {"data": {"train": "unused", "roi": [roi] * 3}, "model": model, "masking": {"strategy": "foreground"},
            "train": {"batch_size": batch, "max_steps": 100}}
    return MaskedImageModel(load_config(None, [], base=tree))


def crops(n: int, roi: int) -> torch.Tensor:
    """Phantom-like crops: a body ellipse of soft tissue in air, so foreground masking has work to do."""
    g = torch.Generator().manual_seed(0)
    zz, yy, xx = torch.meshgrid(*(torch.linspace(-1, 1, roi),) * 3, indexing="ij")
    body = ((xx / 0.8) ** 2 + (yy / 0.6) ** 2 <= 1).float()
    return torch.clamp(0.5 * body + 0.05 * torch.randn(n, 1, roi, roi, roi, generator=g), 0, 1)


def stepper(m):
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)

    def step(x: torch.Tensor) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        loss = m.reconstruct(x, gen)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t, time.process_time() - c

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", type=Path, help="a ResEnc plans JSON (default: plan phantoms with nnUNetPlannerResEncM)")
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workdir", type=Path, help="keep the phantoms and plans here (default: a temporary folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plans = args.plans or plan_resenc_m(args.workdir or Path(tmp))
        arch = json.loads(plans.read_text())["configurations"][args.configuration]["architecture"]["arch_kwargs"]
        torch.manual_seed(0)
        resenc = module({"name": "resenc", "nnunet_plans": str(plans), "nnunet_configuration": args.configuration},
                        args.roi, args.batch)
    swin = module({"name": "swinunetr", "feature_size": 12}, args.roi, args.batch)
    nets = {"ResEnc-M": resenc, "SwinUNETR fs 12": swin}
    params = {k: sum(p.numel() for p in m.net.parameters()) for k, m in nets.items()}
    steps = {k: stepper(m) for k, m in nets.items()}
    data = crops(args.batch * (args.warmup + args.steps), args.roi)
    wall: dict[str, list[float]] = {k: [] for k in nets}
    cpu: dict[str, list[float]] = {k: [] for k in nets}
    for i in range(args.warmup + args.steps):
        x = data[i * args.batch : (i + 1) * args.batch]
        for k in nets:
            w, c = steps[k](x)
            if i >= args.warmup:
                wall[k].append(w)
                cpu[k].append(c)
    device = (f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
              f"{torch.get_num_threads()} threads")
    print(f"# {args.roi}³, batch {args.batch}, foreground masking, fp32, {args.steps} timed pairs after "
          f"{args.warmup} warm-up; {device}; torch {torch.__version__}")
    print(f"# ResEnc-M: {Path(plans).name} '{args.configuration}', {arch['n_stages']} stages, features "
          f"{arch['features_per_stage']}, strides {arch['strides']}, blocks {arch['n_blocks_per_stage']}")
    print("| network | parameters | wall s/step (each pair) | median | CPU s/step (each pair) | median |")
    print("|---|---|---|---|---|---|")
    for k in nets:
        print(f"| {k} | {params[k] / 1e6:.2f} M | {', '.join(f'{t:.2f}' for t in wall[k])} | "
              f"{statistics.median(wall[k]):.2f} | {', '.join(f'{t:.2f}' for t in cpu[k])} | "
              f"{statistics.median(cpu[k]):.2f} |")
    a, b = "ResEnc-M", "SwinUNETR fs 12"
    rw = [x / y for x, y in zip(wall[a], wall[b], strict=True)]
    rc = [x / y for x, y in zip(cpu[a], cpu[b], strict=True)]
    print(f"| ResEnc-M / SwinUNETR | {params[a] / params[b]:.1f}× | {', '.join(f'{r:.2f}' for r in rw)} | "
          f"{statistics.median(rw):.2f} | {', '.join(f'{r:.2f}' for r in rc)} | {statistics.median(rc):.2f} |")


if __name__ == "__main__":
    main()
