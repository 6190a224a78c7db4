"""MONAI transform chains for each stage, built from a Preset; plus the input checks they share."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

from ..errors import DataError
from .presets import Preset


def source_name(data: Mapping, key: Hashable) -> str:
    """The file a (loaded or not yet loaded) item came from, for error messages."""
    value = data.get(key)
    meta = getattr(value, "meta", None)
    if meta and "filename_or_obj" in meta:
        return str(meta["filename_or_obj"])
    if isinstance(value, (list, tuple)):
        return str(value[0])
    return str(value)


class CheckVolumed(MapTransform):
    """Reject what would silently train on garbage: wrong dimensionality, NaN/inf voxels, mismatched labels.

    Expects channel-first arrays (C, D, H, W) straight after LoadImaged; raises DataError(file, problem).
    """

    def __init__(self, keys: KeysCollection = "image", label_key: str | None = "label", channels: int = 1) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.label_key = label_key
        self.channels = channels

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            where = source_name(d, key)
            spatial = tuple(img.shape[1:])
            if len(spatial) != 3:
                raise DataError(where, f"expected a 3D volume, got a {len(spatial)}D image of shape {spatial}")
            if img.shape[0] != self.channels:
                what = "a 4D image with" if self.channels == 1 else "an image with"
                raise DataError(
                    where,
                    f"{what} {img.shape[0]} channels/volumes, expected {self.channels} "
                    f"(set data.channels for multi-channel images)",
                )
            if img.dtype.is_floating_point and not torch.isfinite(torch.as_tensor(img)).all():
                bad = int((~torch.isfinite(torch.as_tensor(img))).sum())
                raise DataError(where, f"contains {bad} NaN or infinite voxels")
        if self.label_key and self.label_key in d:
            lab, img = d[self.label_key], d[self.first_key(d)]
            where = source_name(d, self.label_key)
            if lab.shape[0] != 1 or tuple(lab.shape[1:]) != tuple(img.shape[1:]):
                raise DataError(
                    where,
                    f"label shape {tuple(lab.shape[1:])} (channels {lab.shape[0]}) differs from its image "
                    f"{source_name(d, self.first_key(d))} shape {tuple(img.shape[1:])}",
                )
        return d


def intensity(preset: Preset, key: str = "image") -> MapTransform:
    """HU window (ct) or per-volume percentiles (mri) to [b_min, b_max], clipped."""
    if preset.modality == "ct":
        return ScaleIntensityRanged(key, preset.a_min, preset.a_max, preset.b_min, preset.b_max, clip=True)
    return ScaleIntensityRangePercentilesd(
        key, preset.lower_percentile, preset.upper_percentile, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
    )


def preprocess(preset: Preset, keys: Sequence[str] = ("image",)) -> list:
    """Load → check → orient → resample → normalise; labels are resampled with nearest neighbour."""
    keys = list(keys)
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    return [
        LoadImaged(keys, image_only=True, ensure_channel_first=True),
        CheckVolumed([k for k in keys if k != "label"], label_key="label" if "label" in keys else None,
                     channels=preset.channels),
        Orientationd(keys, axcodes=preset.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys, pixdim=preset.spacing, mode=modes),
        intensity(preset),
    ]


def pretrain_transforms(preset: Preset, roi: Sequence[int], samples: int = 1) -> Compose:
    """Preprocess, pad to the ROI, then ``samples`` random ROI crops per volume (no augmentation, as the paper)."""
    return Compose(
        preprocess(preset, ["image"])
        + [
            SpatialPadd("image", spatial_size=list(roi)),
            RandSpatialCropSamplesd("image", roi_size=list(roi), num_samples=samples, random_size=False),
        ]
    )


def center_transforms(preset: Preset, roi: Sequence[int], keys: Sequence[str] = ("image",)) -> Compose:
    """Preprocess, pad to the ROI and take the central ROI crop (validation and inspection)."""
    return Compose(
        preprocess(preset, keys)
        + [SpatialPadd(list(keys), spatial_size=list(roi)), CenterSpatialCropd(list(keys), roi_size=list(roi))]
    )
