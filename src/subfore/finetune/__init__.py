"""Segmentation finetuning: the labelled cases and transforms (``data``), the LightningModule (``module``) and the
run (``run``). The finetuning schemas live in :mod:`subfore.config`, label transforms in :mod:`subfore.data.transforms`
and inference in :mod:`subfore.inference`; their former names here stay importable."""

from ..config import FinetuneConfig, FinetuneData, FinetuneOptim, FinetuneOptions, FinetuneTrainConfig, SegModelConfig
from ..data.transforms import CheckLabelsd, RemapLabelsd, eval_transforms, label_transforms
from ..inference import load_finetuned, predict_volume
from .data import finetune_cases, train_transforms
from .module import SegmentationModel
from .run import finetune

__all__ = ["CheckLabelsd", "FinetuneConfig", "FinetuneData", "FinetuneOptim", "FinetuneOptions", "FinetuneTrainConfig",
           "RemapLabelsd", "SegModelConfig", "SegmentationModel", "eval_transforms", "finetune", "finetune_cases",
           "label_transforms", "load_finetuned", "predict_volume", "train_transforms"]
