"""MONAI transform chains for each stage, built from a Preset; plus the input checks they share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    CopyItemsd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
    Transposed,
)

from ..errors import DataError, SubforeError, root_message, source_name
from .brats import BratsRegionsd
from .presets import Preset


class LoadVolumed(MapTransform):
    """LoadImaged (channel first, metadata kept) one key at a time, so a file that cannot be read is named itself.

    dtype: None keeps each file's own dtype (a uint8 label stays 1 byte per voxel).
    """

    def __init__(self, keys: KeysCollection, dtype=np.float32) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.loaders = {k: LoadImaged(k, image_only=True, ensure_channel_first=True, dtype=dtype) for k in self.keys}

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d = self.loaders[key](d)
            except Exception as exc:  # noqa: BLE001 - readers fail in many types (EOFError, ImageFileError, ...)
                raise DataError(source_name(d, key), f"cannot be read as {'a label map' if key == 'label' else 'an image'}"
                                                     f" ({root_message(exc)})") from exc
        return d


def label_problem(label: torch.Tensor) -> str | None:
    """Why a label array (any shape) holds no label ids, or None: every value an integer ≥ 0 (NaN is neither)."""
    t = label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)
    if t.dtype == torch.bool or t.numel() == 0:
        return None
    # A boolean mask of the offending voxels (1 byte each), not a sorted copy of the whole volume.
    wrong = (~torch.isfinite(t) | (t < 0) | (t != t.round())) if t.is_floating_point() else t < 0
    if not bool(wrong.any()):
        return None
    bad = torch.unique(t[wrong])
    shown = ", ".join(f"{float(v):g}" for v in bad[:4].tolist())
    return f"holds values ({shown}{', …' if bad.numel() > 4 else ''}) that are not label ids (integers ≥ 0)"


class CheckVolumed(MapTransform):
    """Reject what would silently train on garbage: wrong dimensionality, NaN/inf voxels, mismatched labels.

    Expects channel-first arrays (C, D, H, W) straight after LoadVolumed; labels hold integers ≥ 0 (checked before
    any remapping); raises DataError(file, problem). With the image absent the label alone is checked.
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
            lab = d[self.label_key]
            where = source_name(d, self.label_key)
            if lab.ndim != 4:
                raise DataError(where, f"expected a 3D label map, got a {lab.ndim - 1}D image of shape "
                                       f"{tuple(lab.shape[1:])}")
            problem = label_problem(lab)
            if problem:  # before any remapping, which would truncate 0.5 to 0
                raise DataError(where, problem)
            img = d[self.first_key(d)] if list(self.key_iterator(d)) else None
            if img is None:
                if lab.shape[0] != 1:
                    raise DataError(where, f"has {lab.shape[0]} channels; expected one 3D label map")
            elif lab.shape[0] != 1 or tuple(lab.shape[1:]) != tuple(img.shape[1:]):
                raise DataError(
                    where,
                    f"label shape {tuple(lab.shape[1:])} (channels {lab.shape[0]}) differs from its image "
                    f"{source_name(d, self.first_key(d))} shape {tuple(img.shape[1:])}",
                )
        return d


class NnunetNormalized(MapTransform):
    """nnU-Net's intensity normalisation, per channel, of (C, D, H, W) images (its default_normalization_schemes).

    CTNormalization: clip to the foreground's [percentile 0.5, 99.5], then (x − mean) / std of the foreground.
    ZScoreNormalization: (x − mean) / std of this volume, over its nonzero region (holes filled) when the plans
    set use_mask_for_norm, with 0 outside it. RescaleTo01: (x − min) / (max − min). RGBTo01: x / 255.
    """

    def __init__(self, keys: KeysCollection, norms) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.norms = tuple(norms)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        eps = 1e-8
        for key in self.key_iterator(d):
            img = d[key]
            x = (img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)).float().clone()
            region = None
            for c, n in enumerate(self.norms):
                v = x[c]
                if n.scheme == "CTNormalization":
                    x[c] = (v.clamp(n.lower, n.upper) - n.mean) / max(n.std, eps)
                elif n.scheme == "ZScoreNormalization" and n.use_mask:
                    if region is None:
                        from scipy.ndimage import binary_fill_holes

                        region = torch.from_numpy(binary_fill_holes((x != 0).any(0).numpy()).astype(np.bool_))
                    inside = v[region]
                    std = inside.std(unbiased=False) if inside.numel() else torch.tensor(1.0)
                    x[c] = torch.where(region, (v - inside.mean()) / std.clamp_min(eps), 0.0)
                elif n.scheme == "ZScoreNormalization":
                    x[c] = (v - v.mean()) / v.std(unbiased=False).clamp_min(eps)
                elif n.scheme == "RescaleTo01Normalization":
                    v = v - v.min()
                    x[c] = v / v.max().clamp_min(eps)
                elif n.scheme == "RGBTo01Normalization":
                    x[c] = v / 255.0
            d[key] = MetaTensor(x, meta=img.meta, applied_operations=img.applied_operations) \
                if isinstance(img, MetaTensor) else x
        return d


def intensity(preset: Preset, key: str = "image") -> MapTransform:
    """HU window (ct) or per-volume percentiles (mri) to [b_min, b_max], clipped; nnunet: the plans' schemes."""
    if preset.modality == "nnunet":
        return NnunetNormalized(key, preset.norms)
    if preset.modality == "ct":
        return ScaleIntensityRanged(key, preset.a_min, preset.a_max, preset.b_min, preset.b_max, clip=True)
    return ScaleIntensityRangePercentilesd(
        key, preset.lower_percentile, preset.upper_percentile, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
    )


def with_reference(preset: Preset, keys: Sequence[str] = ("image",)) -> list[str]:
    """``keys`` plus ``reference`` where the preset decides the foreground on a reference beside the image."""
    return list(keys) + (["reference"] if preset.reference_window is not None and "image" in keys else [])


def preprocess(preset: Preset, keys: Sequence[str] = ("image",), reference: bool = False) -> list:
    """Load → check → orient → resample → normalise (→ nnU-Net's axis order); labels resampled nearest.

    reference: also a ``reference`` key (C, D, H, W) where the preset has a
    :attr:`~subfore.data.presets.Preset.reference_window`: the image's HU resampled the same way and mapped through
    that window (clipped), the values SubFore's foreground is decided on whatever normalises the network's input.
    """
    keys = list(keys)
    spatial = with_reference(preset, keys) if reference else keys
    modes = ["nearest" if k == "label" else "bilinear" for k in spatial]
    copy, window = [], []
    if len(spatial) > len(keys):
        w = preset.reference_window
        copy = [CopyItemsd("image", names="reference")]
        window = [ScaleIntensityRanged("reference", w.a_min, w.a_max, w.b_min, w.b_max, clip=True)]
    order = []
    if preset.axes is not None and tuple(preset.axes) != (0, 1, 2):
        # Invertible (Invertd replays it backwards), so predictions still land on each input's own grid.
        order = [Transposed(spatial, (0, *(a + 1 for a in preset.axes)))]
    return [
        LoadVolumed(keys),
        CheckVolumed([k for k in keys if k != "label"], label_key="label" if "label" in keys else None,
                     channels=preset.channels),
        *copy,
        Orientationd(spatial, axcodes=preset.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(spatial, pixdim=preset.spacing, mode=modes),
        intensity(preset),
        *window,
    ] + order


def eval_transforms(cfg, preset: Preset, with_label: bool = True) -> Compose:
    """Preprocess the whole volume (and its label, through a finetuning config's label settings) for
    sliding-window inference; cfg: a FinetuneConfig (its ``data`` label keys and ``model.out_channels``)."""
    keys = ["image", "label"] if with_label else ["image"]
    t = preprocess(preset, keys)
    if with_label:
        d = cfg.data
        t += label_transforms(d.label_map, d.regions, d.brats_labels, cfg.model.out_channels)
    return Compose(t)


def pretrain_transforms(preset: Preset, roi: Sequence[int], samples: int = 1) -> Compose:
    """Preprocess (with the foreground reference, if the preset has one), pad to the ROI, then ``samples`` random
    ROI crops per volume (no augmentation, as the paper)."""
    keys = with_reference(preset)
    return Compose(
        preprocess(preset, ["image"], reference=True)
        + [
            SpatialPadd(keys, spatial_size=list(roi)),
            RandSpatialCropSamplesd(keys, roi_size=list(roi), num_samples=samples, random_size=False),
        ]
    )


def center_transforms(preset: Preset, roi: Sequence[int], keys: Sequence[str] = ("image",)) -> Compose:
    """Preprocess (with the foreground reference, if the preset has one), pad to the ROI and take the central ROI
    crop (validation and inspection)."""
    spatial = with_reference(preset, keys)
    return Compose(
        preprocess(preset, keys, reference=True)
        + [SpatialPadd(spatial, spatial_size=list(roi)), CenterSpatialCropd(spatial, roi_size=list(roi))]
    )


# --- labels ---------------------------------------------------------------------------------------------
def remap_labels(label: torch.Tensor, mapping: Mapping[int, int]) -> torch.Tensor:
    """Label ids (any shape, integer-valued; fractions are truncated) through ``{src: dst}``; ids not listed (and
    negative ones) become background (0)."""
    t = torch.as_tensor(label).long().clamp_min(0)
    lut = torch.zeros(max(int(t.max()), max(int(k) for k in mapping)) + 1, dtype=torch.long)
    for src, dst in mapping.items():
        lut[int(src)] = int(dst)
    return lut[t]


class RemapLabels:
    """Array transform: label ids through ``{src: dst}`` (unlisted ids → 0), float32, metadata kept."""

    def __init__(self, mapping: Mapping[int, int]) -> None:
        self.mapping = {int(k): int(v) for k, v in mapping.items()}

    def __call__(self, label):
        out = remap_labels(label, self.mapping).to(torch.float32)
        if isinstance(label, MetaTensor):
            return MetaTensor(out, meta=label.meta, applied_operations=label.applied_operations)
        return out


class RemapLabelsd(MapTransform):
    """Dictionary version of :class:`RemapLabels`."""

    def __init__(self, keys: KeysCollection, mapping: Mapping[int, int]) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.remap = RemapLabels(mapping)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.remap(d[key])
        return d


class CheckLabelsd(MapTransform):
    """Reject label ids that the network cannot output (≥ out_channels), naming the file."""

    def __init__(self, keys: KeysCollection, out_channels: int) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.out_channels = out_channels

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            ids = torch.unique(torch.as_tensor(d[key]))
            bad = [int(i) for i in ids if i < 0 or i >= self.out_channels or i != int(i)]
            if bad:
                raise DataError(source_name(d, key), f"label ids {bad[:8]} lie outside 0…{self.out_channels - 1} "
                                                     f"(model.out_channels={self.out_channels}); set data.label_map")
        return d


def label_checks(label_map: Mapping[int, int] | None, regions: str | None, brats_labels: str | None,
                 out_channels: int) -> Compose:
    """Read a label file alone in its own dtype and check it as training and scoring would: readable, 3D, integer
    ids within the network's classes (after ``label_map``). For checking every label before any inference."""
    return Compose([LoadVolumed("label", dtype=None), CheckVolumed("image", label_key="label"),
                    *label_transforms(label_map, regions, brats_labels, out_channels)])


def label_transforms(label_map: Mapping[int, int] | None, regions: str | None, brats_labels: str | None,
                     out_channels: int) -> list:
    """Label remapping, then the BraTS region conversion (``regions: brats``) or the id check."""
    out: list = []
    if label_map:
        out.append(RemapLabelsd("label", label_map))
    if regions == "brats":
        if brats_labels is None:
            raise SubforeError("data.regions 'brats' needs data.brats_labels (msd or brats) or a dataset.json that "
                               "names its labels")
        out.append(BratsRegionsd("label", brats_labels))
    else:
        out.append(CheckLabelsd("label", out_channels))
    return out
