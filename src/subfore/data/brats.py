"""BraTS tumour regions (TC, WT, ET) from the label ids of either convention, and the convention from dataset.json.

Conventions (label id → class):
- ``msd``: MSD Task01_BrainTumour, 1 edema (ED), 2 non-enhancing tumour (NET), 3 enhancing tumour (ET);
- ``brats``: BraTS 2018–2021, 1 necrotic core (NCR), 2 edema (ED), 4 enhancing tumour (ET).

Regions, as the BraTS evaluation defines them: TC = NCR/NET ∪ ET, WT = every tumour label, ET = ET.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ..errors import DataError, source_name

# convention → (core id (NCR or NET), edema id, enhancing id)
CONVENTIONS: dict[str, tuple[int, int, int]] = {"msd": (2, 1, 3), "brats": (1, 2, 4)}
REGIONS = ("TC", "WT", "ET")


def region_ids(convention: str) -> dict[str, tuple[int, ...]]:
    """The label ids each region is made of, e.g. ``msd`` → {TC: (2, 3), WT: (1, 2, 3), ET: (3,)}."""
    core, edema, enhancing = CONVENTIONS[convention]
    return {"TC": (core, enhancing), "WT": (core, edema, enhancing), "ET": (enhancing,)}


def to_regions(label: torch.Tensor, convention: str) -> torch.Tensor:
    """(1, D, H, W) label ids → (3, D, H, W) float TC/WT/ET masks."""
    ids = region_ids(convention)
    return torch.cat([torch.isin(label, torch.tensor(ids[r], device=label.device)) for r in REGIONS]).float()


def from_regions(regions: torch.Tensor, convention: str) -> torch.Tensor:
    """(3, D, H, W) bool TC/WT/ET → (1, D, H, W) label ids of ``convention`` (ET inside TC inside WT)."""
    core, edema, enhancing = CONVENTIONS[convention]
    out = torch.zeros_like(regions[:1], dtype=torch.float32)
    out[regions[1:2]] = edema
    out[regions[0:1]] = core
    out[regions[2:3]] = enhancing
    return out


class BratsRegionsd(MapTransform):
    """Label ids of a BraTS convention → TC/WT/ET channels (the label's metadata is kept)."""

    def __init__(self, keys, convention: str) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if convention not in CONVENTIONS:
            raise ValueError(f"BraTS label convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
        self.convention = convention

    def __call__(self, data):
        d = dict(data)
        allowed = {0, *CONVENTIONS[self.convention]}
        for key in self.key_iterator(d):
            lab = d[key]
            ids = torch.as_tensor(lab).round().long()
            stray = sorted(set(torch.unique(ids).tolist()) - allowed)
            if stray:  # e.g. BraTS 2023's ET = 3 read as the 'brats' convention: ET would silently be empty
                raise DataError(source_name(d, key), f"label ids {stray} are not in the '{self.convention}' BraTS "
                                                     f"convention ({sorted(allowed - {0})}); set data.brats_labels")
            out = to_regions(ids, self.convention)
            d[key] = MetaTensor(out, meta=lab.meta, applied_operations=lab.applied_operations) \
                if isinstance(lab, MetaTensor) else out
        return d


def label_names(meta: dict) -> dict[int, str]:
    """dataset.json ``labels`` as {id: lower-case name}: MSD writes {"1": "edema"}, nnU-Net v2 {"edema": 1}."""
    labels = meta.get("labels") or {}
    out = {}
    for k, v in labels.items():
        if isinstance(v, (int, float)) or (isinstance(v, str) and v.strip().isdigit() and not k.strip().isdigit()):
            out[int(v)] = str(k).lower()
        elif str(k).strip().isdigit():
            out[int(k)] = str(v).lower()
    return out


def _words(name: str) -> set[str]:
    return set(re.split(r"[^a-z]+", name.lower())) - {""}


def convention_from_names(names: dict[int, str]) -> str | None:
    """The convention whose ids carry these names, or None when the names say nothing about tumour classes.

    Understands full names (edema, non-enhancing tumour, necrotic core, enhancing tumour) and the BraTS
    abbreviations (ED, NET, NCR, NCR/NET, ET).
    """
    edema = [i for i, n in names.items() if "edema" in n or "oedema" in n or "ed" in _words(n)]
    enhancing = [i for i, n in names.items()
                 if ("enhanc" in n and "non" not in n) or "et" in _words(n) or "gd" in _words(n)]
    core = [i for i, n in names.items() if i not in enhancing and i not in edema and (
        "necro" in n or "non-enhanc" in n or "non enhanc" in n or {"ncr", "net"} & _words(n))]
    if not (edema or enhancing or core):
        return None
    for name, (c, e, et) in CONVENTIONS.items():
        if core == [c] and edema == [e] and enhancing == [et]:
            return name
    return "unknown"


def dataset_json(source: str | Path) -> Path | None:
    """The dataset.json a datalist source is, or sits in."""
    p = Path(source)
    if p.is_file() and p.suffix.lower() == ".json":
        return p
    if p.is_dir() and (p / "dataset.json").is_file():
        return p / "dataset.json"
    return None


def named_labels(sources: str | list[str]):
    """(dataset.json, {id: name}) for each datalist source whose dataset.json can be read; unreadable ones skipped."""
    for src in [sources] if isinstance(sources, str) else sources:
        path = dataset_json(src)
        if path is None:
            continue
        try:
            yield path, label_names(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, AttributeError, ValueError):
            continue


def convention_of(sources: str | list[str], lenient: bool = False) -> tuple[str, Path] | None:
    """(convention, dataset.json) from the label names of the sources' dataset.json files; None when none names any.

    Raises DataError naming the file when names match no convention or two sources disagree.
    """
    found: tuple[str, Path] | None = None
    for path, names in named_labels(sources):
        conv = convention_from_names(names)
        if conv is None:
            continue
        if conv == "unknown" and lenient:
            continue  # names this module cannot read: the configured convention decides
        if conv == "unknown":
            shown = ", ".join(f"{i} {n}" for i, n in sorted(names.items()) if i)
            raise DataError(path, f"labels ({shown}) match neither BraTS convention: msd (1 edema, 2 non-enhancing, "
                                  f"3 enhancing) nor brats (1 necrotic, 2 edema, 4 enhancing)")
        if found and found[0] != conv:
            raise DataError(path, f"labels follow '{conv}' but {found[1]} follows '{found[0]}'")
        found = (conv, path)
    return found


def resolve_convention(configured: str | None, sources: str | list[str]) -> str:
    """The label convention of the training data: its dataset.json's label names where given, else ``configured``.

    Raises DataError (one line, naming the file) when names and config disagree, or when neither says.
    """
    found = convention_of(sources, lenient=configured is not None)
    if found and configured and found[0] != configured:
        raise DataError(found[1], f"labels follow the '{found[0]}' convention but data.brats_labels is '{configured}'")
    if found:
        return found[0]
    if configured:
        return configured
    first = sources if isinstance(sources, str) else sources[0]
    raise DataError(first, "names no BraTS labels; set data.brats_labels to msd (MSD Task01: 1 edema, "
                           "2 non-enhancing, 3 enhancing) or brats (BraTS 2018-2021: 1 necrotic, 2 edema, 4 enhancing)")
