"""Finetuning's data: the labelled cases as the config selects them, the BTCV-recipe training transforms, and
the loaders (PersistentDataset-cached volumes, step-indexed crops)."""

from __future__ import annotations

from monai.transforms import (
    Compose,
    CropForegroundd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    SpatialPadd,
)

from ..config import FinetuneConfig
from ..data.datalist import first_source, load_datalists
from ..data.dataset import make_dataset
from ..data.presets import Preset
from ..data.transforms import eval_transforms, label_transforms, preprocess
from ..engine.sampling import check_fill, make_loaders, shard
from ..errors import DataError, source_name


class PosNegCropsd(RandCropByPosNegLabeld):
    """MONAI's pos/neg crops; a case with nowhere to draw from (no labelled voxel, no image voxel above 0) is named by
    its label file instead of MONAI's bare 'No sampling location available'."""

    def __call__(self, data, lazy=None):
        try:
            return super().__call__(data, lazy)
        except ValueError as exc:
            if "No sampling location" not in str(exc):
                raise
            raise DataError(source_name(data, "label"), "is all background and its image has no voxel above 0 after "
                                                        "normalisation, so no training crop can be drawn from this "
                                                        "case; remove it from the training split") from None


def train_transforms(cfg: FinetuneConfig, preset: Preset) -> Compose:
    """BTCV recipe: preprocess, foreground crop, pos/neg (or class-balanced) crops, flips, rot90, intensity jitter."""
    d = cfg.data
    keys = ["image", "label"]
    t = preprocess(preset, keys) + label_transforms(d.label_map, d.regions, d.brats_labels, cfg.model.out_channels)
    if d.foreground_crop:
        t.append(CropForegroundd(keys, source_key="image", allow_smaller=True))
    t.append(SpatialPadd(keys, spatial_size=list(d.roi)))
    if cfg.sigmoid:
        t.append(RandSpatialCropSamplesd(keys, roi_size=list(d.roi), num_samples=d.samples_per_volume, random_size=False))
    elif d.crop == "classes":
        t.append(RandCropByLabelClassesd(keys, "label", spatial_size=list(d.roi), num_classes=cfg.model.out_channels,
                                         num_samples=d.samples_per_volume, allow_smaller=True, warn=False))
    else:
        t.append(PosNegCropsd(keys, "label", spatial_size=list(d.roi), pos=1, neg=1,
                                        num_samples=d.samples_per_volume, image_key="image", image_threshold=0,
                                        allow_smaller=True))
    t += [
        RandFlipd(keys, prob=0.2, spatial_axis=0),
        RandFlipd(keys, prob=0.2, spatial_axis=1),
        RandFlipd(keys, prob=0.2, spatial_axis=2),
    ]
    if d.roi[0] == d.roi[1]:  # a quarter turn of a non-square crop changes its shape, and batches no longer stack
        t.append(RandRotate90d(keys, prob=0.2, max_k=3))
    t += [
        RandScaleIntensityd("image", factors=0.1, prob=0.1),
        RandShiftIntensityd("image", offsets=0.1, prob=0.1),
    ]
    return Compose(t)


def finetune_cases(cfg: FinetuneConfig) -> tuple[list[dict], list[dict] | None]:
    """(training cases, validation cases or None) as the config selects them: split, holdout, then limit_train."""
    d = cfg.data
    items = load_datalists(d.train, d.train_split)
    missing = [i["image"] for i in items if "label" not in i]
    if missing:
        raise DataError(missing[0], "has no label: finetuning needs an image/label pair for every training case")
    source = first_source(d.train)
    val_items = None
    if d.holdout:
        if d.holdout >= len(items):
            raise DataError(source, f"data.holdout {d.holdout} leaves no training case (the '{d.train_split}' split "
                                    f"has {len(items)})")
        items, val_items = items[: -d.holdout], items[-d.holdout :]
    if d.limit_train:
        items = items[: d.limit_train]
    if d.val:
        val_items = load_datalists(d.val, d.val_split)
        if not val_items:
            raise DataError(first_source(d.val), f"the '{d.val_split}' split is empty")
        no_label = [i["image"] for i in val_items if "label" not in i]
        if no_label:
            raise DataError(no_label[0], "validation case without a label")
    return items, val_items


def loaders(cfg: FinetuneConfig, preset: Preset, items: list[dict], val_items: list[dict] | None, trainer):
    """This rank's endless training loader and its share of the validation cases (or None)."""
    d, t = cfg.data, cfg.train
    rank, world = trainer.global_rank, trainer.world_size
    per_batch = check_fill(len(items), t.batch_size, d.samples_per_volume, world, first_source(d.train),
                           warn=trainer.is_global_zero)
    train_ds = make_dataset(items, train_transforms(cfg, preset), d.cache_dir,
                            cache_key=(preset, "seg", d.label_map, d.regions, d.brats_labels, d.foreground_crop,
                                       list(d.roi)),
                            skip_bad=d.skip_bad)
    val_ds = None
    if val_items is not None:
        val_ds = make_dataset(shard(val_items, rank, world), eval_transforms(cfg, preset), d.cache_dir,
                              cache_key=(preset, "seg-eval", d.label_map, d.regions, d.brats_labels),
                              skip_bad=d.skip_bad)
    return make_loaders(train_ds, val_ds, cfg.seed, per_batch, trainer, d.num_workers)
