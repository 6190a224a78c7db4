"""Reading the store: random and centre crops that decode only the chunks they touch."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .spec import StoreSpec


# --- reading ----------------------------------------------------------------------------------------------
class _Handles:
    """At most ``size`` open blosc2 arrays per process (least recently used closed first)."""

    def __init__(self, size: int = 32) -> None:
        self.size, self.open = size, OrderedDict()

    def get(self, path: Path):
        import blosc2

        key = str(path)
        if key in self.open:
            self.open.move_to_end(key)
            return self.open[key]
        # No mmap: mapped pages would count towards the worker's memory and grow with the volumes it reads.
        arr = blosc2.open(key, mode="r")
        self.open[key] = arr
        if len(self.open) > self.size:
            self.open.popitem(last=False)
        return arr


def read_crop(array, start: Sequence[int], roi: Sequence[int]) -> np.ndarray:
    """Voxels [start, start + roi) of a (C, X, Y, Z) array; outside the array: 0 (the padding SpatialPad adds).

    Only the chunks (blocks) that the crop touches are decoded.
    """
    shape = array.shape[1:]
    out = np.zeros((array.shape[0], *roi), np.float32)
    src, dst = [slice(None)], [slice(None)]
    for s, r, size in zip(start, roi, shape):
        lo, hi = max(s, 0), min(s + r, size)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def padded_origin(shape: Sequence[int], roi: Sequence[int]) -> list[int]:
    """Where the padded volume starts in array coordinates (≤ 0): SpatialPad's symmetric padding to the ROI."""
    return [-(max(r - s, 0) // 2) for s, r in zip(shape, roi)]


def crop_starts(shape: Sequence[int], roi: Sequence[int], bbox: Sequence[Sequence[int]] | None, n: int,
                generator: torch.Generator) -> torch.Tensor:
    """``n`` random crop corners (n, 3) in array coordinates, uniform over the padded volume.

    With ``bbox`` (half-open per axis) the crop stays inside the box where the box is larger than the ROI, and
    covers the whole box where it is not.
    """
    origin = torch.tensor(padded_origin(shape, roi))
    size = torch.tensor([max(s, r) for s, r in zip(shape, roi)])
    roi_t = torch.tensor(list(roi))
    lo, hi = origin.clone(), origin + size - roi_t
    if bbox is not None:
        b0, b1 = torch.tensor([b[0] for b in bbox]), torch.tensor([b[1] for b in bbox])
        inside = (b1 - b0) >= roi_t
        lo = torch.where(inside, torch.maximum(lo, b0), torch.maximum(lo, b1 - roi_t))
        hi = torch.where(inside, torch.minimum(hi, b1 - roi_t), torch.minimum(hi, b0))
        hi = torch.maximum(hi, lo)
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    return lo + (u * (hi - lo + 1).double()).floor().long().clamp_max(hi - lo)


class StoreCrops(torch.utils.data.Dataset):
    """Crops of stored volumes: ``draw(i, seed)`` → ``samples`` random ROI crops of volume i (training), and
    ``self[i]`` → the centre crop of volume i (validation), each ``{"image": (C, *roi) float32}`` plus the item's
    other keys (e.g. ``weight``)."""

    def __init__(self, spec: StoreSpec, records: Sequence[dict], roi: Sequence[int], samples: int = 1,
                 crop: str = "anywhere", extras: Sequence[dict] | None = None) -> None:
        self.root, self.records, self.roi = spec.root, list(records), tuple(int(r) for r in roi)
        self.samples, self.crop = samples, crop
        self.extras = list(extras) if extras is not None else [{} for _ in self.records]
        self._handles: _Handles | None = None

    def __len__(self) -> int:
        return len(self.records)

    def _array(self, i: int, kind: str = "store"):
        if self._handles is None:  # opened in the process that reads (loader workers each open their own)
            self._handles = _Handles()
        return self._handles.get(self.root / self.records[i][kind])

    def crop_at(self, i: int, start: Sequence[int], kind: str = "store") -> torch.Tensor:
        """The crop at ``start`` of volume i's image (``kind`` "store") or foreground reference ("reference")."""
        return torch.from_numpy(read_crop(self._array(i, kind), [int(s) for s in start], self.roi))

    def sample(self, i: int, start: Sequence[int]) -> dict:
        """{"image": (C, *roi)} and, where the store keeps one, the foreground "reference" (C, *roi) at ``start``."""
        out = {"image": self.crop_at(i, start)}
        if "reference" in self.records[i]:
            out["reference"] = self.crop_at(i, start, "reference")
        return {**out, **self.extras[i]}

    def draw(self, i: int, seed: int) -> list[dict]:
        rec = self.records[i]
        g = torch.Generator().manual_seed(int(seed))
        bbox = rec["body_bbox"] if self.crop == "body" else None
        starts = crop_starts(rec["shape"][1:], self.roi, bbox, self.samples, g)
        return [self.sample(i, s.tolist()) for s in starts]

    def __getitem__(self, i: int) -> dict:
        shape = self.records[i]["shape"][1:]
        # CenterSpatialCrop of the padded volume: centre P // 2, start centre − roi // 2.
        origin = padded_origin(shape, self.roi)
        start = [o + max(s, r) // 2 - r // 2 for o, s, r in zip(origin, shape, self.roi)]
        return self.sample(i, start)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = None  # open files do not travel to loader workers
        return state
