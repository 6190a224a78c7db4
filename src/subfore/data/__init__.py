"""Data layer on MONAI: datalists, presets (and nnU-Net plans), transform chains, datasets, BraTS regions,
phantoms and the crop store."""

from .datalist import case_id, load_datalist, load_datalists
from .dataset import SafeDataset, make_dataset
from .presets import Preset, make_preset
from .store import StoreCrops, StoreSpec, preprocess_config, preprocess_store, store_for
from .transforms import CheckVolumed, center_transforms, preprocess, pretrain_transforms

__all__ = [
    "CheckVolumed",
    "Preset",
    "SafeDataset",
    "StoreCrops",
    "StoreSpec",
    "case_id",
    "center_transforms",
    "load_datalist",
    "load_datalists",
    "make_dataset",
    "make_preset",
    "preprocess",
    "preprocess_config",
    "preprocess_store",
    "pretrain_transforms",
    "store_for",
]
