"""Data-path benchmark: training crops per second with a cold vs a warm PersistentDataset cache.

    python benchmarks/data_path.py [--n 4] [--roi 96] [--samples 2]

Cold: the first pass decodes, reorients, resamples and normalises each phantom (and writes the cache).
Warm: the second pass reads the cached volume and only crops.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from subfore.data import load_datalist, make_dataset, make_preset, pretrain_transforms
from subfore.phantoms import PhantomSpec, write_phantoms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--roi", type=int, default=96)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--spacing", default="0.8,0.8,2.5")
    args = p.parse_args()
    spacing = tuple(float(v) for v in args.spacing.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_phantoms(tmp / "ph", n=args.n, seed=0, spec=PhantomSpec(spacing=spacing))
        items = load_datalist(tmp / "ph" / "dataset.json") + load_datalist(tmp / "ph" / "dataset.json", "validation")
        preset, roi = make_preset("ct"), (args.roi,) * 3
        ds = make_dataset(items, pretrain_transforms(preset, roi, args.samples), tmp / "cache", cache_key=(preset,))
        rates = {}
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            crops = sum(len(ds[i]) for i in range(len(ds)))
            rates[label] = crops / (time.perf_counter() - t0)
        shape = PhantomSpec(spacing=spacing).shape
        print(f"# {len(items)} phantoms {shape} at {spacing} mm → ct preset (1.5 mm), {args.samples} random {args.roi}³ "
              f"crops per volume, one process; CPU {os.cpu_count()} cores")
        print("| cache | crops/s |")
        print("|---|---|")
        for label, rate in rates.items():
            print(f"| {label} | {rate:.2f} |")
        print(f"| warm / cold | {rates['warm'] / rates['cold']:.1f} |")


if __name__ == "__main__":
    main()
