"""Which chunk side serves every crop size: crops/s of random crops (ROI 64³…160³) from one stored CT per chunk side.

    python benchmarks/store_chunks.py [--chunks 48,64,80,96,112] [--rois 64,96,128,160] [--crops 30]

One phantom CT at 1 mm (``--fov``, default 360×260×280 voxels) is written once per chunk side with the store's own compression
(fp16, 16³ blocks); each ROI then reads ``--crops`` random crops (after 3 warm-up crops) in this process, page
cache warm. The table gives crops/s and, per ROI, each chunk's share of the best chunk's rate.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", default="48,64,80,96,112")
    p.add_argument("--rois", default="64,96,128,160")
    p.add_argument("--crops", type=int, default=30)
    p.add_argument("--fov", default="360,260,280", help="phantom field of view, mm (1 mm voxels)")
    args = p.parse_args()
    import blosc2
    import torch
    from monai.transforms import Compose

    from subfore.data.presets import Preset
    from subfore.data.store import crop_starts, read_crop
    from subfore.data.store.build import compression
    from subfore.data.transforms import preprocess
    from subfore.phantoms import PhantomSpec, write_phantoms

    torch.set_num_threads(1)
    chunks = [int(c) for c in args.chunks.split(",")]
    rois = [int(r) for r in args.rois.split(",")]
    out: dict = {"crops": args.crops, "crops_per_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fov = tuple(float(v) for v in args.fov.split(","))
        write_phantoms(tmp / "ph", n=1, seed=0, spec=PhantomSpec(spacing=(1.0, 1.0, 1.0), fov=fov))
        src = next((tmp / "ph" / "imagesTr").glob("*.nii.gz"))
        image = Compose(preprocess(Preset(spacing=(1.0, 1.0, 1.0)), ["image"]))({"image": str(src)})["image"]
        arr = np.ascontiguousarray(np.asarray(image, dtype=np.float16))
        out["shape"] = list(arr.shape)
        for c in chunks:
            path = tmp / f"c{c}.b2nd"
            blosc2.asarray(arr, urlpath=str(path), chunks=(arr.shape[0], *(min(c, s) for s in arr.shape[1:])),
                           blocks=(1, 16, 16, 16), cparams=compression(), mode="w")
            stored = blosc2.open(str(path), mode="r")
            for roi in rois:
                g = torch.Generator().manual_seed(roi)
                starts = crop_starts(arr.shape[1:], (roi,) * 3, None, args.crops + 3, g).tolist()
                for s in starts[:3]:
                    read_crop(stored, s, (roi,) * 3)
                t0 = time.perf_counter()
                for s in starts[3:]:
                    read_crop(stored, s, (roi,) * 3)
                out["crops_per_s"].setdefault(str(roi), {})[str(c)] = round(args.crops / (time.perf_counter() - t0), 1)
    out["share_of_best"] = {roi: {c: round(v / max(row.values()), 3) for c, v in row.items()}
                            for roi, row in out["crops_per_s"].items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
