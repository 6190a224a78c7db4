"""Crop store (blosc2) against MONAI's PersistentDataset on a real-size CT: disk, crops/s, loader memory, build rate.

    python benchmarks/store.py [--fov 360,260,280] [--spacing 1] [--crops 40] [--volumes 4]

A phantom of at least 350×250×280 voxels at 1 mm (and a second one twice as large, to see whether a loader's
memory grows with the volume) is cached both ways. Each measurement runs in a fresh process, so the peak RSS
is that loader's own: it reads ``--crops`` random 96³ crops (the store decodes only the chunks they touch;
PersistentDataset unpickles the whole volume per crop). Everything is measured in one run, so the ratios
compare like with like on the same machine load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROI = (96, 96, 96)


def _as_list(batch):
    return batch


def _rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _store(cache: Path, spacing: float):
    from subfore.data.presets import Preset
    from subfore.data.store import StoreSpec

    return StoreSpec.under(cache, Preset(spacing=(spacing,) * 3), "float16", threshold=0.1)


def _persistent(items, cache: Path, spacing: float):
    from subfore.data import make_dataset
    from subfore.data.presets import Preset
    from subfore.data.transforms import pretrain_transforms

    preset = Preset(spacing=(spacing,) * 3)
    return make_dataset(items, pretrain_transforms(preset, ROI, 1), cache, cache_key=(preset,))


def read_crops(kind: str, items, cache: Path, spacing: float, crops: int, workers: int, queue) -> None:
    """In a fresh process: time ``crops`` random crops (after one warm-up crop) and report the peak RSS."""
    import torch

    torch.set_num_threads(1)
    from subfore.data.store import StoreCrops, records_for

    if kind == "store":
        spec = _store(cache, spacing)
        ds = StoreCrops(spec, records_for(spec, items, skip_bad=False), ROI)
    else:
        ds = _persistent(items, cache, spacing)
    base = _rss_mb()
    if workers == 0:
        ds.draw(0, 0)
        t0 = time.perf_counter()
        for i in range(crops):
            ds.draw(i % len(ds), i + 1)
        dt = time.perf_counter() - t0
        queue.put({"crops_per_s": crops / dt, "peak_rss_mb": _rss_mb(), "rss_after_imports_mb": base})
        return
    from subfore.engine import DrawDataset
    from torch.utils.data import DataLoader

    loader = DataLoader(DrawDataset(ds, 0), batch_size=1, sampler=range(crops + 2 * workers), num_workers=workers,
                        collate_fn=_as_list, prefetch_factor=2)
    it = iter(loader)
    for _ in range(2 * workers):  # workers started and warm
        next(it)
    t0 = time.perf_counter()
    for _ in range(crops):
        next(it)
    queue.put({"crops_per_s": crops / (time.perf_counter() - t0)})


def measure(kind, items, cache, spacing, crops, workers=0) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=read_crops, args=(kind, items, cache, spacing, crops, workers, q))
    p.start()
    out = q.get()
    p.join()
    return out


def build(kind: str, items, cache: Path, spacing: float, workers: int) -> float:
    """Seconds to preprocess ``items`` into an empty cache."""
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    if kind == "store":
        from subfore.data.store import preprocess_store

        preprocess_store(_store(cache, spacing), items, workers=workers, progress=False)
    else:  # PersistentDataset writes its cache on first access, in the loader's workers
        from torch.utils.data import DataLoader

        ds = _persistent(items, cache, spacing)
        list(DataLoader(ds, batch_size=1, num_workers=workers if workers > 1 else 0, collate_fn=_as_list))
    return time.perf_counter() - t0


def disk_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".pt", ".b2nd")) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fov", default="360,260,280", help="phantom field of view, mm")
    p.add_argument("--spacing", type=float, default=1.0)
    p.add_argument("--crops", type=int, default=40)
    p.add_argument("--volumes", type=int, default=4, help="copies of the phantom for the build rate")
    args = p.parse_args()
    from subfore.phantoms import PhantomSpec, write_phantoms

    fov = tuple(float(v) for v in args.fov.split(","))
    rows: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                  "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = {}
        for name, scale in (("1x", 1.0), ("2x", 2 ** (1 / 3))):
            spec = PhantomSpec(spacing=(args.spacing,) * 3, fov=tuple(f * scale for f in fov))
            write_phantoms(tmp / name, n=1, seed=0, spec=spec)
            src = next((tmp / name / "imagesTr").glob("*.nii.gz"))
            copies = [src]
            for k in range(1, args.volumes):
                copies.append(src.with_name(f"copy{k}_{src.name}"))
                shutil.copy(src, copies[-1])
            sizes[name] = ([{"image": str(c)} for c in copies], spec.shape)
        items, shape = sizes["1x"]
        rows["volume"] = {"shape": list(shape), "spacing_mm": args.spacing}
        for kind in ("persistent", "store"):
            r = rows[kind] = {}
            for workers in (1, 2):
                r[f"build_volumes_per_s_{workers}proc"] = args.volumes / build(kind, items, tmp / f"c-{kind}",
                                                                               args.spacing, workers)
            r["mb_per_volume"] = disk_mb(tmp / f"c-{kind}") / args.volumes
            one = measure(kind, items, tmp / f"c-{kind}", args.spacing, args.crops)
            r.update(crops_per_s_1proc=one["crops_per_s"], peak_rss_mb_1x=one["peak_rss_mb"],
                     rss_after_imports_mb=one["rss_after_imports_mb"])
            r["crops_per_s_2workers"] = measure(kind, items, tmp / f"c-{kind}", args.spacing, args.crops, 2)[
                "crops_per_s"]
            big, big_shape = sizes["2x"]
            build(kind, big[:1], tmp / f"big-{kind}", args.spacing, 1)
            r["peak_rss_mb_2x"] = measure(kind, big[:1], tmp / f"big-{kind}", args.spacing, args.crops)["peak_rss_mb"]
            rows["volume_2x"] = {"shape": list(big_shape)}
        s, q = rows["store"], rows["persistent"]
        rows["ratios_store_over_persistent"] = {
            "disk": s["mb_per_volume"] / q["mb_per_volume"],
            "crops_per_s_1proc": s["crops_per_s_1proc"] / q["crops_per_s_1proc"],
            "crops_per_s_2workers": s["crops_per_s_2workers"] / q["crops_per_s_2workers"],
            "build_1proc": s["build_volumes_per_s_1proc"] / q["build_volumes_per_s_1proc"],
        }
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
