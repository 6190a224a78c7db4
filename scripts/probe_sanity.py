"""The probe's sanity table in docs/probe.md: random init, pretrained 8 and 60 steps, and their shuffled copies.

    python scripts/probe_sanity.py OUT_DIR      # ≈ 15 min on 2 CPU cores; prints one line per (seed, steps)

8 phantoms (seed 3, 2×2×3 mm), BasicUNet fs 8, 32³ crops at 4 mm, SubFore masking, probe of 200 steps on
spleen/liver/stomach (6 volumes train the head, 2 are scored).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from subfore.config import ProbeSettings, load_config
from subfore.phantoms import PhantomSpec, write_phantoms
from subfore.pretrain import pretrain
from subfore.models.artifact import read_encoder
from subfore.probe import Probe


def main(out: Path) -> None:
    data = out / "ph8" / "dataset.json"
    if not data.exists():
        write_phantoms(out / "ph8", n=8, seed=3, spec=PhantomSpec(spacing=(2.0, 2.0, 3.0)))
    for seed in (0, 1, 2):
        for steps in (8, 60):
            tree = {"run_dir": str(out / f"s{seed}_{steps}"), "seed": seed,
                    "data": {"train": str(data), "roi": [32, 32, 32], "spacing": [4.0, 4.0, 4.0],
                             "cache_dir": str(out / "cache"), "num_workers": 0},
                    "model": {"name": "basicunet", "feature_size": 8},
                    "train": {"max_steps": steps, "batch_size": 4, "log_every": 10, "ckpt_every": steps,
                              "progress_bar": False}}
            meta, state = read_encoder(pretrain(load_config(None, [], base=tree), resume="auto"))
            probe = Probe(ProbeSettings(data=str(data), label_map={1: 1, 6: 2, 7: 3}, steps=200), meta.model,
                          meta.in_channels, meta.roi, meta.preset)
            net = probe.network(seed=0)
            net.load_state_dict(state, strict=False)
            pretrained = probe.run(net)["mean_dice"]
            g = torch.Generator().manual_seed(seed)  # each tensor's values permuted: same distribution, no structure
            net = probe.network(seed=0)
            net.load_state_dict({k: v.flatten()[torch.randperm(v.numel(), generator=g)].view_as(v)
                                 if v.is_floating_point() else v for k, v in state.items()}, strict=False)
            shuffled = probe.run(net)["mean_dice"]
            baseline = probe.run(probe.network(seed=seed))["mean_dice"]
            print(f"seed {seed} steps {steps}: pretrained {pretrained:.3f} shuffled {shuffled:.3f} "
                  f"random init {baseline:.3f}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/probe_sanity"))
