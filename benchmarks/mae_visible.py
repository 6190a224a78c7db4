"""Dense (SimMIM-style) vs visible (MAE) encoding on UNETR: seconds per step and peak memory at the same masks.

Crops of the real abdominal CT in ../shared/data (the benchmark needs it), cut as pretraining cuts them (ct
preset, 1.5 mm). For each mask — random 0.75 (MAE's) and SubFore's foreground ρ 0.6 — and each encoding, one
subprocess times, after warm-up steps:

- ``encoder``: the ViT alone, forward + backward (dense: on the whole filled crop; visible: on the kept tokens);
- ``step``: the whole pretraining step as ``subfore pretrain`` runs it (MaskedImageModel.reconstruct: masks,
  network, loss; backward; AdamW), dense: UNETR with its conv decoder, visible: the ViT + MAE decoder.

The masks are the same in both encodings (same generator seeds, same crops). Peak memory is the process's max RSS
on CPU from the first step on (VmHWM, reset after the model is built and the crops loaded; CUDA max allocated on a
GPU); ``+step`` is what the steps add above the memory in use before the first one.

    python benchmarks/mae_visible.py                         # UNETR ViT-B (768, 12 blocks), 96³, batch 2
    python benchmarks/mae_visible.py --hidden 384 --mlp 1536 --heads 6 --roi 64   # a smaller ViT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct" / "ts_abdomen_small_ct.nii.gz"
MASKS = {"random 0.75": {"strategy": "random", "ratio": 0.75}, "SubFore ρ 0.6": {"strategy": "foreground", "ratio": 0.6}}


def make_config(args, encoding: str, mask: dict):
    from subfore.config import load_config

    train = str(CT)
    tree = {
        "run_dir": "/tmp/subfore-bench-mae", "seed": 0,
        "data": {"train": train, "roi": [args.roi] * 3, "spacing": [1.5, 1.5, 1.5], "num_workers": 0,
                 "cache_dir": None, "samples_per_volume": args.batch},
        "model": {"name": "unetr", "feature_size": 16, "hidden_size": args.hidden, "mlp_dim": args.mlp,
                  "num_heads": args.heads, "encoding": encoding},
        "masking": {**mask, "subvolume_size": 16, "loss": "l1"},
        "train": {"max_steps": args.warmup + args.steps, "batch_size": args.batch, "progress_bar": False},
    }
    return load_config(None, [], base=tree)


def crops(cfg, n: int) -> list[torch.Tensor]:
    """n batches of crops (B, 1, roi³), drawn as pretraining draws them."""
    from monai.utils import set_determinism

    from subfore.data.datalist import load_datalists
    from subfore.pretrain.data import crop_volumes, resolve

    set_determinism(0)
    plan = resolve(cfg)
    ds = crop_volumes(plan, load_datalists(cfg.data.train, "training"), cfg.data.samples_per_volume)
    return [torch.stack([torch.as_tensor(s["image"]).float() for s in ds[0]]) for _ in range(n)]


def peak_mb(device) -> float:
    """CUDA max allocated, or on CPU the process's peak RSS since :func:`reset_peak` (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device) -> float:
    """Drop what loading the crops left behind and restart the peak count; returns the memory in use now (MB)."""
    import ctypes
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass
    return peak_mb(device)


def run_variant(args) -> dict:
    from subfore.models.mae import encode_visible, patch_grid
    from subfore.pretrain import MaskedImageModel

    encoding, mask_name = args.variant.split(":")
    cfg = make_config(args, encoding, MASKS[mask_name])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    module = MaskedImageModel(cfg).to(device).train()
    data = crops(cfg, args.warmup + args.steps)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    vit = module.net.vit
    base = reset_peak(device)
    times, shares = [], []
    for i, x in enumerate(data):
        x = x.to(device)
        gen = torch.Generator(device=device).manual_seed(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if args.part == "step":
            out = module.reconstruct(x, gen)
            loss = out["loss"]
            shares.append(float(out["mask"].float().mean()))
        else:
            mask = module.masker(x, generator=gen)
            shares.append(float(mask.float().mean()))
            if encoding == "visible":
                encoded, _, valid = encode_visible(vit, x, ~patch_grid(mask, 1).flatten(1))
                loss = (encoded * valid[..., None]).square().mean()
            else:
                from subfore.masking import apply_mask

                loss = vit(apply_mask(x, mask, "noise", generator=gen))[0].square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.part == "step":
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup:]
    peak = peak_mb(device)
    return {"s": sum(timed) / len(timed), "min_s": min(timed), "peak_mb": peak, "added_mb": peak - base,
            "masked": sum(shares) / len(shares)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--roi", type=int, default=96)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--mlp", type=int, default=3072)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--part", choices=["encoder", "step"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if not CT.exists():
        sys.exit(f"{CT}: absent; this benchmark cuts its crops from that real CT")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for part in ("encoder", "step"):
        for mask in MASKS:
            for encoding in ("dense", "visible"):
                cmd = [sys.executable, __file__, "--variant", f"{encoding}:{mask}", "--part", part]
                cmd += [f"--{k}={getattr(args, k)}" for k in ("roi", "hidden", "mlp", "heads", "batch", "steps", "warmup")]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if out.returncode:
                    sys.exit(out.stderr)
                results[part, mask, encoding] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{part} {mask} {encoding}: {results[part, mask, encoding]}", file=sys.stderr, flush=True)
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    source = f"crops of {CT.name}"
    print(f"# UNETR ViT {args.hidden}/{args.mlp}/{args.heads} heads, {args.roi}³ (16³ patches: "
          f"{(args.roi // 16) ** 3} tokens), batch {args.batch}, fp32, {source}; {args.steps} timed steps after "
          f"{args.warmup} warm-up, mean; {device}; torch {torch.__version__}")
    print("| part | mask (masked share) | dense s | visible s | dense / visible | dense peak MB (+step) | "
          "visible peak MB (+step) | dense / visible (+step) |")
    print("|---|---|---|---|---|---|---|---|")
    for part in ("encoder", "step"):
        for mask in MASKS:
            d, v = results[part, mask, "dense"], results[part, mask, "visible"]
            print(f"| {'ViT alone, fwd+bwd' if part == 'encoder' else 'whole step'} | {mask} ({d['masked']:.2f}) | "
                  f"{d['s']:.2f} | {v['s']:.2f} | **{d['s'] / v['s']:.2f}×** | {d['peak_mb']:.0f} "
                  f"(+{d['added_mb']:.0f}) | {v['peak_mb']:.0f} (+{v['added_mb']:.0f}) | "
                  f"{d['added_mb'] / max(v['added_mb'], 1):.2f}× |")


if __name__ == "__main__":
    main()
