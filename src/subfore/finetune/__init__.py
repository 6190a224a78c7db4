"""Segmentation finetuning: the labelled cases and transforms (``data``), the LightningModule (``module``) and the
run (``run``)."""

from ..config import FinetuneConfig
from ..inference import eval_transforms, load_finetuned, predict_volume
from .data import finetune_cases, train_transforms
from .module import SegmentationModel
from .run import finetune

__all__ = ["FinetuneConfig", "SegmentationModel", "eval_transforms", "finetune", "finetune_cases", "load_finetuned",
           "predict_volume", "train_transforms"]
