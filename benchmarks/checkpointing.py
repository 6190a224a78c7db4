"""Memory and time of one training step with and without ``model.checkpointing``, per backbone, on CPU.

    python benchmarks/checkpointing.py [--roi 64] [--batch 1] [--steps 1] [--only basicunet,resenc]

Each (backbone, checkpointing) pair runs in its own process, the two variants of a backbone back to back, on one
torch thread. A step is forward + L1 loss + backward on a random (batch, 1, roi³) crop (no optimiser: its state is
the same either way); one warm-up step (gradient buffers, oneDNN primitives, torch.utils.checkpoint's imports)
precedes the measured ones. Memory: the process's peak RSS during the first measured step above its RSS just
before it (VmHWM from /proc/self/status, reset by writing 5 to /proc/self/clear_refs), with glibc serving every
block ≥ 64 KiB by mmap (MALLOC_MMAP_THRESHOLD_) so that RSS follows the live tensors; on CPU every torch allocation
shows in RSS. Time: process CPU seconds per measured step (the machine is shared; wall seconds are printed too).
Linux only.

Backbones (small widths so a step takes seconds): UNETR (ViT-B: 768 wide, 12 heads; feature size 16), BasicUNet
(feature size 16), an nnU-Net ResEnc (4 stages, 16…128 features, [1, 3, 4, 6] blocks) and, for reference,
SwinUNETR v2 (feature size 12; MONAI's own use_checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

RESENC = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "arch_kwargs": {
        "n_stages": 4, "features_per_stage": [16, 32, 64, 128], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 4, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3,
        "n_blocks_per_stage": [1, 3, 4, 6], "n_conv_per_stage_decoder": [1, 1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
MODELS = {
    "unetr": {"name": "unetr", "feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12},
    "basicunet": {"name": "basicunet", "feature_size": 16},
    "resenc": {"name": "resenc", "nnunet_architecture": RESENC},
    "swinunetr": {"name": "swinunetr", "feature_size": 12},
}


def status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(name: str, checkpointing: bool, roi: int, batch: int, steps: int) -> dict:
    """One variant in this process: {step_mib, step_s, ...}."""
    import gc

    import torch

    from subfore.config import ModelConfig
    from subfore.models.registry import resolve_backbone

    torch.set_num_threads(1)  # CPU time per step then stands for work done, on a machine shared with others
    torch.manual_seed(0)
    net = resolve_backbone(ModelConfig(**MODELS[name], checkpointing=checkpointing)).build(1, 1, (roi,) * 3).train()
    x = torch.randn(batch, 1, roi, roi, roi)

    def step() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        (net(x) - x).abs().mean().backward()
        net.zero_grad(set_to_none=False)  # the gradient buffers stay, as in training
        return time.perf_counter() - wall, time.process_time() - cpu

    step()  # warm-up: gradient buffers, oneDNN primitives, lazy initialisation
    gc.collect()
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    times = [step()]
    peak = status_kib("VmHWM")
    times += [step() for _ in range(steps - 1)]
    return {"backbone": name, "checkpointing": checkpointing, "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
            "rss_before_mib": before / 1024, "step_mib": (peak - before) / 1024,
            "step_s": sum(t[0] for t in times) / len(times), "step_cpu_s": sum(t[1] for t in times) / len(times),
            "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--roi", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1, help="timed steps after the warm-up (the first is measured)")
    ap.add_argument("--only", default=",".join(MODELS))
    ap.add_argument("--child", nargs=2, metavar=("BACKBONE", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "1", args.roi, args.batch, args.steps)))
        return
    print(f"# {platform.processor() or platform.machine()}, roi {args.roi}³, batch {args.batch}, "
          f"{args.steps} timed steps; python {platform.python_version()}", flush=True)
    print("| backbone | params (M) | step peak RSS off / on (MiB) | ratio | step CPU time off / on (s) | ratio | "
          "step wall time off / on (s) |")
    print("|---|---|---|---|---|---|---|")
    # glibc then serves every block ≥ 64 KiB by mmap and unmaps it when freed, so RSS follows the live tensors
    # instead of keeping freed heap pages (which made the peaks depend on the order of frees).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for name in args.only.split(","):
        rows = {}
        for on in (False, True):
            proc = subprocess.run([sys.executable, __file__, "--roi", str(args.roi), "--batch", str(args.batch),
                                   "--steps", str(args.steps), "--child", name, str(int(on))],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{name} (checkpointing {on}) failed:\n{proc.stderr[-2000:]}")
            rows[on] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(rows[on]), file=sys.stderr, flush=True)
        off, on = rows[False], rows[True]
        print(f"| {name} | {off['params_m']:.1f} | {off['step_mib']:.0f} / {on['step_mib']:.0f} | "
              f"{on['step_mib'] / off['step_mib']:.2f} | {off['step_cpu_s']:.2f} / {on['step_cpu_s']:.2f} | "
              f"{on['step_cpu_s'] / off['step_cpu_s']:.2f} | {off['step_s']:.2f} / {on['step_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
